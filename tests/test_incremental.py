"""Adding a task to a deployed merge (issue 16): from its coefficients (incremental) or as one source (cheap)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.cli import main

from .conftest import OVER_TASK_VECTORS, classification_examples, family_examples, perturb, write_text_examples

LEARN = dict(steps=3, eval_every=1, batch_size=4, examples_per_task=8, holdout_fraction=0.25)


@pytest.fixture(scope="module")
def third(bert_family, tmp_path_factory) -> Path:
    """A third fine-tune of the tiny BERT (task `pos`, 2 labels)."""
    folder = tmp_path_factory.mktemp("pos") / "pos"
    torch.manual_seed(5)
    perturb(BertForSequenceClassification.from_pretrained(bert_family.base, num_labels=2), seed=5).save_pretrained(
        folder)
    return folder


def deploy(bert_family, folder: Path, **method_kwargs) -> Path:
    """A saved SuperMerge of sst and nli that kept its examples."""
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), save_examples=True,
                              method_kwargs=method_kwargs, **LEARN)
    SuperMerger(config).fit(family_examples(bert_family, 8)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def deployed(bert_family, tmp_path_factory) -> Path:
    """With the defaults: over the TSV-M components (`start: auto`), heads refit."""
    return deploy(bert_family, tmp_path_factory.mktemp("deployed") / "merged")


@pytest.fixture(scope="module")
def deployed_over_task_vectors(bert_family, tmp_path_factory) -> Path:
    return deploy(bert_family, tmp_path_factory.mktemp("deployed_tv") / "merged", **OVER_TASK_VECTORS)


POS = {"pos": classification_examples(2, 8, seed=9)}


def test_incremental_starts_from_the_saved_coefficients(deployed, deployed_over_task_vectors, third):
    over_task_vectors = SuperMerger.from_pretrained(deployed_over_task_vectors)
    shortened = over_task_vectors.add_source("pos", str(third))
    # steps: twice the step the deployed merge selected, within [eval_every, its steps]
    assert shortened.config.steps == min(LEARN["steps"], max(2 * over_task_vectors.selected_step, LEARN["eval_every"]))
    old = SuperMerger.from_pretrained(deployed)  # the default: over TSV-M components, which the new source changes
    new = old.add_source("pos", str(third), learning_rate=1e-9)  # ~ no step: what learning started from
    assert new.config.tasks == ["sst", "nli", "pos"] and new.config.learning_rate == 1e-9
    assert new.config.method_kwargs["start"] == "tsv_m" and new.config.steps == LEARN["steps"]
    assert old.add_source("pos", str(third), steps=7).config.steps == 7
    new.fit(POS)  # the old tasks' examples come from the merged folder (save_examples)
    values = new.coefficients.values
    torch.testing.assert_close(values[:2], old.coefficients.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(values[2], torch.full_like(values[2], 0.3), rtol=0, atol=1e-6)


def test_incremental_merge_saves_its_lineage_and_reloads(deployed, third, tmp_path):
    new = SuperMerger.from_pretrained(deployed).add_source("pos", str(third)).fit(POS)
    out = Path(new.save_pretrained(tmp_path / "grown"))
    saved = json.loads((out / "supermerge_config.json").read_text())
    extends = saved["merge_info"]["extends"]
    assert extends["merge"].startswith("../") and extends["commit"] is None
    assert extends["tasks"] == ["sst", "nli"] and extends["form"] == "incremental"
    assert (out / extends["merge"]).resolve() == deployed.resolve()
    card = (out / "README.md").read_text()
    assert "## Lineage" in card and "(tasks sst, nli) with pos" in card
    reloaded = SuperMerger.from_pretrained(out)
    assert all(torch.equal(reloaded.merged_tensors[n], t) for n, t in new.merged_tensors.items())
    # the deployed merge's `save_examples` carries over: the new task's examples are kept beside the old ones
    assert sorted(p.name for p in (out / "examples").iterdir()) == ["nli.jsonl", "pos.jsonl", "sst.jsonl"]


def test_cheap_form_merges_the_deployed_merge_as_one_source(deployed_over_task_vectors, third, bert_family,
                                                           tmp_path):
    from safetensors.torch import load_file

    deployed = deployed_over_task_vectors
    new = SuperMerger.from_pretrained(deployed).add_source("pos", str(third), cheap=True).fit(POS)
    assert new.coefficients.sources == ["(sst+nli)", "pos"]
    name = "encoder.layer.0.attention.self.query.weight"
    base = load_file(bert_family.base / "model.safetensors")[name]
    merged = load_file(deployed / "model.safetensors")[name]
    pos = load_file(third / "model.safetensors")["bert." + name]
    groups = new.coefficients.groups  # the default `row`: one coefficient per row of the query
    c = new.coefficients.values[:, [groups.index(f"{name}[{r}]") for r in range(base.shape[0])]]  # (2, rows)
    expected = base + c[0].view(-1, 1) * (merged - base) + c[1].view(-1, 1) * (pos - base)
    torch.testing.assert_close(new.merged_tensors[name], expected, rtol=0, atol=1e-6)
    out = Path(new.save_pretrained(tmp_path / "cheap"))
    assert json.loads((out / "supermerge_config.json").read_text())["merge_info"]["extends"]["form"] == "cheap"
    reloaded = SuperMerger.from_pretrained(out)  # level 0: the deployed merge's coefficients, level 1: these
    assert all(torch.equal(reloaded.merged_tensors[n], t) for n, t in new.merged_tensors.items())


def test_cheap_form_of_the_default_merge_reloads(deployed, third, tmp_path):
    """The default (learned over TSV-M components) extended the cheap way: over the TSV-M components of the
    deployed merge's task vector and the new one; `from_pretrained` rebuilds it."""
    new = SuperMerger.from_pretrained(deployed).add_source("pos", str(third), cheap=True).fit(POS)
    assert new.config.method_kwargs["start"] == "tsv_m" and new.coefficients.sources == ["(sst+nli)", "pos"]
    reloaded = SuperMerger.from_pretrained(new.save_pretrained(tmp_path / "cheap"))
    assert all(torch.equal(reloaded.merged_tensors[n], t) for n, t in new.merged_tensors.items())


