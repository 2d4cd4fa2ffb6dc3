"""The merged model as a function of the coefficients, its losses, and the exact gradient of the coefficients."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .coefficients import coefficient_grad, merge_tensor
from .examples import Example, collate
from .task_vectors import MergePlan, ModelSpec, load_task_specific, load_task_vectors

EVAL_BATCH = 32


def skeleton(spec: ModelSpec, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The source's architecture with real buffers but parameter-free (meta): run it with `functional_call`."""
    model = spec.cls(spec.config).to(device=device, dtype=dtype).eval()  # eval: dropout off while learning
    replaced: dict[int, nn.Parameter] = {}  # keeps tied parameters tied
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), False)
                module._parameters[name] = replaced[id(p)]
    return model


class FunctionalMerge:
    """theta_m(c) = theta_p + sum_i c_i * tau_i, run per task with that task's architecture and head.

    Holds the base tensors and the stacked task vectors (about S + 1 model copies), one parameter-free
    skeleton per task, and each task's own tensors. Nothing here is a module parameter: only the coefficients
    are learned, elsewhere.
    """

    def __init__(self, plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.plan, self.device = plan, device
        self.base, self.deltas = load_task_vectors(plan, dtype=dtype, device=device)
        self.models = {t: skeleton(s, device, dtype) for t, s in zip(plan.tasks, plan.sources)}
        self.heads = {t: load_task_specific(plan, t, dtype=dtype, device=device) for t in plan.tasks}
        self.pad_id = plan.base.config.pad_token_id or 0

    def merged_params(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for coefficients `c` `(S, G)` (already transformed); differentiable in `c`."""
        return {n: merge_tensor(self.base[n], self.deltas[n], c[:, self.plan.group_index[n]]) for n in self.plan.merged}

    def forward(self, task: str, merged: Mapping[str, torch.Tensor], batch: list[Example]):
        """The task's model output on a batch, with the merged body and the task's own head."""
        names = self.plan.sources[self.plan.tasks.index(task)].param_names
        params = {names[n]: merged[n] for n in self.plan.merged} | self.heads[task]
        inputs = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
        return torch.func.functional_call(self.models[task], params, (), inputs)

    @torch.no_grad()
    def mean_loss(self, c: torch.Tensor, task: str, examples: list[Example]) -> float:
        """Mean supervised loss of the merged model on examples (batched, per-example weighted)."""
        merged = self.merged_params(c)
        total = 0.0
        for i in range(0, len(examples), EVAL_BATCH):
            batch = examples[i : i + EVAL_BATCH]
            total += float(self.forward(task, merged, batch).loss) * len(batch)
        return total / len(examples)

    @torch.no_grad()
    def predictions(self, c: torch.Tensor, task: str, examples: list[Example]) -> torch.Tensor:
        """Arg-max class of each example (sequence classification), `(N,)`."""
        merged = self.merged_params(c)
        chunks = [self.forward(task, merged, examples[i : i + EVAL_BATCH]).logits.argmax(-1)
                  for i in range(0, len(examples), EVAL_BATCH)]
        return torch.cat(chunks).cpu()

    def supervised_grad(
        self, c: torch.Tensor, batches: Mapping[str, list[Example]], scale: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """dL/dc `(S, G)` of L = sum_t scale[t] * loss_t, by one backward through the merged model only.

        The graph never runs through the S task vectors: autograd gives dL/dtheta_m, then
        dL/dc[i, g] = sum_{j in g} <dL/dtheta_m[j], tau_ij> (method.md section 3).

        Returns:
            `(grad_c, losses)` with each task's loss (detached).
        """
        with torch.no_grad():
            merged = self.merged_params(c.detach())
        merged = {n: t.requires_grad_() for n, t in merged.items()}
        losses = {t: self.forward(t, merged, batch).loss for t, batch in batches.items()}
        total = sum(scale[t] * loss for t, loss in losses.items())
        grads = torch.autograd.grad(total, list(merged.values()))
        grad_c = coefficient_grad(dict(zip(merged, grads)), self.deltas, self.plan.group_index, len(self.plan.groups))
        return grad_c, {t: v.detach() for t, v in losses.items()}
