"""`granularity: row`: one coefficient per row of each transformer block's matrix, one standard checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from supermerge_hf import Coefficients, SuperMergeConfig, SuperMerger
from supermerge_hf.data import as_examples
from supermerge_hf.functional import FunctionalMerge

from .conftest import OVER_TASK_VECTORS, family_examples

QUERY = "encoder.layer.0.attention.self.query.weight"


def make_merger(family, **kwargs) -> SuperMerger:
    kwargs = {"steps": 2, "eval_every": 1, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0,
              "method_kwargs": OVER_TASK_VECTORS} | kwargs  # the formula over the task vectors
    return SuperMerger(SuperMergeConfig(base=str(family.base), sources=family.source_list(), **kwargs))


def test_row_groups_are_the_rows_of_block_matrices(bert_family):
    plan, tensor_plan = make_merger(bert_family).plan, make_merger(bert_family, granularity="tensor").plan
    assert plan.granularity == "row"  # SuperMerge's default
    rows = plan.group_index[QUERY]
    assert isinstance(rows, slice) and rows.stop - rows.start == 32  # hidden size 32: one group per output row
    assert plan.groups[rows][:2] == [f"{QUERY}[0]", f"{QUERY}[1]"]
    for name in ("encoder.layer.0.attention.self.query.bias", "embeddings.word_embeddings.weight"):
        assert plan.groups[plan.group_index[name]] == name  # vectors and embeddings: one group per tensor
    matrices = [n for n in plan.merged if isinstance(plan.group_index[n], slice)]
    assert len(plan.groups) == len(tensor_plan.groups) - len(matrices) + sum(plan.base.shapes[n][0] for n in matrices)


def test_row_gradient_equals_autograd(bert_family):
    plan = make_merger(bert_family, granularity="row").plan
    fm = FunctionalMerge(plan, dtype=torch.float32)
    examples = {t: as_examples(t, ex) for t, ex in family_examples(bert_family, n=6).items()}
    S, G = plan.num_sources, len(plan.groups)
    w = (0.4 * torch.randn(S, G, generator=torch.Generator().manual_seed(0))).requires_grad_()
    scale = {"sst": 1.0, "nli": 0.5}
    c = torch.tanh(w)  # reference: autograd through theta_m = theta_p + sum_i c[i, rows] * tau_i, row by row

    def merged_tensor(name: str) -> torch.Tensor:
        ci, delta = c[:, plan.group_index[name]], fm.deltas[name].dense()  # (S,) or (S, R); (S, *shape)
        return fm.base[name] + (ci.view(*ci.shape, *[1] * (delta.dim() - ci.dim())) * delta).sum(0)

    merged = {n: merged_tensor(n) for n in fm.deltas}
    loss = sum(scale[t] * fm.forward(t, merged, batch).loss for t, batch in examples.items())
    (reference,) = torch.autograd.grad(loss, [w])
    grad_c, _ = fm.coefficient_grad(c.detach(), examples, scale)
    torch.testing.assert_close((1 - torch.tanh(w.detach()) ** 2) * grad_c, reference, rtol=1e-4, atol=1e-7)
    rows = plan.group_index[QUERY]
    assert reference[:, rows].abs().max() > 0 and not torch.allclose(reference[:, rows][:, :1], reference[:, rows])


def test_rows_with_one_value_per_tensor_give_the_tensor_merge_and_a_standard_checkpoint(bert_family, tmp_path):
    row, tensor = make_merger(bert_family, granularity="row"), make_merger(bert_family, granularity="tensor")
    values = torch.rand(2, len(tensor.plan.groups), generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    tensor.apply_coefficients(Coefficients.from_values(tensor.plan.source_names, tensor.plan.groups, values, "tanh"))
    column = {g: i for i, g in enumerate(tensor.plan.groups)}
    spread = [column[g.split("[")[0]] for g in row.plan.groups]  # each row takes its tensor's value
    row.apply_coefficients(Coefficients.from_values(row.plan.source_names, row.plan.groups, values[:, spread], "tanh"))
    for name, merged in tensor.merged_tensors.items():
        torch.testing.assert_close(row.merged_tensors[name], merged, rtol=1e-6, atol=1e-6)
    row.fit(family_examples(bert_family, n=8))  # learning, then one checkpoint of the base's architecture
    out = row.save_pretrained(tmp_path / "merged")
    model = AutoModel.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()[QUERY], row.merged_tensors[QUERY])
    reloaded = SuperMerger.from_pretrained(out)
    torch.testing.assert_close(reloaded.merged_tensors[QUERY], row.merged_tensors[QUERY])


def test_supermerge_defaults_to_rows_and_distillation():
    """The measured best (issue 15) is the default; other methods keep one coefficient per tensor, and a config
    saved with the paper's setting reloads as it was."""
    where = {"base": "/nowhere", "sources": [{"task": "a", "path": "/nowhere/a"}]}
    config = SuperMergeConfig(**where)
    assert config.granularity == "row"
    assert config.method_kwargs == {"objective": "distill", "temperature": 2.0, "distill_weight": 0.5,
                                    "start": "auto", "start_lam": "auto", "density": 0.2, "refit_heads": 200,
                                    "refit_lr": 1e-2}
    assert SuperMergeConfig(**where, method="adamerging").granularity == "tensor"
    assert SuperMergeConfig(**where, method="ties").granularity == "tensor"
    old = SuperMergeConfig(**where, granularity="tensor", method_kwargs={"objective": "labels", "temperature": 1.0})
    reloaded = SuperMergeConfig.from_dict(json.loads(old.to_json_string()))
    assert reloaded.granularity == "tensor" and reloaded.method_kwargs["objective"] == "labels"


def test_row_granularity_is_validated(bert_family):
    with pytest.raises(ValueError, match="granularity"):
        SuperMergeConfig(base="/nowhere", sources=[{"task": "a", "path": "/nowhere/a"}], granularity="rows")
