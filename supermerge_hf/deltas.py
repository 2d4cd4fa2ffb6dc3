"""Task vectors of the merged tensors: dense, low-rank (LoRA) or streamed from disk, read one tensor at a time.

`DeltaStack` holds the S task vectors of one tensor and gives the two operations learning needs: the combination
sum_i c_i tau_i and the inner products <grad, tau_i> (method.md sections 3 and 5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .task_vectors import MergePlan, ModelSpec


class LowRankDelta:
    """One source's task vector of one weight in LoRA form: scale * B @ A, transposed for `fan_in_fan_out`."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, transpose: bool = False) -> None:
        self.A, self.B, self.scale, self.transpose = A, B, scale, transpose  # A: (r, in), B: (out, r)

    def dense(self) -> torch.Tensor:
        delta = self.scale * (self.B @ self.A)  # (out, in)
        return delta.T if self.transpose else delta

    def inner(self, grad: torch.Tensor) -> torch.Tensor:
        """<grad, scale * B A> without forming B A: scale * sum(B * (grad @ A^T))."""
        grad = grad.T if self.transpose else grad  # (out, in)
        A, B = self.A.to(grad.dtype), self.B.to(grad.dtype)  # factors in the model's dtype, grad in float32
        return self.scale * (B * (grad @ A.T)).sum()

    def to(self, **kwargs) -> LowRankDelta:
        return LowRankDelta(self.A.to(**kwargs), self.B.to(**kwargs), self.scale, self.transpose)


