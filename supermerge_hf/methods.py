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

Definitions followed (the trim, sign election, disjoint mean and DARE steps: `sparsify.py`), and where the
references differ (read in peft 0.21.2 `utils/merge_utils.py`; mergekit 0.1.5
`merge_methods/{generalized_task_arithmetic,linear}.py`, `sparsify.py`; fusion-bench 0.2.33
`method/ties_merging/ties_merging_utils.py` (AdaMerging's copy of the TIES code), `method/dare/utils.py`):

- `average`: Σ_s w_s τ_s / Σ_s w_s, the plain mean when `weights` is None; mergekit `linear` (`normalize: true`
  by default) computes Σ_s w_s θ_s / Σ_s w_s on full weights, which is the same.
- `task_arithmetic`: λ Σ_s w_s τ_s, as mergekit (`lambda` 1.0, `normalize` off by default); peft has no λ.
- `weights` in `ties` / `dare_ties`, as peft: the sign is elected on the UNWEIGHTED trimmed deltas, the weights
  multiply the deltas inside the disjoint mean. mergekit multiplies by the weights BEFORE electing. The TIES
  paper and fusion-bench have no per-source weights. All agree when the weights are 1.
- λ (`lam`) multiplies the merged delta last (mergekit `lambda`, after `normalize`; fusion-bench
  `scaling_factor`). peft has no λ: fold it into `weights` there.
- `magnitude_prune`: trim, then λ Σ_s w_s τ̂_s without rescaling (peft; mergekit has no such method).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .sparsify import (
    MajoritySignMethod,
    TrimScope,
    disjoint_mean,
    drop_and_rescale,
    elect_sign,
    trim_to_density,
    weighted,
)

MethodKind = Literal["data_free", "learned"]


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
    return weighted(deltas, weights).sum(dim=0) / weights.sum()  # (*shape)


@register_method(
    "task_arithmetic", url="https://arxiv.org/abs/2212.04089",
    description="λ times the (weighted) sum of the task vectors.",
)
def task_arithmetic(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0) -> Tensor:
    """λ Σ_s w_s τ_s."""
    return lam * weighted(deltas, weights).sum(dim=0)  # (*shape)


@register_method(
    "magnitude_prune", url="https://arxiv.org/abs/2306.01708",
    description="Keep the largest-magnitude entries of each task vector, then sum.",
)
def magnitude_prune(
    deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.2,
    trim_scope: TrimScope = "tensor", threshold: Tensor | None = None,
) -> Tensor:
    """Trim to `density`, then λ Σ_s w_s τ̂_s (no rescaling)."""
    trimmed = trim_to_density(deltas, density, trim_scope, threshold)  # (S, *shape)
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
    trimmed = trim_to_density(deltas, density, trim_scope, threshold)  # (S, *shape)
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
