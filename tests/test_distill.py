"""Output distillation (method.md section 9): teachers, the KL objective, `both`, unlabelled inputs, validation."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf import merger as merger_module
from supermerge_hf.data import as_examples, collate, read_examples
from supermerge_hf.distill import attach_teachers
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.objectives import TEACHER, answer_distillation, distillation_loss

from .conftest import (OVER_TASK_VECTORS, classification_examples, family_examples, lm_examples, tiny_tokenizer,
                       write_text_examples)


def make_config(family, tasks=None, **kwargs) -> SuperMergeConfig:
    """SuperMerge per tensor over the task vectors, the fine-tunes' heads, unless `kwargs` say otherwise."""
    sources = [s for s in family.source_list() if tasks is None or s["task"] in tasks]
    kwargs = {"steps": 2, "eval_every": 1, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0,
              "granularity": "tensor"} | kwargs
    if kwargs.get("method", "supermerge") == "supermerge":
        kwargs["method_kwargs"] = OVER_TASK_VECTORS | kwargs.get("method_kwargs", {})
    return SuperMergeConfig(base=str(family.base), sources=sources, **kwargs)


def inputs_of(examples: list[dict]) -> list[dict]:
    return [{k: v for k, v in ex.items() if k != "labels"} for ex in examples]


def test_distillation_loss_is_the_scaled_kl():
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    T = 2.0
    p, q = torch.softmax(teacher / T, -1), torch.softmax(student / T, -1)
    expected = T**2 * (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, T), expected)
    assert float(distillation_loss(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-6)
    # per token: padded positions (mask 0) do not count
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    real = torch.cat([distillation_loss(s[0, :2], t[0, :2], T, None)[None] * 2,
                      distillation_loss(s[1, :1], t[1, :1], T, None)[None]]).sum() / 3
    torch.testing.assert_close(distillation_loss(s, t, T, mask), real)


def test_cached_teacher_equals_the_finetune_classifier(bert_family):
    plan = SuperMerger(make_config(bert_family)).plan
    inputs = {t: as_examples(t, classification_examples(k, 7, seed=3 + i), require_labels=False)
              for i, (t, k) in enumerate(bert_family.num_labels.items())}
    attach_teachers(plan, inputs, dtype=torch.float32, batch_size=3)  # batches of 3: padding must not matter
    for task, examples in inputs.items():
        model = AutoModelForSequenceClassification.from_pretrained(bert_family.sources[task]).eval()
        for ex in examples:
            with torch.no_grad():
                direct = model(input_ids=ex["input_ids"][None]).logits[0]  # (C,)
            torch.testing.assert_close(ex[TEACHER], direct, rtol=1e-5, atol=1e-5)


def test_cached_teacher_equals_the_finetune_lm_per_token(llama_family):
    plan = SuperMerger(make_config(llama_family)).plan
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(1, 64, (n,), generator=g)} for n in (5, 8, 3)]  # unequal lengths
    attach_teachers(plan, {"math": examples}, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(llama_family.sources["math"]).eval()
    for ex in examples:
        with torch.no_grad():
            direct = model(input_ids=ex["input_ids"][None]).logits[0]  # (T, V)
        assert ex[TEACHER].shape == direct.shape
        torch.testing.assert_close(ex[TEACHER], direct, rtol=1e-5, atol=1e-5)
    before = examples[0][TEACHER]
    attach_teachers(plan, {"math": examples}, dtype=torch.float32)  # computed once: kept when present
    assert examples[0][TEACHER] is before


def test_lm_teacher_keeps_only_the_answer_positions_and_the_loss_is_unchanged(llama_family):
    plan = SuperMerger(make_config(llama_family)).plan
    g = torch.Generator().manual_seed(1)
    examples = answer_examples(1)
    attach_teachers(plan, {"math": examples}, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(llama_family.sources["math"]).eval()
    with torch.no_grad():
        full = [model(input_ids=ex["input_ids"][None]).logits[0] for ex in examples]  # (T, V) each
    for ex, logits in zip(examples, full):  # position t predicts token t + 1: the answer's tokens from t = prompt - 1
        prompt = int((ex["labels"] == -100).sum())
        torch.testing.assert_close(ex[TEACHER], logits[prompt - 1: -1], rtol=1e-5, atol=1e-5)
    student = torch.randn(3, 9, full[0].shape[-1], generator=g)  # (B, T, V) padded to the longest
    mask = torch.zeros(3, 9, dtype=torch.long)
    padded = torch.zeros_like(student)
    for k, (ex, logits) in enumerate(zip(examples, full)):
        prompt, length = int((ex["labels"] == -100).sum()), len(ex["input_ids"])
        mask[k, prompt - 1: length - 1] = 1
        padded[k, :length] = logits
    packed = collate([{"t": ex[TEACHER]} for ex in examples])["t"]  # (B, A, V)
    torch.testing.assert_close(answer_distillation(student, packed, 2.0, mask),
                               distillation_loss(student, padded, 2.0, mask), rtol=1e-5, atol=1e-6)


def answer_examples(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in ((4, 2), (2, 3), (6, 1)):  # unequal prompts and answers
        ids = torch.randint(1, 64, (prompt + answer,), generator=g)
        out.append({"input_ids": ids, "labels": torch.cat([torch.full((prompt,), -100), ids[prompt:]])})
    return out


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_lm_distillation_through_the_gradient_is_zero_at_the_finetune(llama_family, granularity):
    # the answer mask of learning's batches lines up with the teachers' packed rows: at c = 1 the one-source merge
    # is its fine-tune (KL 0, gradient 0); elsewhere the KL is positive
    plan = SuperMerger(make_config(llama_family, ["math"], granularity=granularity)).plan
    examples = answer_examples(2)
    attach_teachers(plan, {"math": examples}, dtype=torch.float32)
    fm = FunctionalMerge(plan, dtype=torch.float32)
    ones = torch.ones(1, len(plan.groups))
    grad, losses = fm.coefficient_grad(ones, {"math": examples}, {"math": 1.0}, "distill", temperature=2.0)
    assert float(losses["math"]) < 1e-9 and float(grad.abs().max()) < 1e-6
    _, losses = fm.coefficient_grad(ones * 0.5, {"math": examples}, {"math": 1.0}, "distill", temperature=2.0)
    assert float(losses["math"]) > 1e-5


def test_distillation_without_unlabelled_inputs_warns(bert_family, caplog):
    examples = family_examples(bert_family, n=4)
    config = make_config(bert_family, steps=1, method_kwargs={"objective": "distill", "temperature": 2.0})
    with caplog.at_level(logging.WARNING, logger="supermerge_hf.learning"):
        SuperMerger(config).fit(examples)
    assert "fit(unlabelled={task: inputs})" in caplog.text
    caplog.clear()
    unlabelled = {t: inputs_of(ex) for t, ex in family_examples(bert_family, n=8).items()}
    with caplog.at_level(logging.WARNING, logger="supermerge_hf.learning"):
        SuperMerger(config).fit(examples, unlabelled=unlabelled)
        SuperMerger(make_config(bert_family, steps=1, method_kwargs={"objective": "labels"})).fit(examples)  # no KL
    assert "unlabelled" not in caplog.text


def test_answer_distillation_edges():
    logits, teacher = torch.randn(2, 4, 5), torch.randn(2, 1, 5)
    assert float(answer_distillation(logits, teacher[:, :0], 2.0, torch.zeros(2, 4))) == 0.0  # every answer cut off
    with pytest.raises(ValueError, match="2 answer positions but its teacher logits only 1"):
        answer_distillation(logits, teacher, 2.0, torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]))


def test_distill_moves_a_single_source_merge_towards_its_finetune(bert_family):
    examples = {"sst": classification_examples(2, 16, seed=0)}
    config = make_config(bert_family, ["sst"], steps=30, eval_every=10, batch_size=8, learning_rate=0.1,
                         method_kwargs={"objective": "distill", "temperature": 2.0})
    merger = SuperMerger(config).fit(examples)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    inputs = {"sst": as_examples("sst", inputs_of(examples["sst"]), require_labels=False)}
    attach_teachers(merger.plan, inputs, dtype=torch.float32)
    batch = collate(inputs["sst"])
    teacher = batch.pop(TEACHER)

    def kl(c: torch.Tensor) -> float:
        return float(distillation_loss(fm.forward("sst", fm.params(c), batch).logits, teacher, 2.0))

    start = kl(torch.full_like(merger.coefficients.values, 0.3))
    assert kl(merger.coefficients.values) < 0.5 * start
    assert float(merger.coefficients.values.mean()) > 0.3  # towards c = 1, the fine-tune itself
    assert [h["train"] for h in merger.history[1:]][-1]["sst"] < merger.history[1]["train"]["sst"]


def test_both_is_the_weighted_sum_of_the_two_objectives(bert_family):
    examples = family_examples(bert_family, n=4)
    unlabelled = {t: inputs_of(ex) for t, ex in family_examples(bert_family, n=12).items()}
    unlabelled = {t: ex[4:8] for t, ex in unlabelled.items()}  # 4 others: with the 4 train inputs, one batch of 8
    config = make_config(bert_family, steps=1, batch_size=8, learning_rate=1e-3,
                         method_kwargs={"objective": "both", "distill_weight": 0.3})
    merger = SuperMerger(config).fit(examples, unlabelled=unlabelled)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    labelled = {t: as_examples(t, ex) for t, ex in examples.items()}
    pool = {t: inputs_of(labelled[t]) + as_examples(t, unlabelled[t], require_labels=False) for t in labelled}
    attach_teachers(merger.plan, pool, dtype=torch.float32)
    c0 = torch.full((2, len(merger.plan.groups)), 0.3)
    ones = {t: 1.0 for t in labelled}
    grad_labels, ce = fm.coefficient_grad(c0, labelled, ones)  # whole sets: the mean does not depend on the order
    grad_distill, kl = fm.coefficient_grad(c0, pool, ones, "distill")
    for task in labelled:
        expected = 0.7 * float(ce[task]) + 0.3 * float(kl[task])
        assert merger.history[-1]["train"][task] == pytest.approx(expected, rel=1e-4)  # teachers batched otherwise
    grad = 0.7 * grad_labels + 0.3 * grad_distill
    moved = merger.coefficients.raw - torch.atanh(c0)
    big = grad.abs() > 1e-4  # Adam's first step: -lr * sign(grad) where eps is negligible
    assert big.any() and torch.equal(torch.sign(moved[big]), -torch.sign(grad[big]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"objective": "distil"}, "objective.*one of"),
    ({"objective": "distill", "temperature": 0.0}, "temperature"),
    ({"objective": "distill", "temperature": -1}, "temperature"),
    ({"objective": "distill", "temperature": "hot"}, "temperature.*number"),
    ({"objective": "both", "distill_weight": 1.5}, "distill_weight"),
])
def test_config_refuses_a_bad_objective_or_temperature_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):  # the base does not exist: nothing was read
        SuperMergeConfig(base="/nowhere/base", sources=[{"task": "a", "path": "/nowhere/a"}], method_kwargs=kwargs)
    config = SuperMergeConfig(base="/nowhere/base", sources=[{"task": "a", "path": "/nowhere/a"}],
                              method_kwargs={"objective": "distill", "temperature": "2"})
    assert config.method_kwargs == {"objective": "distill", "temperature": 2.0, "distill_weight": 0.5,
                                    "start": "auto", "start_lam": "auto", "density": 0.2, "refit_heads": 200,
                                    "refit_lr": 1e-2}
    assert SuperMergeConfig.from_dict(json.loads(config.to_json_string())).method_kwargs == config.method_kwargs