class StreamedDelta:
    """One full fine-tune's task vector of one tensor, read from disk each time it is used (streaming mode)."""

    def __init__(self, source: ModelSpec, name: str, base: Mapping[str, torch.Tensor]) -> None:
        self.source, self.name, self.base = source, name, base

    def dense(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """finetune - base, from a fresh read; pass the base tensor when it is already at hand."""
        return self.source.delta(self.name, self.base[self.name] if base is None else base)

    def to(self, **kwargs) -> StreamedDelta:
        return self  # read on the base's device and dtype


class LazyTensors(Mapping):
    """The base's tensors, read from disk at every access (streaming mode): none stays in memory."""

    def __init__(self, spec: ModelSpec, names: list[str], *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.spec, self.names, self.dtype, self.device = spec, names, dtype, device

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.spec.keys:
            raise KeyError(name)
        return self.spec.read_tensor(name).to(device=self.device, dtype=self.dtype)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


Delta = torch.Tensor | LowRankDelta | StreamedDelta | None  # None: the source does not change this tensor


class DeltaStack:
    """The S task vectors of one tensor, dense or low-rank per source, and the two operations learning needs."""

    def __init__(self, shape: tuple[int, ...], parts: list[Delta], *, stacked: torch.Tensor | None = None) -> None:
        self.shape = tuple(shape)
        if stacked is None and all(isinstance(p, torch.Tensor) for p in parts):
            stacked = torch.stack(parts)
        # all dense: keep one (S, *shape) stack, so combine and inner are single tensor ops, and the parts are
        # views of it (holding the given tensors as well would keep every task vector twice)
        self.stacked = stacked
        self.parts = list(stacked) if stacked is not None else parts
        # e.g. frozen embeddings: the merge is the base whatever c, and the gradient of c is exactly zero
        self.is_zero = all(p is None for p in self.parts) or (stacked is not None and not stacked.any())

    @classmethod
    def from_dense(cls, stacked: torch.Tensor) -> DeltaStack:
        return cls(tuple(stacked.shape[1:]), [], stacked=stacked)

    def combine(self, c: torch.Tensor) -> torch.Tensor:
        """sum_i c_i tau_i `(*shape)` for coefficients `c` `(S,)`; differentiable in `c`."""
        if self.stacked is not None:
            return torch.tensordot(c.to(self.stacked.dtype), self.stacked, dims=1)  # (*shape)
        out = None
        low_rank = [(ci, p) for ci, p in zip(c, self.parts) if isinstance(p, LowRankDelta)]
        if low_rank:  # one product [c_1 s_1 B_1, ..., c_K s_K B_K] @ [A_1; ...; A_K] (method.md section 5)
            B = torch.cat([ci * p.scale * p.B for ci, p in low_rank], dim=1)  # (out, R)
            out = B @ torch.cat([p.A for _, p in low_rank])  # (out, in)
            out = out.T if low_rank[0][1].transpose else out  # one layer: all adapters orient it alike
        for ci, part in zip(c, self.parts):
            if part is None or isinstance(part, LowRankDelta):
                continue
            term = ci * (part if isinstance(part, torch.Tensor) else part.dense())
            out = term if out is None else out + term
        # no source changes it: a 0-dim zero (broadcasts, keeps the base's dtype, stays differentiable in c)
        return out if out is not None else torch.zeros((), device=c.device) * c.sum()

    def inner(self, grad: torch.Tensor) -> torch.Tensor:
        """<grad, tau_i> for every source, `(S,)` float32 (streamed parts: `memory.MergeBuffers.inner`)."""
        if self.stacked is not None:
            return self.stacked.flatten(1).float() @ grad.flatten().float()  # (S,)
        return torch.stack([part_inner(p, grad) for p in self.parts])

    def dense(self) -> torch.Tensor:
        """All task vectors as one `(S, *shape)` tensor (what data-free methods take)."""
        if self.stacked is not None:
            return self.stacked
        ref = next((p.A if isinstance(p, LowRankDelta) else p for p in self.parts if p is not None), None)
        zeros = lambda: torch.zeros(self.shape, dtype=ref.dtype if ref is not None else torch.float32)  # noqa: E731
        return torch.stack([zeros() if p is None else (p if isinstance(p, torch.Tensor) else p.dense())
                            for p in self.parts])


def part_inner(part: torch.Tensor | LowRankDelta | None, grad: torch.Tensor) -> torch.Tensor:
    """<grad, tau> of one source's dense or low-rank task vector (0 for None), float32."""
    if part is None:
        return torch.zeros((), device=grad.device)
    if isinstance(part, LowRankDelta):
        return part.inner(grad.float()).float()
    return torch.dot(part.flatten().float(), grad.flatten().float())


def load_task_vectors(
    plan: MergePlan, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", streaming: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, DeltaStack]]:
    """Base tensors and the task vectors of every merged tensor, read one tensor at a time.

    With `streaming`, neither the base nor full fine-tunes' task vectors are kept: they are re-read from disk,
    tensor by tensor, whenever learning needs them (`base` is then a `LazyTensors`), so memory holds about one
    model (the merge) whatever the number of sources.

    Returns:
        `(base, deltas)`: `base[name]` has the tensor's shape; `deltas[name]` holds its S task vectors.
    """
    lazy = LazyTensors(plan.base, plan.merged, dtype=dtype, device=device)
    base, deltas = lazy if streaming else {}, {}
    for name in plan.merged:
        theta_p = lazy[name]  # (*shape)
        if not streaming:
            base[name] = theta_p
        if not streaming and all(type(s) is ModelSpec for s in plan.sources):  # full fine-tunes: one stack
            deltas[name] = DeltaStack.from_dense(_dense_stack(plan.sources, name, theta_p))
            continue
        parts = [StreamedDelta(s, name, lazy) if streaming and isinstance(s, ModelSpec) else s.delta(name, theta_p)
                 for s in plan.sources]
        parts = [p.to(device=device, dtype=dtype) if p is not None else None for p in parts]
        deltas[name] = DeltaStack(theta_p.shape, parts)
    return base, deltas


def _dense_stack(sources: list[ModelSpec], name: str, base: torch.Tensor) -> torch.Tensor:
    """The task vectors of one tensor `(S, *shape)`, each fine-tune read straight into its row and the base
    subtracted in place: no per-source temporary, so loading leaves nothing for the allocator to fragment."""
    stacked = torch.empty((len(sources), *base.shape), dtype=base.dtype, device=base.device)
    for row, source in zip(stacked, sources):
        source.read_tensor(name, out=row).sub_(base)
    return stacked
