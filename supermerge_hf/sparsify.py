"""The steps TIES and DARE are built from: trim, drop and rescale, sign election, disjoint mean.

Each is a pure function of the task vectors of one tensor stacked over sources, `deltas  # (S, *shape)`;
`methods.py` composes them into registered merge methods. Definitions followed, and where the references differ
(peft 0.21.2 `utils/merge_utils.py`, mergekit 0.1.5, fusion-bench 0.2.33, as listed in `methods.py`):

- Trim (`ties`, `magnitude_prune`): per source keep the entries with |τ| >= the k-th largest |τ|,
  k = max(1, int(density · n)), n = entries of this tensor (`trim_scope="tensor"`) or of the whole task vector
  (`trim_scope="task"`). All entries tied at the threshold are kept (only matters for equal magnitudes, e.g.
  bf16 deltas; tied zeros change nothing). peft (per tensor): k = int(density · n), so a tensor with
  density · n < 1 is zeroed; exactly k entries (topk). mergekit (per tensor): k = max(1, int(density · n)),
  exactly k entries (argsort); its default density 1.0 trims nothing. fusion-bench (whole flattened task vector):
  keeps |τ| >= the (n - int(density · n))-th smallest, i.e. int(density · n) + 1 entries, one more than here.
- Elect sign: `"total"` = sign of Σ_s τ̂_s (TIES paper; mergekit `sum`), `"frequency"` = sign of Σ_s sign(τ̂_s)
  (peft's name; mergekit `count`). A zero sum elects +1 (peft, mergekit, here); fusion-bench gives it the sign
  of the sum of all elected signs.
- Disjoint mean: the sum of the entries whose sign is the elected one (zeros never agree) divided by their
  count (TIES paper; peft `ties` and `dare_ties`). mergekit `ties` divides by the sum of the weights of the
  agreeing sources (`normalize: true`), mergekit `dare_ties` does not divide (`normalize: false`), and
  fusion-bench's default config takes the disjoint sum (`merge_func: sum`, `scaling_factor: 0.3`).
- DARE: keep each entry with probability `density` (drop rate p = 1 - density), divide kept ones by `density`
  (DARE paper; peft `random_pruning(rescale=True)`; fusion-bench with another RNG draw, `rand > p`). The mask is
  `torch.bernoulli(torch.full_like(deltas, density), generator=generator)`, which for the same seed equals
  peft's (one `torch.bernoulli` per source on the global generator). mergekit 0.1.5 instead rescales each
  pruned tensor to keep its L1 norm (`rescale: true` is `RescaleNorm.l1`), and its `dare_ties` does not divide.
"""

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
    """Reshape `values  # (S,)` to broadcast against `deltas  # (S, *shape)`."""
    if values.shape != deltas.shape[:1]:
        expected = (deltas.shape[0],)
        raise ValueError(f"Expected one value per source, shape {expected}, got shape {tuple(values.shape)}.")
    return values.to(deltas.device).view(-1, *([1] * (deltas.dim() - 1)))  # (S, 1, ...)


def weighted(deltas: Tensor, weights: Tensor | None) -> Tensor:
    """`deltas  # (S, *shape)` times per-source `weights  # (S,)` (unchanged when None)."""
    return deltas if weights is None else deltas * _per_source(weights, deltas)  # (S, *shape)


def magnitude_thresholds(delta_chunks: Iterable[Tensor], density: float) -> Tensor:
    """Per source, the k-th largest |value| over all chunks, k = max(1, int(density * n)), n = entries per source.

    Pass every tensor of the task vectors (each `# (S, *shape_j)`, streamed) to trim over the whole task vector
    (the TIES paper); pass one tensor to trim that tensor alone. Exact: it gathers the absolute values of all
    chunks in float32 (twice, briefly, while concatenating), about 8 bytes per task-vector entry at peak.

    Args:
        delta_chunks (`Iterable[Tensor]`): Stacked task vectors of each tensor, `(S, *shape_j)`.
        density (`float`): The fraction of entries kept, in (0, 1].

    Returns:
        `Tensor`: `(S,)`, the thresholds to pass as `threshold` to [`ties`] or [`magnitude_prune`].
    """
    _check_density(density)
    # float32 (or float64) is exact for every lower precision and keeps kthvalue fast on CPU
    magnitudes = [c.abs().flatten(1).to(torch.promote_types(c.dtype, torch.float32)) for c in delta_chunks]
    if not magnitudes:
        raise ValueError("`delta_chunks` is empty: pass at least one tensor of shape (S, *shape).")
    magnitudes = torch.cat(magnitudes, dim=1)  # (S, N)
    n = magnitudes.shape[1]
    k = max(1, int(density * n))
    return magnitudes.kthvalue(n - k + 1, dim=1).values  # (S,)


def trim(deltas: Tensor, threshold: Tensor) -> Tensor:
    """Zero the entries of `deltas  # (S, *shape)` whose magnitude is below their source's `threshold  # (S,)`."""
    return deltas * (deltas.abs() >= _per_source(threshold, deltas))  # (S, *shape)


def drop_and_rescale(
    deltas: Tensor, density: float, *, generator: torch.Generator | None = None, mask: Tensor | None = None
) -> Tensor:
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
        raise ValueError(
            'trim_scope="task" needs `threshold`: compute it once with `magnitude_thresholds(all_deltas, density)`.'
        )
    if trim_scope == "tensor" and threshold is not None:
        raise ValueError('`threshold` is only used with trim_scope="task"; drop it or set trim_scope="task".')
    return trim(deltas, magnitude_thresholds([deltas], density) if threshold is None else threshold)