@pytest.mark.parametrize("method", [{"method_kwargs": {"objective": "labels"}},
                                    {"method": "ties", "method_kwargs": {"lam": 0.5}}])
def test_unlabelled_inputs_for_an_objective_that_ignores_them_are_refused(bert_family, method, monkeypatch):
    monkeypatch.setattr(merger_module, "learn", lambda *a, **k: pytest.fail("learning started"))
    merger = SuperMerger(make_config(bert_family, **method))
    with pytest.raises(ValueError, match="`unlabelled` inputs are read only by objectives without labels"):
        merger.fit(family_examples(bert_family), unlabelled={"sst": [{"input_ids": [1, 2, 3]}]})


def test_unlabelled_inputs_in_every_accepted_form(bert_family, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is an optional input type")
    from torch.utils.data import DataLoader

    write_text_examples(tmp_path / "nli.jsonl", 5, num_labels=3, seed=0)
    (tmp_path / "nli.jsonl").write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n"
                                                for line in (tmp_path / "nli.jsonl").read_text().splitlines()))
    nli = read_examples(tmp_path / "nli.jsonl", tiny_tokenizer(), label_field=None)  # no `label` field at all
    sst = [{"input_ids": list(range(1, 7)), "attention_mask": [1] * 6} for _ in range(3)]
    forms = {
        "list of dicts, labels ignored": {"sst": [ex | {"labels": 1} for ex in sst], "nli": nli},
        "datasets.Dataset": {"sst": datasets.Dataset.from_list(sst)},
        "DataLoader": {"sst": DataLoader(as_examples("sst", sst, require_labels=False), batch_size=2,
                                         collate_fn=collate)},
    }
    seen, learn = [], merger_module.learn
    monkeypatch.setattr(merger_module, "learn", lambda plan, cfg, m, splits, *a, **k: seen.append(splits) or learn(
        plan, cfg, m, splits, *a, **k))
    examples = family_examples(bert_family, n=8)
    for name, unlabelled in forms.items():
        config = make_config(bert_family, steps=1, holdout_fraction=0.25, method_kwargs={"objective": "distill"})
        SuperMerger(config).fit(examples, unlabelled=unlabelled)
        splits = seen.pop()
        for task, split in splits.items():
            given = as_examples(task, unlabelled[task], require_labels=False) if task in unlabelled else []
            assert len(split.train) == 6 and len(split.holdout) == 2, name
            assert len(split.unlabelled) == len(split.train) + len(given), name  # the hold-out's inputs never
            assert all("labels" not in ex and TEACHER in ex for ex in split.unlabelled), name
            for ex, ref in zip(split.unlabelled, [*split.train, *given]):
                assert torch.equal(ex["input_ids"], torch.as_tensor(ref["input_ids"])), name


def test_adamerging_reads_unlabelled_inputs_too(bert_family):
    examples = family_examples(bert_family, n=4)
    unlabelled = {"sst": [{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7]}]}
    merger = SuperMerger(make_config(bert_family, method="adamerging", steps=1)).fit(examples, unlabelled=unlabelled)
    assert merger.coefficients is not None


def test_hierarchical_distill_computes_each_teacher_once(llama_family, monkeypatch):
    from supermerge_hf import distill

    built, original = [], distill.FunctionalMerge
    monkeypatch.setattr(distill, "FunctionalMerge", lambda plan, **k: built.append(plan.tasks) or original(plan, **k))
    options = {"group_size": 2, "grouping": "explicit", "groups": [["code"], ["math", "chat"]]}
    config = make_config(llama_family, hierarchical=options, method_kwargs={"objective": "distill"})
    merger = SuperMerger(config).fit(family_examples(llama_family, n=6),
                                     unlabelled={"code": inputs_of(lm_examples(3, seed=9))})
    assert sorted(built) == [["chat"], ["code"], ["math"]]  # two levels, each task's own fine-tune once
    assert len(merger.levels) == 2
