"""The registry of merge methods and the data-free merge math.

Every data-free method is a pure function of the stacked task vectors of one tensor, `deltas  # (S, *shape)`,
returning the merged delta `# (*shape)`; the caller adds the base. The learned methods (`adamerging`,
`adamerging_plus`, `supermerge`) are only registered here; the merger runs them.

Arguments of the data-free merge functions (keyword-only after `deltas`; each takes the ones it uses):
    deltas (`Tensor`): the task vectors of one tensor stacked over sources, `(S, *shape)`.
    weights (`Tensor`, *optional*): `(S,)` per-source weights; `None` means 1 (1/S for `average`).
    lam (`float`, defaults to 1.0): λ, multiplies the merged delta last.
    density (`float`, 0.2 for trimming, 0.5 for DARE): fraction of entries kept per source, in (0, 1];
        DARE's drop rate is p = 1 - density.
    majority_sign_method (`"total"` or `"frequency"`, defaults to `"total"`): elect by summed values or signs.
    trim_scope (`"tensor"` or `"task"`, defaults to `"tensor"`): trim each tensor alone, or over the whole task
        vector of each source with `threshold  # (S,)` computed once by `magnitude_thresholds`.
    generator (`torch.Generator`, *optional*) / mask (`Tensor`, *optional*, `(S, *shape)`): DARE's random mask
        is drawn from `generator` (the global one when `None`), or given as `mask`.

Definitions followed, and where the references differ (read in peft 0.21.2 `utils/merge_utils.py`; mergekit 0.1.5
`merge_methods/{generalized_task_arithmetic,linear}.py`, `sparsify.py`; fusion-bench 0.2.33
`method/ties_merging/ties_merging_utils.py` (AdaMerging's copy of the TIES code), `method/dare/utils.py`):

- `average`: Σ_s w_s τ_s / Σ_s w_s, the plain mean when `weights` is None; mergekit `linear` (`normalize: true`
  by default) computes Σ_s w_s θ_s / Σ_s w_s on full weights, which is the same.
- `task_arithmetic`: λ Σ_s w_s τ_s, as mergekit (`lambda` 1.0, `normalize` off by default); peft has no λ.
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
- `weights` in `ties` / `dare_ties`, as peft: the sign is elected on the UNWEIGHTED trimmed deltas, the weights
  multiply the deltas inside the disjoint mean. mergekit multiplies by the weights BEFORE electing. The TIES
  paper and fusion-bench have no per-source weights. All agree when the weights are 1.
- λ (`lam`) multiplies the merged delta last (mergekit `lambda`, after `normalize`; fusion-bench
  `scaling_factor`). peft has no λ: fold it into `weights` there.
- DARE: keep each entry with probability `density` (drop rate p = 1 - density), divide kept ones by `density`
  (DARE paper; peft `random_pruning(rescale=True)`; fusion-bench with another RNG draw, `rand > p`). The mask is
  `torch.bernoulli(torch.full_like(deltas, density), generator=generator)`, which for the same seed equals
  peft's (one `torch.bernoulli` per source on the global generator). mergekit 0.1.5 instead rescales each
  pruned tensor to keep its L1 norm (`rescale: true` is `RescaleNorm.l1`), and its `dare_ties` does not divide.
- `magnitude_prune`: trim, then λ Σ_s w_s τ̂_s without rescaling (peft; mergekit has no such method).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

MethodKind = Literal["data_free", "learned"]
MajoritySignMethod = Literal["total", "frequency"]
TrimScope = Literal["tensor", "task"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Args:
        name (`str`): The name users type (`"ties"`).
        description (`str`): One line for `supermerge methods` and model cards.
        url (`str`): The paper.
        kind (`Literal["data_free", "learned"]`): Data-free methods merge tensor by tensor with `merge`; learned
            methods need examples and are run by the merger.
        merge (`Callable | None`): The merge function of a data-free method, `None` for a learned one.
    """

    name: str
    description: str
    url: str
    kind: MethodKind
    merge: Callable[..., Tensor] | None


METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, *, description: str, url: str, kind: MethodKind = "data_free"):
    """Register a merge method under `name`: decorate its merge function, or call the decorator on `None` for a
    learned method (`register_method("supermerge", ..., kind="learned")(None)`).

    Raises:
        `ValueError`: if `name` is already registered.
        `TypeError`: if a data-free method comes without a merge function, or a learned one with one.
    """

    def register(merge: Callable[..., Tensor] | None) -> Callable[..., Tensor] | None:
        if name in METHODS:
            raise ValueError(f"Merge method {name!r} is already registered.")
        if (merge is None) != (kind == "learned"):
            expected = "None" if kind == "learned" else "a merge function"
            raise TypeError(f"A {kind} method is registered with {expected}, got {merge!r}.")
        METHODS[name] = MergeMethod(name=name, description=description, url=url, kind=kind, merge=merge)
        return merge

    return register


