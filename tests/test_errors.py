"""Bad input fails early with a message that names the problem, before any learning starts."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.checkpoint import PickleCheckpointError
from supermerge_hf.sources import IncompatibleSourceError

from .conftest import BERT_CONFIG, family_examples


def config_for(family, sources=None, **kwargs) -> SuperMergeConfig:
    kwargs = {"steps": 2, "batch_size": 4, "holdout_fraction": 0.0} | kwargs
    return SuperMergeConfig(base=str(family.base), sources=sources or family.source_list(), **kwargs)


def test_architecture_mismatch(bert_family, tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=1,
                                 vocab_size=64)).save_pretrained(tmp_path / "llama")
    sources = [{"task": "sst", "path": str(bert_family.sources["sst"])}, {"task": "x", "path": str(tmp_path / "llama")}]
    with pytest.raises(IncompatibleSourceError, match="is a 'llama' model but the base is 'bert'"):
        SuperMerger(config_for(bert_family, sources))


def test_shape_mismatch(bert_family, tmp_path):
    BertModel(BertConfig(**(BERT_CONFIG | {"vocab_size": 65}))).save_pretrained(tmp_path / "bigger_vocab")
    sources = [{"task": "sst", "path": str(bert_family.sources["sst"])}, {"task": "x", "path": str(tmp_path / "bigger_vocab")}]
    with pytest.raises(IncompatibleSourceError, match=r"Shape mismatch for 'embeddings.word_embeddings.weight'.*\(64, 32\)"):
        SuperMerger(config_for(bert_family, sources))


def test_missing_tensors(bert_family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bert_family.sources["nli"], broken)
    state = load_file(broken / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    sources = [{"task": "sst", "path": str(bert_family.sources["sst"])}, {"task": "nli", "path": str(broken)}]
    with pytest.raises(IncompatibleSourceError, match=r"missing 1 tensor.*encoder.layer.1.output.dense.weight"):
        SuperMerger(config_for(bert_family, sources))


def test_pickle_only_checkpoint_needs_opt_in(bert_family, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(bert_family.sources["nli"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    sources = [{"task": "sst", "path": str(bert_family.sources["sst"])}, {"task": "nli", "path": str(pickled)}]
    with pytest.raises(PickleCheckpointError, match="only pickle .bin weights.*allow_pickle=True"):
        SuperMerger(config_for(bert_family, sources))
    merger = SuperMerger(config_for(bert_family, sources, allow_pickle=True))
    assert len(merger.plan.merged) == 39


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("granularity", "layer", r"Unknown granularity 'layer'. Expected one of \['block', 'row', 'singular'"),
        ("transform", "sigmoid", r"Unknown transform 'sigmoid'. Expected one of \['none', 'tanh'\]"),
        ("method", "fisher", r"fisher"),
        ("steps", 0, r"`steps` must be a positive integer, got 0"),
        ("init_coefficient", 1.5, r"init_coefficient=1.5 is out of tanh's range"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SuperMergeConfig(base="b", sources=[{"task": "t", "path": "p"}], **{field: value})


def test_no_sources():
    with pytest.raises(ValueError, match="No sources given"):
        SuperMergeConfig(base="b", sources=[])


def test_task_without_examples(bert_family):
    merger = SuperMerger(config_for(bert_family))
    with pytest.raises(ValueError, match="Task 'nli' has no examples"):
        merger.fit({"sst": family_examples(bert_family)["sst"]})
    assert merger.history == []


def test_task_without_labels(bert_family):
    examples = family_examples(bert_family)
    examples["nli"] = [{"input_ids": ex["input_ids"]} for ex in examples["nli"]]
    merger = SuperMerger(config_for(bert_family))
    with pytest.raises(ValueError, match="Task 'nli' has examples without `labels`"):
        merger.fit(examples)
    assert merger.history == []


def test_non_finite_loss(bert_family, tmp_path):
    nan_head = tmp_path / "nan_head"
    shutil.copytree(bert_family.sources["nli"], nan_head)
    state = load_file(nan_head / "model.safetensors")
    state["classifier.bias"][0] = float("nan")
    save_file(state, nan_head / "model.safetensors", metadata={"format": "pt"})
    sources = [{"task": "sst", "path": str(bert_family.sources["sst"])}, {"task": "nli", "path": str(nan_head)}]
    merger = SuperMerger(config_for(bert_family, sources, holdout_fraction=0.25))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 0 for task\(s\) \['nli'\]"):
        merger.fit(family_examples(bert_family))
    assert merger.coefficients is None


def test_existing_output_is_not_overwritten(bert_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    merger = SuperMerger(config_for(bert_family, output_dir=str(out)))
    with pytest.raises(FileExistsError, match="already holds files.*overwrite=True"):
        merger.fit(family_examples(bert_family))
    assert merger.history == []
    merger = SuperMerger(config_for(bert_family)).fit(family_examples(bert_family))
    with pytest.raises(FileExistsError, match="already holds files"):
        merger.save_pretrained(out)
    assert (out / "keep.txt").read_text() == "precious"
    merger.save_pretrained(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
