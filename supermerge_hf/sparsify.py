"""The steps of TIES and DARE: pure functions of one tensor's task vectors over sources, `deltas  # (S, *shape)`.

Versus peft 0.21.2, mergekit 0.1.5, fusion-bench 0.2.33: trim keeps ties at the k-th largest |τ|, k = max(1,
int(density·n)) (peft: exactly int(density·n), maybe 0; mergekit: exactly k; fusion-bench: one more); a zero sign sum
elects +1; the disjoint mean divides by the agreeing count as peft (mergekit `ties`: by their weights; `dare_ties` and
fusion-bench: not at all); the DARE mask is peft's for a seed (mergekit rescales to keep the L1 norm instead)."""

from collections.abc import Iterable
from typing import Literal, get_args

import torch
from torch import Tensor

MajoritySignMethod = Literal["total", "frequency"]
TrimScope = Literal["tensor", "task"]


def _check_option(name: str, value: str, allowed: object) -> None:
    if value not in get_args(allowed):
        raise ValueError(f"`{name}` must be one of {list(get_args(allowed))}, got {value!r}.")


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"`density` is the fraction of entries kept and must be in (0, 1], got {density}.")


def _per_source(values: Tensor, deltas: Tensor) -> Tensor:
    if values.shape != deltas.shape[:1]:
        raise ValueError(f"Expected one value per source, shape {(deltas.shape[0],)}, got shape {tuple(values.shape)}.")
    return values.to(deltas.device).view(-1, *([1] * (deltas.dim() - 1)))  # (S,) -> (S, 1, ...)


def weighted(deltas: Tensor, weights: Tensor | None) -> Tensor:
    """`deltas  # (S, *shape)` times per-source `weights  # (S,)` (unchanged when None)."""
    return deltas if weights is None else deltas * _per_source(weights, deltas)  # (S, *shape)


def magnitude_thresholds(delta_chunks: Iterable[Tensor], density: float) -> Tensor:
    """Per source, the exact k-th largest |value| of all chunks, k = max(1, int(density * n)), n = entries per source.

    Args:
        delta_chunks (`Iterable[Tensor]`): `(S, *shape_j)` each: all tensors to trim the whole task vector, or one.
        density (`float`): The fraction of entries kept, in (0, 1].

    Returns:
        `Tensor`: `(S,)`, the `threshold` of [`trim`]; peak memory about 8 bytes per task-vector entry.
    """
    _check_density(density)
    magnitudes = [c.abs().reshape(len(c), -1).to(torch.promote_types(c.dtype, torch.float32))
                  for c in delta_chunks]  # (S, n_j); a 0-dim tensor (CLIP's logit_scale) gives (S, 1)
    if not magnitudes:
        raise ValueError("`delta_chunks` is empty: pass at least one tensor of shape (S, *shape).")
    magnitudes = torch.cat(magnitudes, dim=1)  # (S, N); float32 is exact for lower precisions, fast for kthvalue
    n = magnitudes.shape[1]
    return magnitudes.kthvalue(n - max(1, int(density * n)) + 1, dim=1).values  # (S,)


def trim(deltas: Tensor, threshold: Tensor) -> Tensor:
    """Zero the entries of `deltas  # (S, *shape)` whose magnitude is below their source's `threshold  # (S,)`."""
    return deltas * (deltas.abs() >= _per_source(threshold, deltas))  # (S, *shape)


def drop_and_rescale(deltas: Tensor, density: float, *, generator: torch.Generator | None = None,
                     mask: Tensor | None = None) -> Tensor:
    """DARE: keep each entry of `deltas  # (S, *shape)` with probability `density`, divide the kept ones by it."""
    _check_density(density)
    if mask is None:
        mask = torch.bernoulli(torch.full_like(deltas, density), generator=generator)  # (S, *shape)
    elif mask.shape != deltas.shape:
        raise ValueError(f"`mask` must have the shape of `deltas` {tuple(deltas.shape)}, got {tuple(mask.shape)}.")
    return deltas * mask / density  # (S, *shape)


def elect_sign(deltas: Tensor, majority_sign_method: MajoritySignMethod = "total") -> Tensor:
    """The elected sign (+1 or -1) of each entry of `deltas  # (S, *shape)`; a zero total elects +1."""
    _check_option("majority_sign_method", majority_sign_method, MajoritySignMethod)
    votes = deltas if majority_sign_method == "total" else deltas.sign()  # (S, *shape)
    return torch.where(votes.sum(dim=0) >= 0, 1, -1)  # (*shape)


def disjoint_mean(deltas: Tensor, sign: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over sources of the (weighted) entries whose sign is `sign  # (*shape)`; zero where none agrees."""
    agree = deltas.sign() == sign  # (S, *shape)
    return (weighted(deltas, weights) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)  # (*shape)


def trim_to_density(deltas: Tensor, density: float, trim_scope: TrimScope, threshold: Tensor | None) -> Tensor:
    """Trim each source to `density` of its entries, over this tensor or with a whole-task `threshold  # (S,)`."""
    _check_density(density)
    _check_option("trim_scope", trim_scope, TrimScope)
    if trim_scope == "task" and threshold is None:
        raise ValueError('trim_scope="task" needs `threshold`: `magnitude_thresholds(all_deltas, density)` gives it.')
    if trim_scope == "tensor" and threshold is not None:
        raise ValueError('`threshold` is only used with trim_scope="task"; drop it or set trim_scope="task".')
    return trim(deltas, magnitude_thresholds([deltas], density) if threshold is None else threshold)


def ties_trimmed(deltas: Tensor, *, density: float = 0.2) -> Tensor:
    """TIES preprocessing of AdaMerging++: per source keep the top entries that agree with the elected sign."""
    trimmed = trim(deltas, magnitude_thresholds([deltas], density))  # (S, *shape)
    return trimmed * (trimmed.sign() == elect_sign(trimmed))  # (S, *shape)


def ties_components(deltas: Tensor, threshold: Tensor) -> Tensor:
    """Each source's share of the TIES merge (equal weights, λ = 1): its entries kept by `threshold  # (S,)` that
    have the elected sign, divided by how many sources agree there; summed over sources, the [`disjoint_mean`]."""
    trimmed = trim(deltas, threshold)  # (S, *shape)
    agree = trimmed.sign() == elect_sign(trimmed)  # (S, *shape)
    return trimmed * agree / agree.sum(dim=0).clamp(min=1)  # (S, *shape)