def get_method(name: str) -> MergeMethod:
    """Return the registered method `name`.

    Raises:
        `ValueError`: if `name` is not registered; the message lists the known names.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown merge method {name!r}. Known methods: {sorted(METHODS)}.")
    return METHODS[name]


# ---- small steps -------------------------------------------------------------------------------------------


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


def _weighted(deltas: Tensor, weights: Tensor | None) -> Tensor:
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
    return (_weighted(deltas, weights) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)  # (*shape)


def _trim_to_density(deltas: Tensor, density: float, trim_scope: TrimScope, threshold: Tensor | None) -> Tensor:
    _check_density(density)
    _check_option("trim_scope", trim_scope, TrimScope)
    if trim_scope == "task" and threshold is None:
        raise ValueError(
            'trim_scope="task" needs `threshold`: compute it once with `magnitude_thresholds(all_deltas, density)`.'
        )
    if trim_scope == "tensor" and threshold is not None:
        raise ValueError('`threshold` is only used with trim_scope="task"; drop it or set trim_scope="task".')
    return trim(deltas, magnitude_thresholds([deltas], density) if threshold is None else threshold)


# ---- data-free methods -------------------------------------------------------------------------------------
# Each takes `deltas  # (S, *shape)` and returns the merged delta `# (*shape)`; the arguments are documented
# once, in the module docstring.


@register_method(
    "average", url="https://arxiv.org/abs/2203.05482",
    description="Uniform or weighted mean of the task vectors (model soups).",
)
def average(deltas: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Σ_s w_s τ_s / Σ_s w_s; the plain mean when `weights` is None."""
    if weights is None:
        return deltas.mean(dim=0)  # (*shape)
    if weights.sum() == 0:
        raise ValueError(f"`average` divides by the sum of `weights`, which is 0: {weights.tolist()}.")
    return _weighted(deltas, weights).sum(dim=0) / weights.sum()  # (*shape)


@register_method(
    "task_arithmetic", url="https://arxiv.org/abs/2212.04089",
    description="λ times the (weighted) sum of the task vectors.",
)
def task_arithmetic(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0) -> Tensor:
    """λ Σ_s w_s τ_s."""
    return lam * _weighted(deltas, weights).sum(dim=0)  # (*shape)


@register_method(
    "magnitude_prune", url="https://arxiv.org/abs/2306.01708",
    description="Keep the largest-magnitude entries of each task vector, then sum.",
)
def magnitude_prune(
    deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.2,
    trim_scope: TrimScope = "tensor", threshold: Tensor | None = None,
) -> Tensor:
    """Trim to `density`, then λ Σ_s w_s τ̂_s (no rescaling)."""
    trimmed = _trim_to_density(deltas, density, trim_scope, threshold)  # (S, *shape)
    return task_arithmetic(trimmed, weights=weights, lam=lam)


@register_method(
    "ties", url="https://arxiv.org/abs/2306.01708",
    description="Trim, elect sign, disjoint mean (TIES-Merging).",
)
def ties(
    deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.2,
    majority_sign_method: MajoritySignMethod = "total", trim_scope: TrimScope = "tensor",
    threshold: Tensor | None = None,
) -> Tensor:
    """Trim to `density`, elect the sign of the unweighted trimmed deltas, λ × disjoint mean of the weighted ones."""
    trimmed = _trim_to_density(deltas, density, trim_scope, threshold)  # (S, *shape)
    return lam * disjoint_mean(trimmed, elect_sign(trimmed, majority_sign_method), weights)  # (*shape)


@register_method(
    "dare_linear", url="https://arxiv.org/abs/2311.03099",
    description="Random drop and rescale (DARE), then task arithmetic.",
)
def dare_linear(
    deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.5,
    generator: torch.Generator | None = None, mask: Tensor | None = None,
) -> Tensor:
    """Drop with probability 1 - `density`, rescale by 1 / `density`, then λ Σ_s w_s τ̃_s."""
    dropped = drop_and_rescale(deltas, density, generator=generator, mask=mask)  # (S, *shape)
    return task_arithmetic(dropped, weights=weights, lam=lam)


@register_method(
    "dare_ties", url="https://arxiv.org/abs/2311.03099",
    description="Random drop and rescale (DARE), then sign election and disjoint mean.",
)
def dare_ties(
    deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.5,
    majority_sign_method: MajoritySignMethod = "total", generator: torch.Generator | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Drop and rescale as [`dare_linear`], then elect the sign and take the disjoint mean as [`ties`]."""
    dropped = drop_and_rescale(deltas, density, generator=generator, mask=mask)  # (S, *shape)
    return lam * disjoint_mean(dropped, elect_sign(dropped, majority_sign_method), weights)  # (*shape)


# ---- learned methods (run by the merger) -------------------------------------------------------------------

register_method(
    "adamerging", kind="learned", url="https://arxiv.org/abs/2310.02575",
    description="Task- or layer-wise coefficients in [0, 1] learned by entropy minimisation on unlabelled inputs.",
)(None)
register_method(
    "adamerging_plus", kind="learned", url="https://arxiv.org/abs/2310.02575",
    description="AdaMerging++: AdaMerging applied to TIES-trimmed task vectors.",
)(None)
register_method(
    "supermerge", kind="learned", url="https://arxiv.org/abs/2412.10416",
    description="Per-tensor tanh coefficients learned with a supervised loss on a few labelled examples.",
)(None)
