"""The spectral merges of one matrix: pure functions of its task vectors stacked over sources, `deltas  # (S, m, n)`.

TSV-M (Gargiulo et al., CVPR 2025), Iso-C and Iso-CTS (Marczak et al., ICML 2025). `r = min(m, n)`. SVDs run in
float32 or wider (half precisions have none) and results come back in the input's dtype. Versus the authors' code
(as in fusion-bench 0.2.33): the same ranks, concatenating the kept directions instead of placing them in zero
matrices (the same product); where S > r TSV-M keeps one direction per task (the authors' code keeps none, a zero
update) and Iso-CTS never gives the tasks more than r directions in all.
"""

import torch
from torch import Tensor


def _wide(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of `matrix  # (..., m, n)`: U `(..., m, r)`, σ `(..., r)` descending, Vᵀ `(..., r, n)`."""
    return torch.linalg.svd(_wide(matrix), full_matrices=False)


def _side_by_side(u: Tensor, k: int) -> Tensor:
    """Each source's first `k` left singular vectors, `u  # (S, m, r)`, side by side: `[U_1 … U_S]  # (m, S·k)`."""
    return u[..., :k].transpose(0, 1).flatten(1)  # (S, m, k) -> (m, S, k) -> (m, S·k)


def nearest_orthogonal(matrix: Tensor) -> Tensor:
    """The matrix with orthonormal columns (or rows, if wider than tall) nearest `matrix  # (m, n)` in Frobenius
    norm: P Qᵀ, from its SVD P Σ Qᵀ."""
    p, _, qh = _svd(matrix)  # (m, r), (r,), (r, n)
    return p @ qh  # (m, n)


def isotropic(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """σ̄ U Vᵀ: the directions `u  # (m, r)`, `vh  # (r, n)` with every singular value the mean of `s  # (r,)`."""
    return s.mean() * (u @ vh)  # (m, n)


def _tsv_factors(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M's U `(m, S·k)`, σ `(S·k,)` and Vᵀ `(S·k, n)`: each source's top k = ⌊r / S⌋ (at least 1) singular
    triplets side by side, U and V replaced by their nearest orthogonal matrices."""
    num_sources, rank = deltas.shape[0], min(deltas.shape[1:])
    k = max(1, rank // num_sources)
    u, s, vh = _svd(deltas)  # (S, m, r), (S, r), (S, r, n)
    u_all = nearest_orthogonal(_side_by_side(u, k))  # (m, S·k)
    vh_all = nearest_orthogonal(vh[:, :k].flatten(0, 1))  # (S, k, n) -> (S·k, n)
    return u_all, s[:, :k].flatten(), vh_all


def tsv_merge(deltas: Tensor) -> Tensor:
    """TSV-M: each source's top k = ⌊r / S⌋ (at least 1) singular triplets, stacked as U = [U_1 … U_S],
    S = blockdiag(S_1 … S_S), V = [V_1 … V_S]; U and V replaced by their nearest orthogonal matrices; U S Vᵀ."""
    u_all, s, vh_all = _tsv_factors(deltas)
    return ((u_all * s) @ vh_all).to(deltas.dtype)  # (m, S·k) · diag(S·k) · (S·k, n) -> (m, n)


def tsv_components(deltas: Tensor) -> Tensor:
    """Each source's share of [`tsv_merge`], `(S, m, n)`: its k columns of the orthogonalised U times its σ times
    its k rows of the orthogonalised Vᵀ; they sum to the TSV-M merge."""
    u_all, s, vh_all = _tsv_factors(deltas)
    num_sources = deltas.shape[0]
    u = (u_all * s).unflatten(1, (num_sources, -1)).movedim(1, 0)  # (m, S·k) -> (S, m, k)
    return (u @ vh_all.unflatten(0, (num_sources, -1))).to(deltas.dtype)  # (S, m, k) @ (S, k, n) -> (S, m, n)


def iso_c_merge(deltas: Tensor) -> Tensor:
    """Iso-C: the sum of the task vectors with its spectrum made flat, σ̄ U Vᵀ of Σ_s τ_s = U Σ Vᵀ."""
    return isotropic(*_svd(_wide(deltas).sum(dim=0))).to(deltas.dtype)  # (m, n)


def iso_cts_merge(deltas: Tensor, common_space_fraction: float = 0.8) -> Tensor:
    """Iso-CTS: the top c ≈ `common_space_fraction` · r directions of Σ_s τ_s (the common subspace) and each
    task's top (r − c) / S directions outside that subspace; U and V made orthogonal, the spectrum flat."""
    num_sources, rank, dtype = deltas.shape[0], min(deltas.shape[1:]), deltas.dtype
    deltas = _wide(deltas)  # (S, m, n)
    per_task = min(round((rank - int(rank * common_space_fraction)) / num_sources), rank // num_sources)
    common = rank - num_sources * per_task  # so that the task-specific directions split evenly
    u, s, vh = _svd(deltas.sum(dim=0))  # (m, r), (r,), (r, n)
    u_c = u[:, :common]  # (m, c)
    outside = deltas - u_c @ (u_c.T @ deltas)  # (S, m, n): each task vector with the common subspace projected out
    u_t, s_t, vh_t = _svd(outside)  # (S, m, r), (S, r), (S, r, n)
    u_all = torch.cat([u_c, _side_by_side(u_t, per_task)], dim=1)  # (m, r)
    s_all = torch.cat([s[:common], s_t[:, :per_task].flatten()])  # (r,)
    vh_all = torch.cat([vh[:common], vh_t[:, :per_task].flatten(0, 1)])  # (r, n)
    return isotropic(nearest_orthogonal(u_all), s_all, nearest_orthogonal(vh_all)).to(dtype)  # (m, n)
