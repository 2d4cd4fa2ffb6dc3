"""Exact properties of the merge: the formula, its limits, its gradient, and save -> reload."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from supermerge_hf import Coefficients, SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.data import as_examples
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.results import transform

from .conftest import family_examples, paper


def make_merger(family, **kwargs) -> SuperMerger:
    kwargs = {"steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0,
              "init_from_task_arithmetic": False} | kwargs
    return SuperMerger(SuperMergeConfig(base=str(family.base), sources=family.source_list(), **paper(**kwargs)))


def apply(merger: SuperMerger, values: torch.Tensor) -> SuperMerger:
    plan = merger.plan
    return merger.apply_coefficients(Coefficients.from_values(plan.source_names, plan.groups, values,
                                                              merger.config.transform))


def raw_state(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def canonical_state(folder, prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix + "."): v for k, v in raw_state(folder).items()}


@pytest.mark.parametrize("granularity", ["tensor", "block", "task"])
def test_merged_equals_formula(bert_family, granularity):
    merger = make_merger(bert_family, granularity=granularity).fit(family_examples(bert_family))
    base = canonical_state(bert_family.base, "bert")
    sources = [canonical_state(p, "bert") for p in bert_family.sources.values()]
    c = merger.coefficients.values  # (S, G)
    assert c.shape == (2, {"tensor": 39, "block": 4, "task": 1}[granularity])
    assert not torch.equal(c, torch.full_like(c, 0.3)), "the coefficients should have moved"
    for name, merged in merger.merged_tensors.items():
        g = merger.plan.group_index[name]
        expected = base[name] + sum(c[i, g] * (src[name] - base[name]) for i, src in enumerate(sources))
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    assert sorted(merger.plan.task_specific["sst"]) == ["classifier.bias", "classifier.weight"]


@pytest.mark.parametrize("streaming", [False, True])
def test_bfloat16_merge_of_full_finetunes(bert_family, streaming):
    """In bfloat16 the merge is the formula on the bfloat16 weights, up to bfloat16 rounding of the sum."""
    merger = make_merger(bert_family, dtype="bfloat16", streaming=streaming).fit(family_examples(bert_family))
    base = {n: t.to(torch.bfloat16).float() for n, t in canonical_state(bert_family.base, "bert").items()}
    sources = [{n: t.to(torch.bfloat16).float() for n, t in canonical_state(p, "bert").items()}
               for p in bert_family.sources.values()]
    c = merger.coefficients.values
    for name, merged in merger.merged_tensors.items():
        assert merged.dtype == torch.bfloat16, name
        g = merger.plan.group_index[name]
        change = sum(c[i, g] * (src[name] - base[name]) for i, src in enumerate(sources))
        error = (merged.float() - base[name] - change).abs()
        assert float(error.max()) <= 2**-7 * float((base[name] + change).abs().max()) + 1e-6, name


def test_block_groups_follow_the_model(bert_family):
    merger = make_merger(bert_family, granularity="block")
    assert merger.plan.groups == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]


def test_transform_none_zero_is_base_and_one_hot_is_source(llama_family):
    merger = make_merger(llama_family, transform="none", init_coefficient=0.0)
    S, G = merger.plan.num_sources, len(merger.plan.groups)
    apply(merger, torch.zeros(S, G))
    base = canonical_state(llama_family.base, "model")
    for name, merged in merger.merged_tensors.items():
        assert torch.equal(merged, base[name]), name
    for i, path in enumerate(llama_family.sources.values()):
        one_hot = torch.zeros(S, G)
        one_hot[i] = 1.0
        apply(merger, one_hot)
        source = canonical_state(path, "model")
        for name, merged in merger.merged_tensors.items():
            torch.testing.assert_close(merged, source[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["tanh", "none"])
def test_analytic_gradient_equals_autograd(bert_family, kind):
    merger = make_merger(bert_family, transform=kind)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    examples = {t: as_examples(t, ex) for t, ex in family_examples(bert_family, n=6).items()}
    S, G = merger.plan.num_sources, len(merger.plan.groups)
    w = (0.4 * torch.randn(S, G, generator=torch.Generator().manual_seed(0))).requires_grad_()
    scale = {"sst": 1.0, "nli": 0.5}
    # reference: autograd through theta_m(c(w)) and the S task vectors
    c = transform(w, kind)
    merged = {n: fm.base[n] + torch.tensordot(c[:, merger.plan.group_index[n]], d.dense(), dims=1)
              for n, d in fm.deltas.items()}
    loss = sum(scale[t] * fm.forward(t, merged, batch).loss for t, batch in examples.items())
    (reference,) = torch.autograd.grad(loss, [w])
    # analytic: one backward through the merged model, then <dL/dtheta_m, tau> and c'(w)
    grad_c, _ = fm.coefficient_grad(transform(w, kind).detach(), examples, scale)
    c_prime = 1 - torch.tanh(w.detach()) ** 2 if kind == "tanh" else torch.ones_like(w)
    torch.testing.assert_close(c_prime * grad_c, reference, rtol=1e-4, atol=1e-7)
    assert reference.abs().max() > 0


def test_learning_step_follows_the_gradient(bert_family):
    """One Adam step moves each w against the sign of the exact gradient."""
    examples = family_examples(bert_family, n=4)
    merger = make_merger(bert_family, steps=1, holdout_fraction=0.0, batch_size=4, learning_rate=1e-3)
    merger.fit(examples)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    w0 = torch.full((2, len(merger.plan.groups)), float(torch.atanh(torch.tensor(0.3))))
    batches = {t: as_examples(t, ex) for t, ex in examples.items()}
    # the sampler reshuffles but a batch of all 4 examples gives the same mean loss
    grad_c, _ = fm.coefficient_grad(torch.tanh(w0), batches, {"sst": 1.0, "nli": 1.0})
    moved = merger.coefficients.raw - w0
    big = grad_c.abs() > 1e-4  # where Adam's eps (1e-8) is negligible
    assert torch.equal(torch.sign(moved[big]), -torch.sign(grad_c[big]))
    torch.testing.assert_close(moved[big].abs(), torch.full_like(moved[big], 1e-3), rtol=1e-2, atol=0)


def test_deterministic_for_a_seed(bert_family):
    examples = family_examples(bert_family)
    a = make_merger(bert_family, seed=3).fit(examples).coefficients.values
    b = make_merger(bert_family, seed=3).fit(examples).coefficients.values
    assert torch.equal(a, b)


def test_holdout_selection_reports_final_and_selected(bert_family):
    merger = make_merger(bert_family, steps=6, eval_every=2, holdout_fraction=0.25).fit(family_examples(bert_family))
    scores = {h["step"]: h["score"] for h in merger.history}
    assert sorted(scores) == [0, 2, 4, 6]
    assert merger.selected_step == min(scores, key=scores.get)
    assert merger.last_coefficients is not None
    if merger.selected_step != 6:  # the kept coefficients are the selected step's, not the last step's
        assert not torch.equal(merger.coefficients.values, merger.last_coefficients.values)


def test_save_and_reload_bert_heads(bert_family, tmp_path):
    merger = make_merger(bert_family).fit(family_examples(bert_family))
    out = merger.save_pretrained(tmp_path / "merged")
    x = torch.randint(1, 64, (3, 7))
    body = AutoModel.from_pretrained(out)
    assert torch.equal(body(x).last_hidden_state, merger.merge_and_unload()(x).last_hidden_state)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    merged = fm.params(merger.coefficients.values)
    for task, k in bert_family.num_labels.items():
        model = load_task_model(out, task)
        assert model.config.num_labels == k
        expected = fm.forward(task, merged, [{"input_ids": row} for row in x], merger.coefficients.values).logits
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "merged" / "heads").iterdir()) == ["nli", "sst"]
    card = (tmp_path / "merged" / "README.md").read_text()
    sst = os.path.relpath(bert_family.sources["sst"], tmp_path / "merged")  # relative: no path of this machine
    assert "base_model_relation: merge" in card and f"`{sst}`" in card and str(tmp_path) not in card


@pytest.mark.parametrize("family_name", ["llama_family", "gpt2_family"])
def test_save_and_reload_causal_lm(family_name, request, tmp_path):
    family = request.getfixturevalue(family_name)
    merger = make_merger(family).fit(family_examples(family))
    out = merger.save_pretrained(tmp_path / "merged")
    x = torch.randint(1, 64, (2, 8))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded(x).logits, merger.merge_and_unload()(x).logits)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    task = next(iter(family.sources))
    c = merger.coefficients.values
    expected = fm.forward(task, fm.params(c), [{"input_ids": r} for r in x], c).logits
    torch.testing.assert_close(reloaded(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(merger.plan.task_specific.values())


def test_tied_embeddings_merged_once(gpt2_family):
    merger = make_merger(gpt2_family)
    assert "wte.weight" in merger.plan.merged
    assert not any("lm_head" in n for n in merger.plan.merged)
    model = merger.fit(family_examples(gpt2_family)).merge_and_unload()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, merger.merged_tensors["wte.weight"])


def test_streaming_equals_flat(bert_family):
    """Streaming re-reads task vectors from disk: same merged tensors and the same exact gradient as flat."""
    examples = family_examples(bert_family)
    flat = make_merger(bert_family, seed=5).fit(examples)
    streamed = make_merger(bert_family, seed=5, streaming=True).fit(examples)
    # equal up to float rounding (a tensordot over the stack vs a sum over sources read one by one), which Adam's
    # g / sqrt(v) enlarges where a gradient is near 0; the gradients themselves are compared tightly below
    torch.testing.assert_close(flat.coefficients.raw, streamed.coefficients.raw, rtol=0, atol=1e-4)
    apply(streamed, flat.coefficients.values)
    for name, tensor in flat.merged_tensors.items():
        torch.testing.assert_close(tensor, streamed.merged_tensors[name], rtol=1e-5, atol=1e-6)
    fm_flat = FunctionalMerge(flat.plan, dtype=torch.float32)
    fm_stream = FunctionalMerge(flat.plan, dtype=torch.float32, streaming=True)
    assert fm_flat.deltas[name].stacked is not None and fm_stream.deltas[name].stacked is None
    batches = {t: as_examples(t, ex) for t, ex in family_examples(bert_family, n=5).items()}
    c = torch.tanh(0.3 * torch.randn(2, len(flat.plan.groups), generator=torch.Generator().manual_seed(1)))
    scale = {"sst": 1.0, "nli": 1.0}
    torch.testing.assert_close(fm_stream.coefficient_grad(c, batches, scale)[0],
                               fm_flat.coefficient_grad(c, batches, scale)[0], rtol=1e-5, atol=1e-7)


def test_hierarchical_with_one_group_is_flat(llama_family):
    examples = family_examples(llama_family)
    flat = make_merger(llama_family, seed=2).fit(examples)
    hier = make_merger(llama_family, seed=2, hierarchical={"group_size": 3}).fit(examples)
    assert torch.equal(flat.coefficients.values, hier.coefficients.values)
    for name, tensor in flat.merged_tensors.items():
        assert torch.equal(tensor, hier.merged_tensors[name])
    assert [lvl["group"] for lvl in hier.levels] == [["code", "math", "chat"]]


def test_streaming_holds_one_merged_model(bert_family):
    """Streaming keeps no base and no task vector, and writes every step's merge into the same tensors."""
    from supermerge_hf.deltas import StreamedDelta

    merger = make_merger(bert_family, streaming=True)
    fm = FunctionalMerge(merger.plan, dtype=torch.float32, streaming=True)
    assert fm.base is None
    assert all(isinstance(p, StreamedDelta) for d in fm.deltas.values() for p in d.parts)
    S, G = merger.plan.num_sources, len(merger.plan.groups)
    first = fm.params(torch.full((S, G), 0.3))
    pointers = {n: t.data_ptr() for n, t in first.items()}
    values = {n: t.clone() for n, t in first.items()}
    second = fm.params(torch.full((S, G), -0.2))
    assert {n: t.data_ptr() for n, t in second.items()} == pointers  # reused, nothing model-sized allocated
    flat = FunctionalMerge(merger.plan, dtype=torch.float32)
    for name, tensor in flat.params(torch.full((S, G), 0.3)).items():
        torch.testing.assert_close(values[name], tensor, rtol=1e-5, atol=1e-6)


