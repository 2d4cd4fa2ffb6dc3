"""Bad inputs end in a clear error before heavy work, and nothing is lost or corrupted (issue 13, first part)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from supermerge_hf import IncompatibleSourceError, SuperMergeConfig, SuperMerger
from supermerge_hf import learning as learning_module
from supermerge_hf.cli import main, read_recipe

from .conftest import family_examples


def config(family, **kwargs) -> SuperMergeConfig:
    return SuperMergeConfig(base=str(family.base), sources=family.source_list(), steps=1, holdout_fraction=0.0,
                            **kwargs)


def one_source(family, folder) -> SuperMergeConfig:
    return SuperMergeConfig(base=str(family.base), sources=[{"task": "sst", "path": str(folder)}])


def copy_with(source, folder, edit) -> None:
    """A copy of a checkpoint folder whose state dict went through `edit`."""
    shutil.copytree(source, folder)
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_recipe_of_invalid_yaml_or_another_shape(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        read_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- base: x\n")
    assert main(["merge", str(tmp_path / "list.yaml")]) == 2
    assert "must be a mapping of config fields" in capsys.readouterr().err
    (tmp_path / "map.yaml").write_text("base: x\nsources: {sst: ./sst}\n")
    with pytest.raises(ValueError, match="`sources` is a list"):
        read_recipe(tmp_path / "map.yaml")


def test_recipe_paths_without_dot_are_local_when_they_exist_beside_the_recipe(bert_family, tmp_path, caplog):
    for name, path in [("base", bert_family.base), *bert_family.sources.items()]:
        shutil.copytree(path, tmp_path / "models" / name)
    recipe = {"base": "models/base", "sources": [{"task": "sst", "path": "models/sst"},
                                                 {"task": "nli", "path": "user/nli-on-the-hub"}],
              "output_dir": "out"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with caplog.at_level(logging.INFO, logger="supermerge_hf"):
        cfg, _ = read_recipe(tmp_path / "recipe.yaml")
    assert cfg.base == str(tmp_path / "models" / "base") and cfg.sources[0].path == str(tmp_path / "models" / "sst")
    assert cfg.sources[1].path == "user/nli-on-the-hub" and cfg.output_dir == str(tmp_path / "out")
    assert "read as a Hub repo id" in caplog.text and "the local folder" in caplog.text


def test_labels_out_of_range_are_refused_before_any_weight_is_loaded(bert_family, monkeypatch):
    monkeypatch.setattr(learning_module, "FunctionalMerge", None)  # loading weights would fail differently
    examples = family_examples(bert_family, n=4)
    examples["nli"][1]["labels"] = 3  # nli has 3 classes
    with pytest.raises(ValueError, match=r"Task 'nli' has labels \[3\] outside 0..2"):
        SuperMerger(config(bert_family)).fit(examples)
    examples["nli"][1]["labels"] = -1
    with pytest.raises(ValueError, match=r"labels \[-1\]"):
        SuperMerger(config(bert_family)).fit(examples)


def test_output_that_is_an_input_is_refused_even_with_overwrite(bert_family, tmp_path):
    merger = SuperMerger(config(bert_family, method="task_arithmetic")).fit()
    for folder in (bert_family.sources["sst"], bert_family.base.parent):
        with pytest.raises(ValueError, match="is or holds an input"):
            merger.save_pretrained(folder, overwrite=True)
    assert (bert_family.sources["sst"] / "model.safetensors").is_file()


def test_temporary_folders_of_killed_saves_are_cleaned_up(bert_family, tmp_path):
    (tmp_path / ".merged.tmp-abc123").mkdir()
    (tmp_path / ".merged.tmp-abc123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".other.tmp-keep").mkdir()
    SuperMerger(config(bert_family, method="task_arithmetic")).fit().save_pretrained(tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "merged"]


@pytest.mark.parametrize("streaming", [False, True])
def test_nan_in_a_source_is_refused_when_read_naming_source_and_tensor(bert_family, tmp_path, streaming):
    copy_with(bert_family.sources["sst"], tmp_path / "sst", lambda s: s["bert.encoder.layer.0.output.dense.bias"]
              .__setitem__(0, float("inf")))
    sources = [{"task": "sst", "path": str(tmp_path / "sst")}, {"task": "nli", "path": str(bert_family.sources["nli"])}]
    cfg = SuperMergeConfig(base=str(bert_family.base), sources=sources, method="ties", streaming=streaming)
    with pytest.raises(FloatingPointError, match=r"sst holds NaN or Inf in 'encoder.layer.0.output.dense.bias'"):
        SuperMerger(cfg).fit()


def test_file_shapes_must_match_the_config(bert_family, tmp_path):
    def extra_row(state):
        weight = state["bert.embeddings.word_embeddings.weight"]  # (64, 32): 65 rows in the file
        state["bert.embeddings.word_embeddings.weight"] = torch.cat([weight, weight[:1]])

    copy_with(bert_family.sources["sst"], tmp_path / "sst", extra_row)
    with pytest.raises(IncompatibleSourceError, match=r"has shape \(65, 32\) in the file but \(64, 32\)"):
        SuperMerger(one_source(bert_family, tmp_path / "sst"))


def test_unknown_extra_tensor_is_reported(bert_family, tmp_path, caplog):
    copy_with(bert_family.sources["sst"], tmp_path / "sst", lambda s: s.__setitem__("extra.scale", torch.ones(3)))
    with caplog.at_level(logging.WARNING):
        SuperMerger(one_source(bert_family, tmp_path / "sst"))
    assert "does not have; they are not merged: ['extra.scale']" in caplog.text


def test_tied_source_of_an_untied_base_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    small = dict(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**small, tie_word_embeddings=False)).save_pretrained(tmp_path / "base")
    GPT2LMHeadModel(GPT2Config(**small, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    with pytest.raises(IncompatibleSourceError, match="tie_word_embeddings=True but the base has False"):
        SuperMerger(SuperMergeConfig(base=str(tmp_path / "base"), sources=[{"task": "a", "path": str(tmp_path / "tied")}]))


def test_a_killed_run_resumes_to_the_same_merge(bert_family, tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from supermerge_hf.functional import FunctionalMerge

    cfg = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), steps=6, eval_every=2,
                           batch_size=4, holdout_fraction=0.25, checkpoint_every=2, output_dir=str(tmp_path / "m"))
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    examples = family_examples(bert_family, n=12)
    torch.save(examples, tmp_path / "examples.pt")
    script = Path(__file__).parent / "scripts" / "killed_learning.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "config.json"), str(tmp_path / "examples.pt"),
                           "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL during step 5: the state of step 4 is on disk
    assert (tmp_path / ".m.learning.pt").is_file() and not (tmp_path / "m").exists()
    steps, original = [], FunctionalMerge.coefficient_grad
    monkeypatch.setattr(FunctionalMerge, "coefficient_grad", lambda *a, **k: steps.append(1) or original(*a, **k))
    resumed = SuperMerger(cfg).fit(examples, resume=True)
    assert len(steps) == 2  # steps 5 and 6 only: learning went on from the saved state
    monkeypatch.undo()
    assert not (tmp_path / ".m.learning.pt").exists()
    whole = SuperMerger(SuperMergeConfig.from_dict(cfg.to_dict() | {"output_dir": str(tmp_path / "w")})).fit(examples)
    assert torch.equal(resumed.coefficients.raw, whole.coefficients.raw)
    assert resumed.selected_step == whole.selected_step and resumed.history == whole.history
    for name, tensor in whole.merged_tensors.items():
        assert torch.equal(resumed.merged_tensors[name], tensor), name
