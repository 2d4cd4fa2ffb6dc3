"""RegMean's merge of one linear layer (Jin et al., ICLR 2023), a pure function of its task vectors and Gram
matrices stacked over sources: `deltas  # (S, out, in)` in nn.Linear's orientation (y = x Wᵀ) and
`grams  # (S, in, in)`, G_s = X_sᵀ X_s / N_s over the layer's inputs on task s (`gram.py` computes them).

The least-squares merge min_W Σ_s ‖X_s W − X_s W_sᵀ‖² is W = (Σ_s G_s)⁻¹ Σ_s G_s W_sᵀ on Wᵀ `(in, out)`, with
the off-diagonals of every G_s scaled by `alpha` (fusion-bench's `reduce_non_diagonal_ratio`). On task vectors it
is the same merge: (Σ_s G_s)⁻¹ Σ_s G_s W_pᵀ = W_pᵀ. Solved in float64; results come back in the input's dtype.
"""

import torch
from torch import Tensor


def scale_off_diagonal(grams: Tensor, alpha: float) -> Tensor:
    """Each `(..., n, n)` matrix with its off-diagonal entries times `alpha`, the diagonal kept."""
    eye = torch.eye(grams.shape[-1], dtype=torch.bool, device=grams.device)  # (n, n)
    return torch.where(eye, grams, alpha * grams)


def regmean_merge(deltas: Tensor, grams: Tensor, alpha: float = 0.9) -> Tensor:
    """The merged task vector `(out, in)`: ((Σ_s G̃_s)⁻¹ Σ_s G̃_s τ_sᵀ)ᵀ with G̃_s = `scale_off_diagonal(G_s, alpha)`.

    An input feature that is zero on every input of every task (a zero diagonal entry of Σ_s G_s) leaves its
    weights unconstrained; they take the mean of the task vectors (the system decouples: its row and column are 0).

    Raises:
        `ValueError`: The summed Gram matrix is singular (with `alpha` 1: fewer independent input rows than features).
    """
    if deltas.shape[0] != grams.shape[0] or grams.shape[1:] != (deltas.shape[-1],) * 2:
        raise ValueError(f"RegMean takes task vectors (S, out, in) and Gram matrices (S, in, in) of the same S "
                         f"sources, got {tuple(deltas.shape)} and {tuple(grams.shape)}.")
    tau = deltas.to(torch.float64).transpose(1, 2)  # (S, in, out)
    grams = scale_off_diagonal(grams.to(torch.float64), alpha)  # (S, in, in)
    total = grams.sum(dim=0)  # (in, in)
    rhs = (grams @ tau).sum(dim=0)  # (in, out)
    active = total.diagonal() > 0  # (in,)
    total = total[active][:, active]  # (a, a)
    chol, info = torch.linalg.cholesky_ex(total)  # (a, a), lower
    # pivot² of feature k: the part of its Gram entry that the features before it do not explain (≥ (1 − α) of it)
    if info or (chol.diagonal() ** 2 <= 1e-10 * total.diagonal()).any():
        raise ValueError(f"The summed Gram matrix of a {tuple(deltas.shape[1:])} layer is singular (alpha={alpha}): "
                         "give more inputs per task, or an alpha below 1 (the paper's 0.9).")
    merged = tau.mean(dim=0)  # (in, out)
    merged[active] = torch.cholesky_solve(rhs[active], chol)  # (a, out)
    return merged.T.to(deltas.dtype)  # (out, in)


def regmean(deltas: Tensor, *, grams: Tensor | None = None, alpha: float = 0.9) -> Tensor:
    """The registered merge of `regmean` / `regmean_plusplus`: [`regmean_merge`] of a linear layer's task vectors
    with their Gram matrices; the mean of any other tensor's (biases, norms, embeddings), as the paper and
    fusion-bench."""
    return deltas.mean(dim=0) if grams is None else regmean_merge(deltas, grams, alpha)  # (*shape)