def test_flat_reuses_merged_tensors_and_hands_over_the_final_merge(bert_family):
    """Each step's merge goes into the same tensors (no model-sized allocation per step); the final merge is the
    caller's: a later merge does not overwrite it."""
    merger = make_merger(bert_family).fit(family_examples(bert_family))
    fm, S, G = FunctionalMerge(merger.plan, dtype=torch.float32), merger.plan.num_sources, len(merger.plan.groups)
    kept = {n: t.clone() for n, t in merger.merged_tensors.items()}
    first = fm.params(torch.full((S, G), 0.3))
    pointers = {n: t.data_ptr() for n, t in first.items()}
    assert not pointers.keys() & {t.data_ptr() for t in merger.merged_tensors.values()} - {
        fm.base[n].data_ptr() for n in fm.base}
    second = fm.params(torch.full((S, G), -0.2))
    assert {n: t.data_ptr() for n, t in second.items()} == pointers
    for name, tensor in second.items():
        expected = fm.base[name] - 0.2 * fm.deltas[name].dense().sum(0)
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(merger.merged_tensors[name], kept[name]), name
        assert not merger.merged_tensors[name].requires_grad


def test_read_tensor_into_a_given_tensor(bert_family):
    from supermerge_hf.sources import ModelSpec

    spec = ModelSpec.from_folder(bert_family.base)
    name = next(iter(spec.shapes))
    expected = spec.read_tensor(name)
    out = torch.empty_like(expected)
    assert spec.read_tensor(name, out=out) is out and torch.equal(out, expected)  # straight into it
    half = torch.empty(expected.shape, dtype=torch.bfloat16)
    assert spec.read_tensor(name, out=half) is half and torch.equal(half, expected.to(torch.bfloat16))


