"""Every registered method runs through SuperMerger and the CLI and gives a loadable model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from supermerge_hf import METHODS, SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.data import as_examples
from supermerge_hf.learning import functional_merge
from supermerge_hf.methods import LAMBDA_GRID, ties
from supermerge_hf.sparsify import magnitude_thresholds

from .conftest import family_examples


def config_for(family, method, **kwargs) -> SuperMergeConfig:
    kwargs = {"steps": 3, "batch_size": 4, "holdout_fraction": 0.0, "learning_rate": 0.05} | kwargs
    return SuperMergeConfig(base=str(family.base), sources=family.source_list(), method=method, **kwargs)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_saves_a_loadable_model(method, bert_family, tmp_path):
    merger = SuperMerger(config_for(bert_family, method)).fit(family_examples(bert_family))
    out = merger.save_pretrained(tmp_path / method)
    x = torch.randint(1, 64, (2, 6))
    assert torch.equal(AutoModel.from_pretrained(out)(x).last_hidden_state, merger.merge_and_unload()(x).last_hidden_state)
    assert load_task_model(out, "nli").config.num_labels == 3
    assert SuperMergeConfig.from_pretrained(out).method == method


def test_data_free_merge_is_base_plus_method(bert_family):
    merger = SuperMerger(config_for(bert_family, "ties", method_kwargs={"density": 0.3, "lam": 0.7,
                                                                        "trim_scope": "task"}))
    merger.fit()
    base = load_file(bert_family.base / "model.safetensors")
    sources = [{k.removeprefix("bert."): v for k, v in load_file(p / "model.safetensors").items()}
               for p in bert_family.sources.values()]
    names = merger.plan.merged
    deltas = {n: torch.stack([s[n] - base[n] for s in sources]) for n in names}
    threshold = magnitude_thresholds(deltas.values(), 0.3)
    for n in names:
        expected = base[n] + ties(deltas[n], density=0.3, lam=0.7, trim_scope="task", threshold=threshold)
        torch.testing.assert_close(merger.result.merged[n], expected, rtol=0, atol=1e-6)


def test_lambda_auto_reports_the_grid(bert_family):
    merger = SuperMerger(config_for(bert_family, "task_arithmetic", method_kwargs={"lam": "auto"}))
    merger.fit(family_examples(bert_family))
    grid = merger.result.grid_scores
    assert list(grid) == [f"lam={lam}" for lam in LAMBDA_GRID]
    assert merger.chosen["lam"] == float(max(grid, key=grid.get).split("=")[1])


def test_auto_needs_examples(bert_family):
    merger = SuperMerger(config_for(bert_family, "ties", method_kwargs={"lam": "auto", "density": "auto"}))
    with pytest.raises(ValueError, match="has no examples"):
        merger.fit()


@pytest.mark.parametrize("method", ["adamerging", "adamerging_plus"])
def test_adamerging_lowers_entropy_without_labels(method, bert_family):
    unlabelled = {t: [{"input_ids": ex["input_ids"]} for ex in exs] for t, exs in family_examples(bert_family).items()}
    merger = SuperMerger(config_for(bert_family, method, steps=8, learning_rate=0.05, granularity="task"))
    merger.fit(unlabelled)
    values = merger.coefficients.values
    assert values.min() >= 0.0 and values.max() <= 1.0
    fm = functional_merge(merger.plan, merger.config, merger.method)  # as learned: AdaMerging++ trims first
    examples = {t: as_examples(t, ex, require_labels=False) for t, ex in unlabelled.items()}

    def mean_entropy(c):
        return sum(fm.evaluate(t, ex, c=c)["entropy"] for t, ex in examples.items())

    assert mean_entropy(values) < mean_entropy(torch.full_like(values, 0.3))


def test_adamerging_never_reads_labels(bert_family, monkeypatch):
    """Labels present in the examples are stripped before any forward pass of the entropy objective."""
    from supermerge_hf import functional

    seen = []
    forward = functional.FunctionalMerge.forward

    def spy(self, task, params, batch, c=None):  # `batch`: a list of examples or a collated dict
        seen.append("labels" in batch if isinstance(batch, dict) else any("labels" in ex for ex in batch))
        return forward(self, task, params, batch, c)

    monkeypatch.setattr(functional.FunctionalMerge, "forward", spy)
    SuperMerger(config_for(bert_family, "adamerging", steps=2)).fit(family_examples(bert_family))
    assert seen and not any(seen)
