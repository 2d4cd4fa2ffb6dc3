"""Streaming mode's memory: one merged model, reused every step, and two scratch tensors for reading weights.

Every step re-reads the base and each full fine-tune tensor by tensor (plain file reads into the scratch, so
no file mapping stays resident) and writes the merge into the same merged tensors. Nothing model-sized is
allocated after the first step, so the allocator cannot fragment: the peak is about one model copy plus two
tensors of the largest shape, whatever the number of sources (method.md section 3).
"""

from __future__ import annotations

import torch

from .deltas import DeltaStack, LowRankDelta, StreamedDelta
from .task_vectors import MergePlan, ModelSpec


class StreamBuffers:
    """The merged tensors of a streaming `FunctionalMerge` and the scratch its reads go to."""

    def __init__(self, plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.plan, self.dtype, self.device = plan, dtype, device
        self.merged: dict[str, torch.Tensor] | None = None
        largest = max(torch.Size(plan.base.shapes[n]).numel() for n in plan.merged)
        self.scratch = torch.empty(2, largest, dtype=dtype, device=device)  # [base, one fine-tune]

    def read(self, spec: ModelSpec, name: str, slot: int) -> torch.Tensor:
        """Tensor `name` of `spec` read into scratch row `slot` (valid until the next read into that row)."""
        shape = self.plan.base.shapes[name]
        out = self.scratch[slot, : torch.Size(shape).numel()].view(shape)
        return spec.read_tensor(name, out=out)

    @torch.no_grad()
    def merge(self, deltas: dict[str, DeltaStack], c: torch.Tensor) -> dict[str, torch.Tensor]:
        """base + sum_i c_i tau_i for every tensor, written into the reused merged tensors (not differentiable).

        The returned tensors are overwritten by the next call: use them before merging again.
        """
        if self.merged is None:
            self.merged = {n: torch.empty(self.plan.base.shapes[n], dtype=self.dtype, device=self.device)
                           for n in deltas}  # fmt: skip
        for name, stack in deltas.items():
            out, base = self.merged[name], self.read(self.plan.base, name, 0)
            out.copy_(base)
            for ci, part in zip(c[:, self.plan.group_index[name]].tolist(), stack.parts):
                if part is None or ci == 0.0:
                    continue
                if isinstance(part, StreamedDelta):
                    out.add_(self.read(part.source, name, 1).sub_(base), alpha=ci)
                else:
                    out.add_(part.dense() if isinstance(part, LowRankDelta) else part, alpha=ci)
        return self.merged

    def inner(self, name: str, stack: DeltaStack, grad: torch.Tensor) -> torch.Tensor:
        """<grad, tau_i> for every source `(S,)` float32, streamed parts read into the scratch."""
        base = self.read(self.plan.base, name, 0) if any(isinstance(p, StreamedDelta) for p in stack.parts) else None
        values = []
        for part in stack.parts:
            if part is None:
                values.append(torch.zeros((), device=grad.device))
            elif isinstance(part, StreamedDelta):
                delta = self.read(part.source, name, 1).sub_(base)
                values.append(torch.dot(delta.flatten().float(), grad.flatten().float()))
            elif isinstance(part, LowRankDelta):
                values.append(part.inner(grad.float()))
            else:
                values.append(torch.dot(part.flatten().float(), grad.flatten().float()))
        return torch.stack(values).float()

    def release(self) -> None:
        """Free the merged tensors (e.g. before the final merge is formed)."""
        self.merged = None