def test_add_source_refusals(deployed, third, bert_family):
    with pytest.raises(ValueError, match="already"):
        SuperMerger.from_pretrained(deployed).add_source("sst", str(third))
    fresh = SuperMerger(SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), **LEARN))
    with pytest.raises(ValueError, match="from_pretrained"):
        fresh.add_source("pos", str(third))
    data_free = SuperMerger(SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(),
                                             method="task_arithmetic")).fit()
    with pytest.raises(ValueError, match="from_pretrained"):
        data_free.add_source("pos", str(third))


def test_examples_of_old_tasks_are_needed_when_the_merge_kept_none(bert_family, third, tmp_path):
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), **LEARN)
    SuperMerger(config).fit(family_examples(bert_family, 8)).save_pretrained(tmp_path / "m")
    new = SuperMerger.from_pretrained(tmp_path / "m").add_source("pos", str(third))
    with pytest.raises(ValueError, match="sst"):
        new.fit(POS)
    new.fit(family_examples(bert_family, 8) | POS)  # given again: fine
    assert new.coefficients.sources == ["sst", "nli", "pos"]


def test_cli_add(deployed, third, tmp_path, capsys):
    write_text_examples(tmp_path / "pos.jsonl", 12, 2, seed=3)
    code = main(["add", str(deployed), "--source", f"pos={third}", "--data", str(tmp_path / "pos.jsonl"),
                 "--output", str(tmp_path / "grown"), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    config = SuperMergeConfig.from_pretrained(tmp_path / "grown")
    assert config.tasks == ["sst", "nli", "pos"] and config.steps == 2
    assert config.merge_info["extends"]["form"] == "incremental"
    code = main(["add", str(deployed), "--source", f"pos={third}", "--data", str(tmp_path / "pos.jsonl"),
                 "--output", str(tmp_path / "cheap"), "--cheap", "--steps", "2"])
    assert code == 0
    assert SuperMergeConfig.from_pretrained(tmp_path / "cheap").merge_info["extends"]["form"] == "cheap"


def test_cheap_form_with_bf16_sources_reloads_exactly(tmp_path):
    """The deployed merge is a bf16 checkpoint; learning and `rebuild` both use it as float32 tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import VOCAB, lm_examples

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for i, task in enumerate(["a", "b", "c"]):
        model = perturb(LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), seed=i)
        model.to(torch.bfloat16).save_pretrained(tmp_path / task)
    examples = {t: lm_examples(8, seed=i) for i, t in enumerate("abc")}
    merge = SuperMergeConfig(base=str(tmp_path / "base"), sources=[{"task": t, "path": str(tmp_path / t)}
                                                                   for t in "ab"], **LEARN)
    SuperMerger(merge).fit({t: examples[t] for t in "ab"}).save_pretrained(tmp_path / "deployed")
    new = SuperMerger.from_pretrained(tmp_path / "deployed").add_source("c", str(tmp_path / "c"), cheap=True)
    new.fit(examples)
    out = Path(new.save_pretrained(tmp_path / "grown"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = SuperMerger.from_pretrained(out)
    assert all(torch.equal(reloaded.merged_tensors[n], t) for n, t in new.merged_tensors.items())


def test_the_extended_merge_is_never_the_output(deployed, third):
    new = SuperMerger.from_pretrained(deployed).add_source("pos", str(third)).fit(POS)
    with pytest.raises(ValueError, match="is or holds an input"):
        new.save_pretrained(deployed, overwrite=True)
