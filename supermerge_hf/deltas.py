"""Task vectors of one tensor, over all sources: dense, low-rank (LoRA), scales of the base (IA³) or streamed from
disk.

`DeltaStack` gives the two operations learning needs (method.md sections 3 and 5), each written once: the merge
base + sum_i c_i tau_i (`merge`, never differentiated: the gradient of c comes from `inner`) and <grad, tau_i>.
"""

from __future__ import annotations

import torch


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
        A, B = self.A.to(grad.dtype), self.B.to(grad.dtype)
        return self.scale * (B * (grad @ A.T)).sum()

    def to(self, **kwargs) -> LowRankDelta:
        return LowRankDelta(self.A.to(**kwargs), self.B.to(**kwargs), self.scale, self.transpose)


class ScaleDelta:
    """One IA³ source's task vector of one tensor: the base scaled by l - 1 along `dim` (method.md section 8), i.e.
    diag(l) W - W (`dim` 0) or W diag(l) - W (`dim` 1); `on_input`: l scales the layer's input (feed-forward type)
    rather than its output. Holds the base tensor it scales (a reference, not a copy)."""

    def __init__(self, vector: torch.Tensor, dim: int, base: torch.Tensor, on_input: bool) -> None:
        self.vector, self.dim, self.base, self.on_input = vector, dim, base, on_input  # vector: (n,) = l - 1

    def _view(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.view([-1 if d == self.dim else 1 for d in range(self.base.dim())])  # (n, 1) or (1, n)

    def dense(self) -> torch.Tensor:
        return self.base * self._view(self.vector.to(self.base.dtype))  # (*shape)

    def inner(self, grad: torch.Tensor) -> torch.Tensor:
        """<grad, (l - 1) * base>: the base-weighted gradient summed to one number per scale, dotted with l - 1."""
        weighted = (grad * self.base.to(grad.dtype)).movedim(self.dim, 0)  # (n, ...)
        return weighted.reshape(len(self.vector), -1).sum(1) @ self.vector.to(grad.dtype)

    def to(self, **kwargs) -> ScaleDelta:
        return ScaleDelta(self.vector.to(**kwargs), self.dim, self.base.to(**kwargs), self.on_input)


class Scratch:
    """Two reusable rows of the largest tensor's size that streamed reads go to: [base, one fine-tune]."""

    def __init__(self, numel: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        self.rows = torch.empty(2, numel, dtype=dtype, device=device)

    def read(self, source, name: str, shape: tuple[int, ...], slot: int) -> torch.Tensor:
        """Tensor `name` of `source` read into row `slot` (valid until the next read into that row)."""
        return source.read_tensor(name, out=self.rows[slot, : torch.Size(shape).numel()].view(shape))


class StreamedDelta:
    """A full fine-tune's task vector of one tensor, re-read from disk whenever it is used (streaming mode)."""

    def __init__(self, source, base_source, name: str, shape: tuple[int, ...], scratch: Scratch) -> None:
        self.source, self.base_source, self.name, self.shape, self.scratch = source, base_source, name, shape, scratch

    def dense(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """finetune - base in scratch (overwritten by the next read); pass the base when it is at hand."""
        if base is None:
            base = self.scratch.read(self.base_source, self.name, self.shape, 0)
        return self.scratch.read(self.source, self.name, self.shape, 1).sub_(base)


Delta = torch.Tensor | LowRankDelta | ScaleDelta | StreamedDelta | None  # None: the source does not change this tensor


def _as_dense(part: Delta, base: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(part, (LowRankDelta, ScaleDelta)):
        return part.dense()
    return part.dense(base) if isinstance(part, StreamedDelta) else part


class DeltaStack:
    """The S task vectors of one tensor; all-dense stacks are one `(S, *shape)` tensor (single tensor ops)."""

    def __init__(self, shape: tuple[int, ...], parts: list[Delta], *, dtype: torch.dtype = torch.float32,
                 stacked: torch.Tensor | None = None) -> None:
        self.shape, self.dtype = tuple(shape), dtype
        if stacked is None and parts and all(isinstance(p, torch.Tensor) for p in parts):
            stacked = torch.stack(parts)
        self.stacked = stacked  # the parts are views of it: the task vectors are never held twice
        self.parts = list(stacked) if stacked is not None else parts
        # e.g. frozen embeddings: the merge is the base whatever c, and the gradient of c is exactly zero
        self.is_zero = all(p is None for p in self.parts) or (stacked is not None and not stacked.any())

    @classmethod
    def from_dense(cls, stacked: torch.Tensor) -> DeltaStack:
        return cls(tuple(stacked.shape[1:]), [], dtype=stacked.dtype, stacked=stacked)

    @torch.no_grad()
    def merge(self, base: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """base + sum_i c_i tau_i `(*shape)` for coefficients `c` `(S,)`, or `(S, R)`: one per row (`R` =
        shape[0]), written into `out` (or a new tensor)."""
        out = torch.empty_like(base) if out is None else out
        if self.stacked is not None and c.dim() == 1:  # (S, n)^T @ (S,) straight into `out`, then the base
            torch.mv(self.stacked.view(len(c), -1).T, c.to(self.stacked.dtype), out=out.view(-1))
            return out.add_(base)
        out.copy_(base)
        for ci, part in zip(c.to(self.dtype) if c.dim() == 2 else c.tolist(), self.parts):
            if part is None:
                continue
            if c.dim() == 2:  # (R,) -> (R, 1, ...): row r of tau_i scaled by c[i, r]
                out.add_(_as_dense(part, base) * ci.view(-1, *[1] * (out.dim() - 1)))
            elif ci != 0.0:
                out.add_(_as_dense(part, base), alpha=ci)
        return out

    def inner(self, grad: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
        """<grad, tau_i> for every source `(S,)` float32, or per row `(S, R)`; streamed parts read one at a time."""
        if self.stacked is not None and not per_row:
            return self.stacked.reshape(len(self.stacked), -1).float() @ grad.flatten().float()  # (S,); 0-dim too
        if per_row:  # (S, R): one source at a time, no (S, *shape) temporary
            rows = grad.flatten(1).float()  # (R, n)
            return torch.stack([torch.zeros(len(rows), device=grad.device) if p is None
                                else (_as_dense(p).flatten(1).float() * rows).sum(-1) for p in self.parts])
        values = [torch.zeros((), device=grad.device) if p is None else p.inner(grad.float()).float()
                  if isinstance(p, (LowRankDelta, ScaleDelta))
                  else torch.dot(_as_dense(p).flatten().float(), grad.flatten().float()) for p in self.parts]
        return torch.stack(values)

    def dense(self) -> torch.Tensor:
        """All task vectors as one `(S, *shape)` tensor (what data-free methods take)."""
        if self.stacked is not None:
            return self.stacked
        zeros = torch.zeros(self.shape, dtype=self.dtype)
        return torch.stack([zeros if p is None else _as_dense(p).to(self.dtype, copy=True) for p in self.parts])
