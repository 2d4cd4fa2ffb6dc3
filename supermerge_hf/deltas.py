"""Task vectors of one tensor, over all sources: dense, low-rank (LoRA), scales of the base (IA³), a matrix's singular
directions (`granularity: singular`) or streamed from disk.

`DeltaStack` gives the two operations learning needs (method.md sections 3 and 5), each written once: the merge
base + sum_i c_i tau_i (`merge`, never differentiated: the gradient of c comes from `inner`) and <grad, tau_i>.
"""

from __future__ import annotations

import torch


class LowRankDelta:
    """One source's task vector of one weight in LoRA form: scale * B @ A, transposed for `fan_in_fan_out`."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, transpose: bool = False) -> None:
        self.A, self.B, self.scale, self.transpose = A, B, scale, transpose  # A: (r, in), B: (out, r)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self, c: torch.Tensor | None = None) -> torch.Tensor:
        """scale * B A, or with `c` `(>= r,)` rank by rank scale * B diag(c) A."""
        B = self.B if c is None else self.B * c[: self.rank].to(self.B.dtype)  # (out, r)
        delta = self.scale * (B @ self.A)  # (out, in)
        return delta.T if self.transpose else delta

    def inner(self, grad: torch.Tensor, *, per_rank: bool = False) -> torch.Tensor:
        """<grad, scale * B A> without forming B A: scale * sum(B * (grad @ A^T)); `per_rank`: one per rank `(r,)`."""
        grad = grad.T if self.transpose else grad  # (out, in)
        A, B = self.A.to(grad.dtype), self.B.to(grad.dtype)
        values = self.scale * (B * (grad @ A.T)).sum(0)  # (r,)
        return values if per_rank else values.sum()

    def singular(self, c: torch.Tensor | None = None) -> LowRankDelta:
        """The same task vector with its singular directions as ranks: scale * B A = U diag(S) V^T from the QRs of B
        and A^T and the SVD of the small (r, r) core (never B A itself), in float64; returned as A = V^T, B = U diag(S)
        (times `c` `(>= k,)` direction by direction), scale 1, directions with S numerically 0 dropped (one kept)."""
        q_b, r_b = torch.linalg.qr(self.B.double())  # (out, r), (r, r)
        q_a, r_a = torch.linalg.qr(self.A.double().T)  # (in, r), (r, r)
        u, s, vh = torch.linalg.svd(self.scale * r_b @ r_a.T, full_matrices=False)  # the core (r, r)
        k = max(_rank(s, self.B.shape[0], self.A.shape[1]), 1)  # B = 0 (an untrained LoRA): one direction of S 0
        s = s[:k] if c is None else s[:k] * c[:k].double()  # (k,)
        B, A = (q_b @ u[:, :k]) * s, vh[:k] @ q_a.T  # (out, k), (k, in)
        return LowRankDelta(A.to(self.A.dtype), B.to(self.B.dtype), 1.0, self.transpose)

    def to(self, **kwargs) -> LowRankDelta:
        return LowRankDelta(self.A.to(**kwargs), self.B.to(**kwargs), self.scale, self.transpose)


def _rank(s: torch.Tensor, *shape: int) -> int:
    """How many singular values `s` (descending) are not numerically 0 (torch.linalg.matrix_rank's tolerance in
    float32): dropping the others changes no merge beyond float32 rounding."""
    return int((s > s[0] * max(shape) * torch.finfo(torch.float32).eps).sum()) if len(s) and s[0] > 0 else 0


class SingularDelta:
    """One source's task vector of a matrix (as stored) as its thin SVD U diag(S) V^T (method.md section 9), computed
    once in float64, numerically-0 directions dropped: a coefficient per direction scales S."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
        self.U, self.S, self.Vh = U, S, Vh  # (m, k), (k,), (k, n)

    @classmethod
    def of(cls, delta: torch.Tensor) -> SingularDelta | None:
        """The SVD of a dense `(m, n)` task vector, in its dtype; None where it is 0."""
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (m, k), (k,), (k, n)
        k = _rank(s, *delta.shape)
        return cls(u[:, :k].to(delta.dtype), s[:k].to(delta.dtype), vh[:k].to(delta.dtype)) if k else None

    @property
    def rank(self) -> int:
        return len(self.S)

    def dense(self, c: torch.Tensor | None = None) -> torch.Tensor:
        """U diag(S) V^T, or with `c` `(>= k,)` U diag(c S) V^T `(m, n)`."""
        S = self.S if c is None else self.S * c[: self.rank].to(self.S.dtype)  # (k,)
        return (self.U * S) @ self.Vh

    def inner(self, grad: torch.Tensor, *, per_rank: bool = False) -> torch.Tensor:
        """<grad, U diag(S) V^T>, or per direction `(k,)`: s_k u_k^T grad v_k."""
        U, S, Vh = (t.to(grad.dtype) for t in (self.U, self.S, self.Vh))
        values = ((grad @ Vh.T) * U).sum(0) * S  # (k,)
        return values if per_rank else values.sum()

    def to(self, **kwargs) -> SingularDelta:
        return SingularDelta(self.U.to(**kwargs), self.S.to(**kwargs), self.Vh.to(**kwargs))


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


