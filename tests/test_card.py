"""The model card of a merge: Hub metadata, metrics, coefficient tables and the heatmap PNG."""

from __future__ import annotations

import logging
import dataclasses
import os
import re
import struct
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from supermerge_hf import SuperMergeConfig, SuperMerger, card
from supermerge_hf.card import HEATMAP_NAME, build_model_card, heatmap_table
from supermerge_hf.hub import push_folder
from supermerge_hf.results import Coefficients
from tests.hub_server import HubServer, hub_server_fixture  # noqa: F401  (fixture `hub_server`)

from .conftest import family_examples, paper

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEARN = {"steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": 0.3}


@pytest.fixture(scope="module")
def fitted(bert_family) -> SuperMerger:
    """A SuperMerge of the BERT family with a hold-out split, so that metrics are on held-out examples."""
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), **paper(**LEARN))
    return SuperMerger(config).fit(family_examples(bert_family))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_saved_card_header_metrics_and_heatmap(fitted, tmp_path):
    out = tmp_path / "merged"
    fitted.save_pretrained(str(out))
    loaded = ModelCard.load(out / "README.md")
    assert loaded.data.base_model_relation == "merge"
    assert loaded.data.library_name == "transformers"
    assert loaded.data.tags == ["merge", "supermerge"]
    assert loaded.data.base_model is None  # local folders are named in the body, never as Hub metadata
    text = loaded.text

    # metrics: one row per task, before (fine-tune) and after (merged), on the hold-out examples
    assert "| task | examples | loss fine-tune | loss merged | accuracy fine-tune | accuracy merged |" in text
    for task, m in fitted.metrics.items():
        assert m["examples"] == "holdout"
        cells = [f"{m[side][k]:.4f}" for k in ("loss", "accuracy", "entropy") for side in ("finetune", "merged")]
        assert f"| {task} | holdout ({m['count']}) | " + " | ".join(cells) + " |" in text

    # the coefficient summary and, for 39 groups, the full table
    values = fitted.coefficients.values  # (S, G)
    for i, task in enumerate(fitted.config.tasks):
        assert f"| {task} | {values[i].mean():.4f} | {values[i].min():.4f} | {values[i].max():.4f} |" in text
    row = "| `encoder.layer.1.output.dense.weight` | " + " | ".join(
        f"{fitted.coefficients[t, 'encoder.layer.1.output.dense.weight']:.4f}" for t in fitted.config.tasks) + " |"
    assert row in text and len(fitted.coefficients.groups) == 39

    # the heatmap: a real PNG in the folder, linked relatively from the card
    png = (out / HEATMAP_NAME).read_bytes()
    width, height = png_size(png)
    assert width > 100 and height > 50
    assert f"]({HEATMAP_NAME})" in text

    # the recipe block is the config (the merger's own outputs left out), and the loading snippet names the folder
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    published = SuperMergeConfig.from_dict(recipe)  # local paths relative to the merge, no output_dir
    assert published.base == os.path.relpath(fitted.config.base, out) and published.base.startswith("../")
    assert [s.path for s in published.sources] == [os.path.relpath(p, out) for p in fitted.config.paths]
    assert dataclasses.replace(published, base=fitted.config.base, sources=fitted.config.sources) == \
        dataclasses.replace(fitted.config, output_dir=None)
    assert 'AutoModel.from_pretrained("merged")' in text


def test_hub_sources_are_listed_as_base_model_with_commits(hub_server: HubServer, bert_family, tmp_path):
    shas = {name: push_folder(folder, f"user/{name}", token=False, endpoint=hub_server.url)
            for name, folder in [("base", bert_family.base), *bert_family.sources.items()]}
    config = SuperMergeConfig(base="user/base", base_revision=shas["base"], method="task_arithmetic",
                              sources=[{"task": t, "path": f"user/{t}", "revision": "main"} for t in ("sst", "nli")])
    merger = SuperMerger(config, endpoint=hub_server.url, token=False).fit()
    model_card = build_model_card(merger.result, tmp_path, name=tmp_path.name)
    model_card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == ["user/sst", "user/nli"]
    assert data.base_model_relation == "merge" and data.tags == ["merge", "supermerge", "task_arithmetic"]
    text = model_card.text
    assert f"| base | [`user/base`](https://huggingface.co/user/base) | {shas['base']} | {shas['base']} |" in text
    assert f"| sst | [`user/sst`](https://huggingface.co/user/sst) | main | {shas['sst']} |" in text
    # a data-free method: no coefficients, no metrics, no heatmap
    assert "## Learned coefficients" not in text and "## Metrics" not in text
    assert not (tmp_path / HEATMAP_NAME).exists()


def block_of(name: str) -> str:
    """Hand-written reference: a tensor's block is its name up to the first numeric part, else its first part."""
    parts = name.split(".")
    digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[: digit + 1]) if digit is not None else parts[0]


@pytest.mark.parametrize("family", ["bert_family", "llama_family", "gpt2_family"])
def test_heatmap_averages_tensors_per_block(family, request):
    family = request.getfixturevalue(family)

    def groups(granularity: str) -> list[str]:
        config = SuperMergeConfig(base=str(family.base), sources=family.source_list(), granularity=granularity)
        return SuperMerger(config).plan.groups

    tensors, blocks = groups("tensor"), groups("block")
    values = torch.linspace(-1, 1, 2 * len(tensors)).reshape(2, len(tensors))  # (S, G)
    labels, averaged = heatmap_table(Coefficients(["a", "b"], tensors, values, values, "tanh"))
    assert labels == blocks  # the same blocks as granularity="block"
    for j, block in enumerate(blocks):
        members = [g for g, name in enumerate(tensors) if block_of(name) == block]
        torch.testing.assert_close(averaged[:, j], values[:, members].mean(dim=1))
    block_values = values[:, : len(blocks)]  # (S, B)
    labels, same = heatmap_table(Coefficients(["a", "b"], blocks, block_values, block_values, "tanh"))
    assert labels == blocks and torch.equal(same, block_values)


def test_many_groups_point_to_coefficients_json(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(card, "MAX_TABLE_GROUPS", 10)
    text = build_model_card(fitted.result, tmp_path, name=tmp_path.name).text
    assert "| group |" not in text and "| sst | " in text and "[`coefficients.json`](coefficients.json)" in text


def test_without_matplotlib_the_heatmap_is_skipped(fitted, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import` raises ImportError
    with caplog.at_level(logging.INFO, logger="supermerge_hf.card"):
        text = build_model_card(fitted.result, tmp_path, name=tmp_path.name).text
    assert not (tmp_path / HEATMAP_NAME).exists() and HEATMAP_NAME not in text
    assert "matplotlib is not installed" in caplog.text
    assert "## Learned coefficients" in text
