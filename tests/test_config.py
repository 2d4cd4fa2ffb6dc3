from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.checkpoint import Checkpoint

from .conftest import family_examples


def test_config_round_trips_json_yaml_and_folder(tmp_path):
    config = SuperMergeConfig(base="org/base", sources=[{"task": "a", "path": "org/a", "revision": "v1"},
                                                        {"task": "b", "path": "./b"}],
                              granularity="block", steps=7, method="ties", method_kwargs={"density": 0.2})
    assert SuperMergeConfig.from_dict(config.to_dict()) == config
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert SuperMergeConfig.from_file(tmp_path / "c.yaml") == config
    (tmp_path / "c.json").write_text(config.to_json_string())
    assert SuperMergeConfig.from_file(tmp_path / "c.json") == config
    config.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "supermerge_config.json").is_file()
    loaded = SuperMergeConfig.from_pretrained(tmp_path / "saved")  # ./b: relative to the saved folder
    assert loaded.paths == ["org/a", str(tmp_path / "saved" / "b")]
    assert dataclasses.replace(loaded, sources=config.sources) == config


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['lr'\]"):
        SuperMergeConfig.from_dict({"base": "b", "sources": [{"task": "t", "path": "p"}], "lr": 1.0})


def test_duplicate_tasks():
    with pytest.raises(ValueError, match="Task names must be unique"):
        SuperMergeConfig(base="b", sources=[{"task": "t", "path": "p"}, {"task": "t", "path": "q"}])


def test_sharded_checkpoints_merge_like_single_files(bert_family, tmp_path):
    from transformers import AutoModel, BertForSequenceClassification

    sharded = {}
    for task, path in bert_family.sources.items():
        BertForSequenceClassification.from_pretrained(path).save_pretrained(tmp_path / task, max_shard_size="20KB")
        sharded[task] = tmp_path / task
    AutoModel.from_pretrained(bert_family.base).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    assert len(set(Checkpoint(tmp_path / "base").weight_map.values())) > 1

    def run(base, sources):
        config = SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                                  steps=2, batch_size=4, holdout_fraction=0.0)
        return SuperMerger(config).fit(family_examples(bert_family)).result.merged

    single, shards = run(bert_family.base, bert_family.sources), run(tmp_path / "base", sharded)
    assert single.keys() == shards.keys()
    for name in single:
        assert torch.equal(single[name], shards[name]), name
