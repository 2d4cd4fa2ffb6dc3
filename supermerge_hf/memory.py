"""Host memory of learning: one set of merged tensors reused every step, and freed memory handed back to the OS.

Every step writes its merge into the same tensors, in flat and in streaming mode. Streaming also re-reads the
base and each full fine-tune tensor by tensor into two scratch tensors (plain file reads, so no file mapping
stays resident). Nothing model-sized is allocated after the first step, so the allocator cannot fragment: the
peak is the base and the task vectors (flat) or two tensors of the largest shape (streaming), plus one merged
model (method.md section 3).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Mapping

import torch

from .deltas import DeltaStack, LowRankDelta, StreamedDelta, part_inner
from .task_vectors import MergePlan, ModelSpec


class MergeBuffers:
    """The merged tensors of a `FunctionalMerge`, and in streaming mode the scratch its reads go to.

    Args:
        base (`Mapping[str, torch.Tensor]`, *optional*): The base tensors already in memory (flat mode). Without
            it (streaming) each base tensor is read from disk into scratch row 0 when needed.
    """

    def __init__(self, plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str,
                 base: Mapping[str, torch.Tensor] | None = None) -> None:
        self.plan, self.dtype, self.device, self.base = plan, dtype, device, base
        self.merged: dict[str, torch.Tensor] = {}
        self.scratch = None
        if base is None:
            largest = max(torch.Size(plan.base.shapes[n]).numel() for n in plan.merged)
            self.scratch = torch.empty(2, largest, dtype=dtype, device=device)  # [base, one fine-tune]

    def read(self, spec: ModelSpec, name: str, slot: int) -> torch.Tensor:
        """Tensor `name` of `spec` read into scratch row `slot` (valid until the next read into that row)."""
        shape = self.plan.base.shapes[name]
        out = self.scratch[slot, : torch.Size(shape).numel()].view(shape)
        return spec.read_tensor(name, out=out)

    def base_tensor(self, name: str) -> torch.Tensor:
        return self.read(self.plan.base, name, 0) if self.base is None else self.base[name]

    @torch.no_grad()
    def merge(self, deltas: dict[str, DeltaStack], c: torch.Tensor) -> dict[str, torch.Tensor]:
        """base + sum_i c_i tau_i for every tensor, written into the reused merged tensors (not differentiable).

        A tensor no source changes is the base tensor itself (flat mode). The returned tensors are overwritten
        by the next call: use them before merging again, or `hand_over` them.
        """
        out_tensors = {}
        for name, stack in deltas.items():
            if stack.is_zero and self.base is not None:
                out_tensors[name] = self.base[name]
                continue
            out = self.merged.get(name)
            if out is None:
                out = self.merged[name] = torch.empty(self.plan.base.shapes[name], dtype=self.dtype, device=self.device)
            out.requires_grad_(False)
            out_tensors[name] = self._merge_one(out, stack, c[:, self.plan.group_index[name]], name)
        return out_tensors

    def _merge_one(self, out: torch.Tensor, stack: DeltaStack, coeffs: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_tensor(name)
        if stack.stacked is not None:  # (S, n)^T @ (S,) straight into `out`, then the base added in place
            torch.mv(stack.stacked.view(len(coeffs), -1).T, coeffs.to(stack.stacked.dtype), out=out.view(-1))
            return out.add_(base)
        out.copy_(base)
        for ci, part in zip(coeffs.tolist(), stack.parts):
            if part is None or ci == 0.0:
                continue
            if isinstance(part, StreamedDelta):
                out.add_(self.read(part.source, name, 1).sub_(base), alpha=ci)
            else:
                out.add_(part.dense() if isinstance(part, LowRankDelta) else part, alpha=ci)
        return out

    def inner(self, name: str, stack: DeltaStack, grad: torch.Tensor) -> torch.Tensor:
        """<grad, tau_i> for every source `(S,)` float32, streamed parts read into the scratch one at a time."""
        if not any(isinstance(p, StreamedDelta) for p in stack.parts):
            return stack.inner(grad)
        base = self.read(self.plan.base, name, 0)
        return torch.stack([part_inner(self.read(p.source, name, 1).sub_(base) if isinstance(p, StreamedDelta)
                                       else p, grad) for p in stack.parts])

    def hand_over(self) -> None:
        """Forget the merged tensors: the caller keeps the last merge, the next `merge` allocates anew."""
        self.merged = {}


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None on other C libraries (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS.

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MB, the size of most weight tensors) in
    the heap, so after a model-sized free (a finished hierarchical group) the process would still hold that
    memory and the next group would add its own on top. `malloc_trim(0)` returns every free heap page.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