# None: the source does not change this tensor
Delta = torch.Tensor | LowRankDelta | ScaleDelta | SingularDelta | StreamedDelta | None


def _as_dense(part: Delta, base: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(part, (LowRankDelta, ScaleDelta, SingularDelta)):
        return part.dense()
    return part.dense(base) if isinstance(part, StreamedDelta) else part


def _factored(part: Delta, base: torch.Tensor | None = None) -> LowRankDelta | SingularDelta | None:
    """A part of a `singular()` stack in singular directions: a streamed one is factorised here, at each use."""
    return SingularDelta.of(part.dense(base).float()) if isinstance(part, StreamedDelta) else part


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

    def singular(self) -> DeltaStack:
        """The same task vectors of a matrix in singular directions (method.md section 9): dense ones by their thin SVD
        (`SingularDelta`), LoRA ones from their factors (`LowRankDelta.singular`); streamed ones stay (factorised at
        each use: slow). A task vector that is 0 becomes None."""
        parts = [p.singular() if isinstance(p, LowRankDelta) else SingularDelta.of(p) if isinstance(p, torch.Tensor)
                 else p for p in self.parts]
        return DeltaStack(self.shape, parts, dtype=self.dtype)

    @torch.no_grad()
    def merge(self, base: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None, *,
              directions: bool = False) -> torch.Tensor:
        """base + sum_i c_i tau_i `(*shape)` for coefficients `c` `(S,)`, or `(S, R)`: one per row (`R` =
        shape[0]) or, with `directions` (a `singular()` stack), one per singular direction, written into `out` (or a
        new tensor)."""
        out = torch.empty_like(base) if out is None else out
        if self.stacked is not None and c.dim() == 1:  # (S, n)^T @ (S,) straight into `out`, then the base
            torch.mv(self.stacked.view(len(c), -1).T, c.to(self.stacked.dtype), out=out.view(-1))
            return out.add_(base)
        out.copy_(base)
        if directions:  # source i: sum_k c[i, k] s_ik u_ik v_ik^T over its k_i directions
            for ci, part in zip(c, self.parts):
                part = _factored(part, base)
                if part is not None:
                    out.add_(part.dense(ci).to(out.dtype))
            return out
        for ci, part in zip(c.to(self.dtype) if c.dim() == 2 else c.tolist(), self.parts):
            if part is None:
                continue
            if c.dim() == 2:  # (R,) -> (R, 1, ...): row r of tau_i scaled by c[i, r]
                out.add_(_as_dense(part, base) * ci.view(-1, *[1] * (out.dim() - 1)))
            elif ci != 0.0:
                out.add_(_as_dense(part, base), alpha=ci)
        return out

    def inner(self, grad: torch.Tensor, *, per_row: bool = False, directions: int = 0) -> torch.Tensor:
        """<grad, tau_i> for every source `(S,)` float32, or per row `(S, R)`, or per singular direction `(S,
        directions)` (a `singular()` stack: s_ik u_ik^T grad v_ik, 0 past a part's k_i); streamed parts read one at a
        time."""
        if directions:
            out = torch.zeros(len(self.parts), directions, device=grad.device)  # (S, k)
            for row, part in zip(out, self.parts):
                part = _factored(part)
                if part is not None:
                    row[: part.rank] = part.inner(grad.float(), per_rank=True)
            return out
        if self.stacked is not None and not per_row:
            return self.stacked.reshape(len(self.stacked), -1).float() @ grad.flatten().float()  # (S,); 0-dim too
        if per_row:  # (S, R): one source at a time, no (S, *shape) temporary
            rows = grad.flatten(1).float()  # (R, n)
            return torch.stack([torch.zeros(len(rows), device=grad.device) if p is None
                                else (_as_dense(p).flatten(1).float() * rows).sum(-1) for p in self.parts])
        values = [torch.zeros((), device=grad.device) if p is None else p.inner(grad.float()).float()
                  if isinstance(p, (LowRankDelta, ScaleDelta, SingularDelta))
                  else torch.dot(_as_dense(p).flatten().float(), grad.flatten().float()) for p in self.parts]
        return torch.stack(values)

    def dense(self) -> torch.Tensor:
        """All task vectors as one `(S, *shape)` tensor (what data-free methods take)."""
        if self.stacked is not None:
            return self.stacked
        zeros = torch.zeros(self.shape, dtype=self.dtype)
        return torch.stack([zeros if p is None else _as_dense(p).to(self.dtype, copy=True) for p in self.parts])
