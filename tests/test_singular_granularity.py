"""`granularity: singular`: one coefficient per singular direction of each source's task vector of a block matrix,
W = W_base + sum_i U_i diag(c_i S_i) V_i^T (method.md section 9), for full fine-tunes, LoRA and IA³ sources."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM

from supermerge_hf import Coefficients, SuperMergeConfig, SuperMerger
from supermerge_hf.data import as_examples
from supermerge_hf.deltas import LowRankDelta, SingularDelta
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.mergekit_recipe import mergekit_recipe

from .conftest import OVER_TASK_VECTORS, classification_examples, family_examples
from .test_ia3 import VARIANTS as IA3_VARIANTS
from .test_ia3 import make_ia3
from .test_lora import CAUSAL_LM, SEQ_CLS, make_adapter

QUERY = "encoder.layer.0.attention.self.query.weight"
LABELS = {"sst": 2, "nli": 3}
FAST = {"steps": 2, "eval_every": 1, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0}


def make_merger(base, sources: dict, **kwargs) -> SuperMerger:
    kwargs = FAST | {"granularity": "singular", "method_kwargs": OVER_TASK_VECTORS} | kwargs
    return SuperMerger(SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)}
                                                                 for t, p in sources.items()], **kwargs))


def table(merger: SuperMerger, values: torch.Tensor) -> Coefficients:
    return Coefficients.from_values(merger.plan.source_names, merger.plan.groups, values, merger.config.transform)


def random_values(merger: SuperMerger, seed: int) -> torch.Tensor:
    S, G = merger.plan.num_sources, len(merger.plan.groups)
    return torch.rand(S, G, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8  # (S, G) in (-0.8, 0.8)


def batches(family, tasks: list[str], n: int = 6) -> dict[str, list]:
    if family.num_labels is not None:
        return {t: as_examples(t, classification_examples(LABELS[t], n, seed=i)) for i, t in enumerate(tasks)}
    examples = family_examples(family, n)
    return {t: as_examples(t, examples[s]) for t, s in zip(tasks, family.sources)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


@pytest.fixture(scope="module")
def lora_pairs(request, tmp_path_factory) -> dict[str, tuple]:
    """Per family: (family, {task: LoRA adapter}, {task: the same adapter densified by PEFT}); GPT-2's are Conv1D
    (fan_in_fan_out) and of ranks 2 and 5 on 32 x 96 and 32 x 32 weights."""
    out = {}
    for family_name in ("bert_family", "gpt2_family"):
        family = request.getfixturevalue(family_name)
        root = tmp_path_factory.mktemp(f"singular_{family_name}")
        adapters, dense = {}, {}
        for i, (task, r) in enumerate({"sst": 2, "nli": 5}.items()):
            if family_name == "bert_family":
                lora = dict(num_labels=LABELS[task], target_modules=["query", "value", "dense"], **SEQ_CLS)
            else:
                lora = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, **CAUSAL_LM)
            peft_model = make_adapter(family.base, root / task, seed=20 + i, r=r, lora_alpha=2 * r + 1, **lora)
            peft_model.merge_and_unload().save_pretrained(root / f"{task}-dense")
            adapters[task], dense[task] = root / task, root / f"{task}-dense"
        out[family_name] = (family, adapters, dense)
    return out


# ---------------------------------------------------------------- groups
def test_groups_are_the_singular_directions(bert_family, lora_pairs, tmp_path):
    plan = make_merger(bert_family.base, bert_family.sources).plan
    directions = plan.group_index[QUERY]
    assert isinstance(directions, slice) and directions.stop - directions.start == 32  # min(32, 32)
    assert plan.groups[directions][:2] == [f"{QUERY}[σ0]", f"{QUERY}[σ1]"]
    up = "encoder.layer.1.intermediate.dense.weight"  # (48, 32): min(out, in) = 32 directions
    assert plan.group_index[up].stop - plan.group_index[up].start == 32
    for name in ("encoder.layer.0.attention.self.query.bias", "embeddings.word_embeddings.weight"):
        assert plan.groups[plan.group_index[name]] == name  # vectors and embeddings: one group per tensor
    # LoRA sources: the largest rank of the adapters that target the matrix, from the headers
    _, adapters, _ = lora_pairs["bert_family"]
    lora_plan = make_merger(bert_family.base, adapters).plan
    assert lora_plan.group_index[QUERY].stop - lora_plan.group_index[QUERY].start == 5
    key = "encoder.layer.0.attention.self.key.weight"  # untargeted: no source changes it, one group
    assert lora_plan.groups[lora_plan.group_index[key]] == key
    # IA³ sources: one coefficient per IA³ vector, as under `row`, so that the merge stays in IA³ space
    for i, (task, ia3) in enumerate(zip(LABELS, IA3_VARIANTS["bert_family"])):
        make_ia3(bert_family.base, tmp_path / task, seed=i, num_labels=LABELS[task], **ia3)
    ia3_plan = make_merger(bert_family.base, {t: tmp_path / t for t in LABELS}).plan
    scaled = {n for s in ia3_plan.sources for n in s.vectors}
    assert scaled and all(isinstance(ia3_plan.group_index[n], int) for n in scaled)
    assert not any(ia3_plan.directions(n) for n in ia3_plan.merged)  # nothing else changes: no directions


def test_singular_is_validated_and_refused_by_mergekit(llama_family, tmp_path):
    with pytest.raises(ValueError, match="granularity"):
        SuperMergeConfig(base="/nowhere", sources=[{"task": "a", "path": "/nowhere/a"}], granularity="svd")
    merger = make_merger(llama_family.base, llama_family.sources, steps=1)
    merger.fit(family_examples(llama_family, n=4))
    out = merger.save_pretrained(tmp_path / "merged")
    with pytest.raises(ValueError, match="singular direction .*granularity 'singular'.*`granularity: tensor`"):
        mergekit_recipe(out)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("family_name", ["bert_family", "llama_family"])
def test_one_value_per_matrix_gives_the_tensor_merge(family_name, request):
    family = request.getfixturevalue(family_name)
    singular = make_merger(family.base, family.sources)
    tensor = make_merger(family.base, family.sources, granularity="tensor")
    values = random_values(tensor, seed=2)
    tensor.apply_coefficients(table(tensor, values))
    column = {g: i for i, g in enumerate(tensor.plan.groups)}
    spread = [column[g.split("[σ")[0]] for g in singular.plan.groups]  # each direction takes its matrix's value
    singular.apply_coefficients(table(singular, values[:, spread]))
    assert any(singular.plan.directions(n) for n in singular.plan.merged)
    diff = max(max_diff(singular.merged_tensors[n], t) for n, t in tensor.merged_tensors.items())
    for name, merged in tensor.merged_tensors.items():
        torch.testing.assert_close(singular.merged_tensors[name], merged, rtol=1e-6, atol=1e-6)
    assert diff < 1e-6


@pytest.mark.parametrize("family_name", ["bert_family", "llama_family"])
def test_gradient_equals_autograd(family_name, request):
    """dL/dc_ik = s_ik u_ik^T G v_ik, against autograd through W(c) = W_base + sum_i U_i diag(c_i S_i) V_i^T with its
    own SVD of each dense task vector."""
    family = request.getfixturevalue(family_name)
    plan = make_merger(family.base, family.sources).plan
    fm = FunctionalMerge(plan, dtype=torch.float32)
    reference_fm = FunctionalMerge(make_merger(family.base, family.sources, granularity="tensor").plan,
                                   dtype=torch.float32)  # the dense task vectors
    assert all(isinstance(p, SingularDelta) for n in plan.merged if plan.directions(n) for p in fm.deltas[n].parts)
    examples = batches(family, plan.tasks)
    w = (0.4 * torch.randn(plan.num_sources, len(plan.groups), generator=torch.Generator().manual_seed(0)))
    w.requires_grad_()
    c = torch.tanh(w)

    def merged_tensor(name: str) -> torch.Tensor:
        ci, deltas = c[:, plan.group_index[name]], reference_fm.deltas[name].dense()  # (S,) or (S, k); (S, *shape)
        if not plan.directions(name):
            return fm.base[name] + (ci.view(-1, *[1] * (deltas.dim() - 1)) * deltas).sum(0)
        u, s, vh = torch.linalg.svd(deltas.double(), full_matrices=False)  # (S, m, k), (S, k), (S, k, n)
        return fm.base[name] + torch.einsum("imk,ik,ikn->mn", u, ci.double() * s, vh).float()

    merged = {n: merged_tensor(n) for n in plan.merged}
    scale = dict(zip(plan.tasks, [1.0, 0.5, 0.25]))
    loss = sum(scale[t] * fm.forward(t, merged, batch).loss for t, batch in examples.items())
    (reference,) = torch.autograd.grad(loss, [w])
    grad_c, _ = fm.coefficient_grad(c.detach(), examples, scale)
    analytic = (1 - torch.tanh(w.detach()) ** 2) * grad_c
    torch.testing.assert_close(analytic, reference, rtol=1e-4, atol=1e-7)
    assert max_diff(analytic, reference) < 1e-6
    directions = plan.group_index[QUERY if family_name == "bert_family" else "layers.0.self_attn.q_proj.weight"]
    assert reference[:, directions].abs().max() > 0 and not torch.allclose(reference[:, directions][:, :1],
                                                                           reference[:, directions])


def test_streamed_task_vectors_give_the_same_merge(llama_family):
    """Streaming keeps no factors: each streamed task vector is factorised where it is used, to the same merge."""
    plan = make_merger(llama_family.base, llama_family.sources).plan
    c = random_values(make_merger(llama_family.base, llama_family.sources), seed=3)
    held = FunctionalMerge(plan, dtype=torch.float32).params(c, dense=True)
    streamed = FunctionalMerge(plan, dtype=torch.float32, streaming=True).params(c, dense=True)
    assert max(max_diff(held[n], t) for n, t in streamed.items()) < 1e-6


# ---------------------------------------------------------------- LoRA sources
@pytest.mark.parametrize("family_name", ["bert_family", "gpt2_family"])
def test_lora_gradient_equals_that_of_the_densified_adapters(family_name, lora_pairs):
    """LoRA layers learn in LoRA form from the SVD of their small factors (QR of B and A^T, SVD of the r x r core);
    the gradient equals that of the same adapters densified (dense SVD), direction by direction, and is 0 past the
    adapter's rank."""
    family, adapters, dense = lora_pairs[family_name]
    lora, full = make_merger(family.base, adapters), make_merger(family.base, dense)
    fm_lora, fm_full = FunctionalMerge(lora.plan, dtype=torch.float32), FunctionalMerge(full.plan, dtype=torch.float32)
    targeted = {n for n in lora.plan.merged if lora.plan.directions(n)}
    assert targeted and targeted <= set(fm_lora.lowrank)  # every such matrix runs in LoRA form: no dense delta
    assert all(isinstance(p, LowRankDelta) and p.scale == 1.0 for n in targeted for p in fm_lora.deltas[n].parts)
    column = {g: i for i, g in enumerate(full.plan.groups)}
    shared = [g for g in lora.plan.groups if g in column]  # all but matrices no adapter changes (one group there)
    assert {g.split("[σ")[0] for g in set(lora.plan.groups) - set(shared)}.isdisjoint(targeted)
    rows, cols = [lora.plan.groups.index(g) for g in shared], [column[g] for g in shared]
    c_full = random_values(full, seed=4)
    c_lora = random_values(lora, seed=5)
    c_lora[:, rows] = c_full[:, cols]
    merged = fm_lora.params(c_lora)
    assert all(merged[n] is fm_lora.base[n] for n in targeted)
    examples = batches(family, lora.plan.tasks)
    scale = {"sst": 1.0, "nli": 0.5}
    grad_lora, losses_lora = fm_lora.coefficient_grad(c_lora, examples, scale)
    grad_full, losses_full = fm_full.coefficient_grad(c_full, examples, scale)
    torch.testing.assert_close(grad_lora[:, rows], grad_full[:, cols], rtol=1e-4, atol=1e-6)
    assert grad_lora.abs().max() > 1e-3 and max_diff(grad_lora[:, rows], grad_full[:, cols]) < 1e-6
    rest = torch.ones(len(column), dtype=torch.bool)
    rest[cols] = False
    assert grad_full[:, rest].abs().max() < 1e-7  # directions past every adapter's rank, unchanged matrices: 0
    assert all(grad_lora[:, lora.plan.groups.index(g)].abs().max() == 0 for g in lora.plan.groups if g not in column)
    for task in examples:
        torch.testing.assert_close(losses_lora[task], losses_full[task], rtol=1e-5, atol=0)
    lora.apply_coefficients(table(lora, c_lora))
    full.apply_coefficients(table(full, c_full))
    for name, tensor in lora.merged_tensors.items():
        torch.testing.assert_close(tensor, full.merged_tensors[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family_name", ["bert_family", "gpt2_family"])
def test_combined_lora_adapter_is_exact(family_name, lora_pairs, tmp_path):
    """Per singular direction the combined adapter holds A_i = V_i^T and B_i = U_i diag(c_i S_i): one PEFT adapter of
    rank sum r_i that equals the dense merge."""
    family, adapters, _ = lora_pairs[family_name]
    examples = {t: ex for t, ex in zip(adapters, family_examples(family, 8).values())}
    merger = make_merger(family.base, adapters).fit(examples)
    merger.save_pretrained(tmp_path / "merged")
    merger.save_adapter(tmp_path / "adapter")
    x = torch.randint(1, 64, (2, 8))
    auto, field = (AutoModel, "last_hidden_state") if family_name == "bert_family" else (AutoModelForCausalLM, "logits")
    adapter = PeftModel.from_pretrained(auto.from_pretrained(family.base), tmp_path / "adapter")
    with torch.no_grad():
        expected = getattr(auto.from_pretrained(tmp_path / "merged")(x), field)
        got = getattr(adapter(x), field)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    assert max_diff(got, expected) < 1e-4
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 + 5  # every targeted weight: both adapters' directions side by side


# ---------------------------------------------------------------- learning and saving
def test_learning_moves_the_directions_and_reloads_to_the_same_logits(bert_family, tmp_path):
    merger = make_merger(bert_family.base, bert_family.sources, steps=3)
    merger.fit(family_examples(bert_family, n=8))
    values, groups = merger.coefficients.values, merger.plan.group_index[QUERY]
    assert not torch.allclose(values, torch.full_like(values, 0.3))  # c moved from its start
    assert values[:, groups].std() > 0  # differently per direction
    out = merger.save_pretrained(tmp_path / "merged")
    x = torch.randint(1, 64, (3, 7))
    expected = AutoModel.from_pretrained(out)(x).last_hidden_state
    torch.testing.assert_close(AutoModel.from_pretrained(out).state_dict()[QUERY], merger.merged_tensors[QUERY])
    reloaded = SuperMerger.from_pretrained(out)
    assert reloaded.coefficients.groups == merger.plan.groups
    again = reloaded.merge_and_unload()(x).last_hidden_state
    assert max_diff(again, expected) < 1e-6
    for name, tensor in merger.merged_tensors.items():
        torch.testing.assert_close(reloaded.merged_tensors[name], tensor, rtol=0, atol=1e-6)
