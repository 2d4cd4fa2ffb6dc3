"""`mergekit_recipe`: a saved merge of full fine-tunes, redone by `mergekit-yaml` from the exported recipe, equals
the saved merged model tensor for tensor; what mergekit cannot redo is refused before anything is written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM,
                          LlamaForSequenceClassification)

from supermerge_hf import SuperMergeConfig
from supermerge_hf.cli import main
from supermerge_hf.merger import SuperMerger
from supermerge_hf.mergekit_recipe import mergekit_recipe, save_mergekit_recipe

from .conftest import Family, family_examples, paper, perturb

FAST = {"steps": 2, "eval_every": 1, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0,
        "examples_per_task": 8}


def merge(family: Family, out: Path, **kwargs) -> Path:
    config = SuperMergeConfig(base=str(family.base), sources=family.source_list(), **paper(**kwargs))
    merger = SuperMerger(config)
    merger.fit(family_examples(family, n=8) if merger.needs_examples else None)
    return Path(merger.save_pretrained(out))


@pytest.fixture(scope="module")
def gpt2_classifiers(tmp_path_factory) -> Family:
    """A tied GPT-2 LM base and two sequence classifiers of it with 2 and 3 labels (heads of different shapes)."""
    root = tmp_path_factory.mktemp("gpt2_cls")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                               eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)).save_pretrained(root / "base")
    labels = {"topic": 2, "mood": 3}
    for i, (task, k) in enumerate(labels.items()):
        perturb(GPT2ForSequenceClassification.from_pretrained(root / "base", num_labels=k), seed=i).save_pretrained(
            root / task)
    return Family(root / "base", {t: root / t for t in labels}, labels)


CASES = {  # name -> (family fixture, merge settings)
    "tensor": ("llama_family", FAST),
    "heads_tied_block": ("gpt2_classifiers", FAST | {"granularity": "block"}),
    "hierarchical": ("llama_family", FAST | {"granularity": "block", "hierarchical": {"group_size": 2}}),
    "ties": ("llama_family", {"method": "ties", "method_kwargs": {"lam": 0.8, "density": 0.4, "weights": [2, 2, 2]}}),
    "average": ("llama_family", {"method": "average", "method_kwargs": {"weights": [1.0, 2.0, 3.0]}}),
}


@pytest.fixture(scope="module")
def redone(request, tmp_path_factory):
    """Per case: the saved merge, its exported recipe, and mergekit-yaml's output from that recipe (run side by
    side: most of their time is imports)."""
    pytest.importorskip("mergekit", reason="mergekit is an optional test dependency (mergekit==0.1.5, `dev` extra)")
    from .test_mergekit import mergekit_pytorch

    script = Path(mergekit_pytorch()).with_name("mergekit-yaml")
    root, runs = tmp_path_factory.mktemp("export"), {}
    for name, (family, settings) in CASES.items():
        merged = merge(request.getfixturevalue(family), root / name, **settings)
        recipe = save_mergekit_recipe(merged, root / f"{name}.yaml")
        command = [str(script), str(recipe), str(root / f"{name}-mergekit"), "--quiet", "--no-copy-tokenizer"]
        runs[name] = (merged, recipe, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       env={**os.environ, "HF_HUB_OFFLINE": "1"}))
    out = {}
    for name, (merged, recipe, process) in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"mergekit-yaml {name} failed:\n{output.decode()[-3000:]}"
        out[name] = (merged, yaml.safe_load(recipe.read_text()), load_file(root / f"{name}-mergekit" / "model.safetensors"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_redoes_the_saved_merge(redone, case):
    merged, recipe, theirs = redone[case]
    ours = load_file(merged / "model.safetensors")
    assert set(ours) <= set(theirs), f"mergekit lacks {sorted(set(ours) - set(theirs))}"
    max_diff = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
    assert max_diff < 1e-5, f"{case}: max |diff| = {max_diff}"
    assert recipe["parameters"]["normalize"] is (case == "ties")


def test_recipe_filters_and_references(redone):
    _, recipe, theirs = redone["heads_tied_block"]
    assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"]["lambda"] == 1.0
    for model in recipe["models"]:  # classifiers read as the base's architecture: their heads are left out
        assert model["model"]["override_architecture"] == "GPT2LMHeadModel"
        filters = [e.get("filter") for e in model["parameters"]["weight"]]
        assert filters[-1] is None and "wte.weight" in filters and "lm_head.weight" in filters  # tied: both names
        assert [len(f) for f in filters[:-1]] == sorted((len(f) for f in filters[:-1]), reverse=True)
    assert not any("score" in n for n in theirs)
    _, recipe, _ = redone["tensor"]
    weights = recipe["models"][0]["parameters"]["weight"]
    assert isinstance(recipe["base_model"], str) and Path(recipe["base_model"]).is_absolute()
    # the first filter contained in each layer-1 name is its own, never a layer-11 or shorter name's
    for entry in weights[:-1]:
        first = next(e for e in weights[:-1] if e["filter"] in "model." + entry["filter"])
        assert first is entry


def test_relative_paths_resolved_against_where_the_merge_ran(llama_family, tmp_path, monkeypatch):
    monkeypatch.chdir(llama_family.base.parent)
    sources = [{"task": t, "path": p.name} for t, p in llama_family.sources.items()]
    config = SuperMergeConfig(base="base", sources=sources, method="task_arithmetic", output_dir="out/merged")
    SuperMerger(config).fit().save_pretrained()
    merged = llama_family.base.parent / "out" / "merged"
    monkeypatch.chdir(tmp_path)
    recipe = mergekit_recipe(merged)
    assert recipe["base_model"] == str(llama_family.base.resolve())
    assert [m["model"] for m in recipe["models"]] == [str(p.resolve()) for p in llama_family.sources.values()]
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("settings, match", [
    ({"method": "dare_linear"}, "'dare_linear' .* cannot be exported"),
    ({"method": "ties", "method_kwargs": {"weights": [1, 2, 1]}}, r"ties merge cannot .* weights \[1.0, 2.0, 1.0\]"),
    ({"method": "ties", "method_kwargs": {"trim_scope": "task"}}, "trim_scope='task'"),
    ({"method": "adamerging_plus", **FAST}, "'adamerging_plus' .* cannot be exported"),
    ({"granularity": "row", **FAST}, r"granularity 'row', SuperMerge's default.*`granularity: tensor`"),
])
def test_refuses_what_mergekit_cannot_redo(llama_family, tmp_path, settings, match):
    merged = merge(llama_family, tmp_path / "merged", **settings)
    with pytest.raises(ValueError, match=match):
        save_mergekit_recipe(merged, tmp_path / "recipe.yaml")
    assert not (tmp_path / "recipe.yaml").exists()


def test_refuses_lora_sources(llama_family, tmp_path):
    model = LlamaForCausalLM.from_pretrained(llama_family.base)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    family = Family(llama_family.base, {"code": llama_family.sources["code"], "lora": tmp_path / "adapter"}, None)
    merged = merge(family, tmp_path / "merged", method="task_arithmetic")
    with pytest.raises(ValueError, match=r"\['lora'\] are LoRA adapters: .* adapter space"):
        mergekit_recipe(merged)


def test_refuses_base_tensors_some_source_lacks(llama_family, tmp_path):
    model = LlamaForSequenceClassification.from_pretrained(llama_family.base, num_labels=2)
    perturb(model, seed=7).save_pretrained(tmp_path / "cls")  # no lm_head: the merge keeps the base's
    family = Family(llama_family.base, {"code": llama_family.sources["code"], "cls": tmp_path / "cls"}, None)
    merged = merge(family, tmp_path / "merged", method="task_arithmetic")
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] are missing from, or shaped otherwise in, some"):
        mergekit_recipe(merged)


def test_cli_export_refuses_an_existing_output(llama_family, tmp_path, capsys):
    merged = merge(llama_family, tmp_path / "merged", method="task_arithmetic", method_kwargs={"lam": 0.5})
    args = ["export", str(merged), "--format", "mergekit", "--output", str(tmp_path / "recipe.yaml")]
    assert main(args) == 0
    text = (tmp_path / "recipe.yaml").read_text()
    assert text.startswith("# mergekit recipe") and "mergekit-yaml recipe.yaml" in text
    assert yaml.safe_load(text)["models"][0]["parameters"]["weight"] == 0.5
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