@pytest.mark.parametrize("grouping", ["similarity", "explicit", "random"])
def test_hierarchical_levels(llama_family, grouping, tmp_path):
    groups = [["code", "chat"], ["math"]] if grouping == "explicit" else None
    options = {"group_size": 2, "grouping": grouping} | ({"groups": groups} if groups else {})
    merger = make_merger(llama_family, hierarchical=options).fit(family_examples(llama_family))
    assert len(merger.levels) == 2 and len(merger.levels[0]["group"]) == 2
    assert len(merger.levels[1]["group"]) == 2  # the level-0 group result and the remaining source
    if grouping == "explicit":
        assert merger.levels[0]["group"] == ["code", "chat"] and merger.levels[1]["group"] == ["(code+chat)", "math"]
    out = merger.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(1, 64, (2, 8))
    assert torch.equal(reloaded(x).logits, merger.merge_and_unload()(x).logits)
    assert (tmp_path / "merged" / "hierarchy.json").is_file()


def test_cosine_similarity_equals_that_of_the_whole_task_vectors(llama_family, monkeypatch):
    from supermerge_hf import hierarchy

    monkeypatch.setattr(hierarchy, "SIMILARITY_CHUNK", 100)  # several chunks per tensor
    merger = make_merger(llama_family)
    plan = merger.plan
    base = canonical_state(llama_family.base, "model")
    flat = torch.stack([torch.cat([(canonical_state(p, "model")[n] - base[n]).flatten() for n in plan.merged])
                        for p in llama_family.sources.values()]).double()  # (K, all merged elements)
    expected = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    torch.testing.assert_close(hierarchy.cosine_similarity(plan.base, plan.sources, plan.merged), expected)


