"""SuperMerge's `start` (constant, task_arithmetic, ties, tsv_m) and `refit_heads` (issue 15.3): step 0 of a TIES /
TSV-M start is that merge, the gradient over the components is exact, heads refit on the merged body, save -> reload."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.data import as_examples, collate
from supermerge_hf.distill import attach_teachers
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.heads import use_heads
from supermerge_hf.learning import functional_merge
from supermerge_hf.objectives import TEACHER, distillation_loss
from supermerge_hf.results import transform
from supermerge_hf.sparsify import magnitude_thresholds, ties_components
from supermerge_hf.spectral import tsv_components

from .conftest import classification_examples, coefficient, family_examples, lm_examples, paper


def make_config(family, *, method_kwargs=None, **kwargs) -> SuperMergeConfig:
    kwargs = {"steps": 1, "eval_every": 1, "batch_size": 4, "learning_rate": 1e-9, "holdout_fraction": 0.0,
              "granularity": "tensor"} | kwargs
    return SuperMergeConfig(base=str(family.base), sources=family.source_list(), method="supermerge",
                            **paper(method_kwargs=method_kwargs or {}, **kwargs))


def data_free(family, method: str, **method_kwargs) -> SuperMerger:
    config = SuperMergeConfig(base=str(family.base), sources=family.source_list(), method=method,
                              method_kwargs=method_kwargs)
    return SuperMerger(config).fit(family_examples(family))


def canonical(folder) -> dict[str, torch.Tensor]:
    return {k.removeprefix("bert."): v for k, v in load_file(folder / "model.safetensors").items()}


# ---------------------------------------------------------------- start: step 0 is the data-free merge

@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize(("start", "reference"), [
    ("ties", {"method": "ties", "density": 0.2, "trim_scope": "task"}),
    ("tsv_m", {"method": "tsv_m"}),
])
def test_step_zero_is_the_data_free_merge(bert_family, granularity, start, reference):
    kwargs = {"start": start, "start_lam": 0.7} | ({"density": 0.2} if start == "ties" else {})
    merger = SuperMerger(make_config(bert_family, method_kwargs=kwargs, granularity=granularity))
    merger.fit(family_examples(bert_family))  # one Adam step of 1e-9: the merge of step 0
    method, options = reference["method"], {k: v for k, v in reference.items() if k != "method"}
    expected = data_free(bert_family, method, lam=0.7, **options).merged_tensors
    assert merger.merged_tensors.keys() == expected.keys()
    for name, tensor in merger.merged_tensors.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(merger.coefficients.values, torch.full_like(merger.coefficients.values, 0.3),
                               rtol=0, atol=1e-6)  # c starts at init_coefficient over the scaled components


@pytest.mark.parametrize(("start", "method", "extra"), [("ties", "ties", {"density": 0.2, "trim_scope": "task"}),
                                                        ("tsv_m", "tsv_m", {})])
def test_auto_lambda_is_the_one_the_data_free_method_picks(bert_family, start, method, extra):
    merger = SuperMerger(make_config(bert_family, method_kwargs={"start": start}, holdout_fraction=0.25))
    merger.fit(family_examples(bert_family))
    baseline = data_free(bert_family, method, lam="auto", **extra)
    assert merger.chosen == {"start_lam": baseline.chosen["lam"]}  # the same grid, the same labelled examples
    step0 = SuperMerger(make_config(bert_family, method_kwargs={"start": start, "start_lam": merger.chosen["start_lam"]},
                                    steps=1)).fit(family_examples(bert_family))
    for name, tensor in step0.merged_tensors.items():
        torch.testing.assert_close(tensor, baseline.merged_tensors[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("start", ["ties", "tsv_m"])
def test_gradient_over_the_components_equals_autograd(bert_family, granularity, start):
    config = make_config(bert_family, method_kwargs={"start": start, "start_lam": 0.8}, granularity=granularity)
    merger = SuperMerger(config)
    plan = merger.plan
    fm = functional_merge(plan, config, merger.method)
    # reference: the components written out from the checkpoints, then autograd through theta_m(c(w))
    base = canonical(bert_family.base)
    sources = [canonical(p) for p in bert_family.sources.values()]
    deltas = {n: torch.stack([s[n] - base[n] for s in sources]) for n in plan.merged}  # (S, *shape)
    if start == "ties":
        threshold = magnitude_thresholds(deltas.values(), 0.2)  # (S,): over the whole task vector
        parts = {n: ties_components(d, threshold) for n, d in deltas.items()}
    else:
        parts = {n: tsv_components(d) if d.dim() == 3 else d / len(d) for n, d in deltas.items()}
    parts = {n: p * (0.8 / 0.3) for n, p in parts.items()}  # λ / init_coefficient
    S, G = plan.num_sources, len(plan.groups)
    w = (0.4 * torch.randn(S, G, generator=torch.Generator().manual_seed(0))).requires_grad_()
    c = transform(w, "tanh")
    merged = {n: base[n] + sum(coefficient(c, i, plan.group_index[n], p[i]) * p[i] for i in range(S))
              for n, p in parts.items()}
    examples = {t: as_examples(t, ex) for t, ex in family_examples(bert_family, n=6).items()}
    scale = {"sst": 1.0, "nli": 0.5}
    loss = sum(scale[t] * fm.forward(t, merged, batch).loss for t, batch in examples.items())
    (reference,) = torch.autograd.grad(loss, [w])
    grad_c, _ = fm.coefficient_grad(c.detach(), examples, scale)  # one backward, <dL/dtheta_m, component_i>
    torch.testing.assert_close((1 - torch.tanh(w.detach()) ** 2) * grad_c, reference, rtol=1e-4, atol=1e-7)
    assert reference.abs().max() > 0


def test_saved_start_and_reload_rebuild_the_merge(bert_family, tmp_path):
    config = make_config(bert_family, method_kwargs={"start": "ties"}, steps=3, learning_rate=0.05,
                         holdout_fraction=0.25, granularity="row", output_dir=str(tmp_path / "merged"))
    merger = SuperMerger(config).fit(family_examples(bert_family))
    merger.save_pretrained()
    saved = json.loads((tmp_path / "merged" / "supermerge_config.json").read_text())
    assert saved["method_kwargs"]["start"] == "ties"
    assert saved["merge_info"]["chosen"] == merger.chosen and "start_lam" in merger.chosen
    again = SuperMerger.from_pretrained(tmp_path / "merged")  # rebuilt from the sources and the saved λ
    assert again.config.method_kwargs["start_lam"] == merger.chosen["start_lam"]
    for name, tensor in merger.merged_tensors.items():
        assert torch.equal(again.merged_tensors[name], tensor), name


def test_init_from_task_arithmetic_is_start_task_arithmetic(bert_family):
    old = make_config(bert_family, init_from_task_arithmetic=True)  # as saved configs and old code spell it
    assert old.method_kwargs["start"] == "task_arithmetic" and old.init_from_task_arithmetic is False
    assert SuperMergeConfig.from_dict(old.to_dict()).method_kwargs["start"] == "task_arithmetic"
    assert make_config(bert_family).method_kwargs["start"] == "constant"
    with pytest.raises(ValueError, match="contradicts `method_kwargs.start`"):
        make_config(bert_family, init_from_task_arithmetic=True, method_kwargs={"start": "ties"})
    new = SuperMerger(make_config(bert_family, method_kwargs={"start": "task_arithmetic"})).fit(
        family_examples(bert_family))
    again = SuperMerger(old).fit(family_examples(bert_family))
    assert torch.equal(new.coefficients.values, again.coefficients.values)
    assert float(new.coefficients.values.mean()) != pytest.approx(0.3, abs=1e-3)  # the grid's λ, not the constant


def test_start_errors(bert_family):
    with pytest.raises(ValueError, match="a flat merge"):
        SuperMerger(make_config(bert_family, method_kwargs={"start": "tsv_m"}, hierarchical={"group_size": 2}))
    with pytest.raises(ValueError, match="init_coefficient > 0"):
        SuperMerger(make_config(bert_family, method_kwargs={"start": "ties"}, init_coefficient=0.0))
    with pytest.raises(ValueError, match="does not stream"):
        SuperMerger(make_config(bert_family, method_kwargs={"start": "tsv_m"}, streaming=True))
    with pytest.raises(ValueError, match="must be one of"):
        make_config(bert_family, method_kwargs={"start": "dare"})


# ---------------------------------------------------------------- heads refit on the merged body

def distill_loss(merger: SuperMerger, task: str, inputs: list[dict], heads: dict | None) -> float:
    """T² KL of `task`'s fine-tune vs the merge (body `merger.merged_tensors`, the given or the fine-tune's head)."""
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    use_heads(fm, heads or {})
    examples = as_examples(task, inputs, require_labels=False)
    attach_teachers(merger.plan, {task: examples}, dtype=torch.float32)
    batch = collate(examples)
    teacher = batch.pop(TEACHER)
    logits = fm.forward(task, merger.merged_tensors, batch).logits
    return float(distillation_loss(logits, teacher, merger.config.method_kwargs["temperature"]))


def test_refit_lowers_the_distillation_loss_and_keeps_the_body(bert_family):
    examples = family_examples(bert_family, n=12)
    unlabelled = {t: [{"input_ids": ex["input_ids"]} for ex in classification_examples(k, 12, seed=7 + i)]
                  for i, (t, k) in enumerate(bert_family.num_labels.items())}
    plain = SuperMerger(make_config(bert_family, steps=2, learning_rate=0.05)).fit(examples)
    refit = SuperMerger(make_config(bert_family, steps=2, learning_rate=0.05,
                                    method_kwargs={"refit_heads": 30, "refit_lr": 1e-2})).fit(
        examples, unlabelled=unlabelled)
    for name, tensor in plain.merged_tensors.items():  # the body: the same merge, untouched by refitting
        assert torch.equal(refit.merged_tensors[name], tensor), name
    assert sorted(refit.result.heads) == ["nli", "sst"]
    for task in bert_family.num_labels:
        assert refit.result.heads[task].keys() == {"classifier.weight", "classifier.bias"}
        inputs = [{"input_ids": ex["input_ids"]} for ex in examples[task]] + unlabelled[task]  # what it learned on
        before, after = distill_loss(refit, task, inputs, None), distill_loss(refit, task, inputs, refit.result.heads)
        assert after < 0.8 * before, (task, before, after)
    # evaluate runs each task with its refit head
    test = {t: classification_examples(k, 8, seed=50 + i) for i, (t, k) in enumerate(bert_family.num_labels.items())}
    fm = FunctionalMerge(refit.plan, dtype=torch.float32)
    use_heads(fm, refit.result.heads)
    for task, metrics in refit.evaluate(test).items():
        expected = fm.evaluate(task, as_examples(task, test[task]), params=refit.merged_tensors)
        assert metrics == pytest.approx(expected, rel=1e-6)


def test_refit_heads_save_reload_identical_logits(bert_family, tmp_path):
    config = make_config(bert_family, steps=2, learning_rate=0.05, output_dir=str(tmp_path / "merged"),
                         method_kwargs={"refit_heads": 10, "refit_lr": 1e-2})
    merger = SuperMerger(config).fit(family_examples(bert_family, n=8))
    merger.save_pretrained()
    saved = json.loads((tmp_path / "merged" / "supermerge_config.json").read_text())
    assert saved["method_kwargs"]["refit_heads"] == 10
    again = SuperMerger.from_pretrained(tmp_path / "merged")
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 64, (3, 7), generator=g)
    for task, head in merger.result.heads.items():
        assert all(torch.equal(again.result.heads[task][k], v) for k, v in head.items())
        fm, fm_again = (FunctionalMerge(m.plan, dtype=torch.float32) for m in (merger, again))
        use_heads(fm, merger.result.heads)
        use_heads(fm_again, again.result.heads)
        batch = {"input_ids": input_ids}
        logits = fm.forward(task, merger.merged_tensors, batch).logits
        assert torch.equal(fm_again.forward(task, again.merged_tensors, batch).logits, logits)
        model = load_task_model(tmp_path / "merged", task)  # plain transformers: the saved body and refit head
        assert type(model).__name__ == "BertForSequenceClassification"
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=input_ids).logits, logits, rtol=1e-5, atol=1e-5)
        original = FunctionalMerge(merger.plan, dtype=torch.float32).forward(task, merger.merged_tensors, batch).logits
        assert not torch.allclose(original, logits, atol=1e-4)  # the refit head is another head


def test_refit_heads_without_a_head_logs_and_skips(llama_family, caplog):
    config = SuperMergeConfig(base=str(llama_family.base), sources=llama_family.source_list(), steps=1,
                              batch_size=4, holdout_fraction=0.0, method_kwargs={"refit_heads": 5})
    examples = {t: lm_examples(4, seed=i) for i, t in enumerate(llama_family.sources)}
    with caplog.at_level(logging.INFO, logger="supermerge_hf.heads"):
        merger = SuperMerger(config).fit(examples)
    assert merger.result.heads == {}
    assert "has no head of its own" in caplog.text


def test_refit_reads_unlabelled_inputs_even_with_labels_objective(bert_family):
    unlabelled = {"sst": [{"input_ids": [5, 6, 7]}]}
    with pytest.raises(ValueError, match="`unlabelled` inputs are read only"):
        SuperMerger(make_config(bert_family)).fit(family_examples(bert_family), unlabelled=unlabelled)
    merger = SuperMerger(make_config(bert_family, method_kwargs={"refit_heads": 2}))
    merger.fit(family_examples(bert_family, n=4), unlabelled=unlabelled)
    assert sorted(merger.result.heads) == ["nli", "sst"]


# ---------------------------------------------------------------- the default: `start: auto`, heads refit

def test_default_learns_over_tsv_m_components_of_full_finetunes_and_refits_heads(bert_family, tmp_path):
    where = {"base": str(bert_family.base), "sources": bert_family.source_list(), "steps": 2, "eval_every": 1,
             "batch_size": 4, "holdout_fraction": 0.0}
    config = SuperMergeConfig(**where, output_dir=str(tmp_path / "merged"))
    assert config.method_kwargs["start"] == "auto" and config.method_kwargs["refit_heads"] == 200
    for memory in ({"hierarchical": {"group_size": 2}}, {"streaming": True}):  # these learn over the task vectors
        assert SuperMerger(SuperMergeConfig(**where, **memory)).config.method_kwargs["start"] == "constant"
    merger = SuperMerger(config)
    assert merger.config.method_kwargs["start"] == "tsv_m"  # full fine-tunes, flat
    merger.fit(family_examples(bert_family, n=8)).save_pretrained()
    saved = json.loads((tmp_path / "merged" / "supermerge_config.json").read_text())
    assert saved["method_kwargs"]["start"] == "tsv_m" and saved["method_kwargs"]["refit_heads"] == 200
    card = (tmp_path / "merged" / "README.md").read_text()  # the card says what the coefficients weight
    assert "started from the tsv_m merge" in card and "`sst`, `nli` were refit" in card
    again = SuperMerger.from_pretrained(tmp_path / "merged")  # rebuilt from the sources: the same merge and heads
    assert all(torch.equal(again.merged_tensors[n], t) for n, t in merger.merged_tensors.items())
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    use_heads(fm, merger.result.heads)
    input_ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(4))
    for task in bert_family.num_labels:
        head = merger.result.heads[task]
        assert not torch.equal(head["classifier.weight"],
                               merger.plan.task_specs[task].read_tensor("classifier.weight"))  # refit
        assert all(torch.equal(again.result.heads[task][k], v) for k, v in head.items())
        with torch.no_grad():
            expected = fm.forward(task, merger.merged_tensors, {"input_ids": input_ids}).logits
            reloaded = load_task_model(tmp_path / "merged", task)(input_ids=input_ids).logits
        torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-6)


def test_a_merge_saved_before_start_and_refit_existed_reloads_as_it_ran(tmp_path):
    """A saved config without `start` / `refit_heads` learned over the task vectors with the fine-tunes' heads: it
    must not be rebuilt with today's defaults (a recipe without them gets the defaults)."""
    old = {"base": "/nowhere/base", "sources": [{"task": "a", "path": "/nowhere/a"}], "granularity": "tensor",
           "method_kwargs": {"objective": "labels", "temperature": 1.0, "distill_weight": 0.5}}
    (tmp_path / "supermerge_config.json").write_text(json.dumps(old))
    kwargs = SuperMergeConfig.from_pretrained(tmp_path).method_kwargs
    assert kwargs["start"] == "constant" and kwargs["refit_heads"] == 0 and kwargs["objective"] == "labels"
    (tmp_path / "recipe.json").write_text(json.dumps(old))
    recipe = SuperMergeConfig.from_file(tmp_path / "recipe.json").method_kwargs
    assert recipe["start"] == "auto" and recipe["refit_heads"] == 200
    (tmp_path / "supermerge_config.json").write_text(json.dumps(old | {"init_from_task_arithmetic": True}))
    assert SuperMergeConfig.from_pretrained(tmp_path).method_kwargs["start"] == "task_arithmetic"  # the old flag
    ties = dict(old, method="ties", method_kwargs={"lam": 0.5})  # another method's kwargs are left as saved
    (tmp_path / "supermerge_config.json").write_text(json.dumps(ties))
    assert SuperMergeConfig.from_pretrained(tmp_path).method_kwargs["lam"] == 0.5