def test_similarity_grouping_pairs_the_most_similar():
    from supermerge_hf.hierarchy import partition

    sim = torch.tensor([[1.0, 0.1, 0.9, 0.0], [0.1, 1.0, 0.2, 0.8], [0.9, 0.2, 1.0, 0.1], [0.0, 0.8, 0.1, 1.0]])
    assert sorted(map(sorted, partition(sim, 2))) == [[0, 2], [1, 3]]


def test_examples_as_dataset_list_or_dataloader_give_the_same_merge(bert_family):
    datasets = pytest.importorskip("datasets", reason="datasets is an optional input type")
    from torch.utils.data import DataLoader

    from supermerge_hf.data import collate

    examples = family_examples(bert_family, n=8)
    as_list = make_merger(bert_family, seed=4).fit(examples).coefficients.values
    as_dataset = make_merger(bert_family, seed=4).fit(
        {t: datasets.Dataset.from_list([{"input_ids": list(map(int, e["input_ids"])), "labels": e["labels"]}
                                        for e in ex]) for t, ex in examples.items()}
    ).coefficients.values
    loaders = {t: DataLoader(as_examples(t, ex), batch_size=1, collate_fn=collate) for t, ex in examples.items()}
    as_loader = make_merger(bert_family, seed=4).fit(loaders).coefficients.values
    assert torch.equal(as_list, as_dataset) and torch.equal(as_list, as_loader)


def test_init_from_task_arithmetic_starts_at_the_best_lambda(bert_family):
    from supermerge_hf.methods import LAMBDA_GRID

    examples = family_examples(bert_family)
    merger = make_merger(bert_family, steps=1, init_from_task_arithmetic=True, learning_rate=1e-9).fit(examples)
    base = canonical_state(bert_family.base, "bert")
    sources = {t: canonical_state(p, "bert") for t, p in bert_family.sources.items()}
    losses = {}
    for lam in LAMBDA_GRID:  # each task's own model with base + lam * (sum of task vectors), loss by hand
        losses[lam] = sum(_task_loss(bert_family, base, sources, task, lam, as_examples(task, ex))
                          for task, ex in examples.items())
    best = min(losses, key=losses.get)
    torch.testing.assert_close(merger.coefficients.values, torch.full((2, 39), min(best, 0.95)), rtol=0, atol=1e-6)


def _task_loss(family, base, sources, task, lam, examples) -> float:
    """Mean loss of `task`'s own model whose body is base + lam * sum of the task vectors (plain transformers)."""
    from transformers import AutoModelForSequenceClassification

    from supermerge_hf.data import collate

    model = AutoModelForSequenceClassification.from_pretrained(family.sources[task]).eval()
    with torch.no_grad():
        for name, tensor in base.items():
            if name in sources[task] and not name.startswith("classifier"):
                merged = tensor + lam * sum(src[name] - tensor for src in sources.values())
                model.get_parameter("bert." + name).copy_(merged)
        return float(model(**collate(examples)).loss)
