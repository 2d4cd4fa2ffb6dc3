"""The registry of merge methods: what each one does, its typed hyperparameters, and the data-free math.

A data-free method is a pure function of the task vectors of one tensor stacked over sources, `deltas  # (S,
*shape)`, returning the merged delta `# (*shape)`; `weights` are per-source (`None` = 1), λ (`lam`, the SVD-era
papers' α) multiplies last, and in `ties` / `dare_ties` the sign is elected on the unweighted deltas (as peft; see
`sparsify.py`); the spectral math of `tsv_m` / `iso_c` / `iso_cts` is in `spectral.py`, RegMean's (a statistics
method: its merge also takes `grams`, from `gram.py`) in `regmean.py`. A learned method declares the objective,
coefficient transform and preprocessing that `learning.learn` runs."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .hyperparameters import Hyperparameter, check_hyperparameters
from .regmean import regmean
from .sparsify import (MajoritySignMethod, TrimScope, disjoint_mean, drop_and_rescale, elect_sign, ties_trimmed,
                       trim_to_density, weighted)
from .spectral import iso_c_merge, iso_cts_merge, tsv_merge

Objective = Literal["supervised", "entropy"]
Statistics = Literal["gram", "gram_sequential", "block_distill"]
LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
ISO_LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))  # Iso-C / Iso-CTS's α goes past 1 (authors: to 3)
DENSITY_GRID = (0.1, 0.2, 0.3, 0.5, 0.7)
START_CHOICES = ("auto", "constant", "task_arithmetic", "ties", "tsv_m")  # SuperMerge's `start`, `start.py`
LAM = Hyperparameter(float, 1.0, low=0.0, auto=True, grid=LAMBDA_GRID)
ISO_LAM = Hyperparameter(float, 1.0, low=0.0, auto=True, grid=ISO_LAMBDA_GRID)
WEIGHTS = Hyperparameter(list, None)
SIGN = Hyperparameter(str, "total", choices=("total", "frequency"))
SCOPE = Hyperparameter(str, "tensor", choices=("tensor", "task"))
ALPHA = Hyperparameter(float, 0.9, low=0.0, high=1.0)  # RegMean's off-diagonal scale (fusion-bench: 0.95 on CLIP)


def _density(default: float) -> Hyperparameter:
    return Hyperparameter(float, default, low=1e-6, high=1.0, auto=True, grid=DENSITY_GRID)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: `name` (as users type it), a one-line `description`, the paper's `url`, and
    what it does: `merge` (a data-free function, else `None`), `hyperparameters` (the accepted `method_kwargs`),
    `objective` (learned: `supervised` loss on labels, or `entropy` of predictions on unlabelled inputs),
    `transform` (forced by the method: `"none"`, clamped to [0, 1], for AdaMerging; `None` takes the config's),
    `preprocess` (applied to each tensor's stacked task vectors with the hyperparameters: AdaMerging++'s TIES
    trimming), `random` (the merge draws a mask from `generator`), `needs_depth` (the merge takes `depth`, the
    tensor's layer depth in [0, 1] from `plan.layer_depths`), `statistics` (the merge takes `grams` of the inputs,
    `gram.py`) and `granularity` (what shares a coefficient when the config names none: SuperMerge's `row`)."""

    name: str
    description: str
    url: str
    merge: Callable[..., Tensor] | None = None
    hyperparameters: dict[str, Hyperparameter] = field(default_factory=dict)
    objective: Objective | None = None
    transform: str | None = None
    preprocess: Callable[..., Tensor] | None = None
    random: bool = False
    needs_depth: bool = False
    statistics: Statistics | None = None
    granularity: str = "tensor"

    @property
    def kind(self) -> str:
        return "learned" if self.objective else "statistics" if self.statistics else "data_free"

    def saved_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """A saved merge's `kwargs` with what it ran with where it predates an entry (`saved_before`)."""
        older = {n: h.saved_before for n, h in self.hyperparameters.items() if h.saved_before is not None}
        return older | dict(kwargs)

    def check_kwargs(self, kwargs: Mapping[str, Any], num_sources: int) -> dict[str, Any]:
        """`kwargs` checked against the declared hyperparameters (`ValueError` naming the field), with defaults."""
        return check_hyperparameters(self.name, self.hyperparameters, kwargs, num_sources)


METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, *, description: str, url: str, hyperparameters: dict[str, Hyperparameter] | None = None,
                    objective: Objective | None = None, transform: str | None = None,
                    preprocess: Callable[..., Tensor] | None = None, random: bool = False, needs_depth: bool = False,
                    statistics: Statistics | None = None, granularity: str = "tensor"):
    """Register a merge method: decorate its merge function (data-free, or reading `statistics`), or call the
    decorator on `None` for a learned method with its `objective` (`register_method("mine", ..., objective=...)(None)`).
    Raises `ValueError` for a taken name, `TypeError` for a merge function and an objective both or neither."""

    def register(merge: Callable[..., Tensor] | None) -> Callable[..., Tensor] | None:
        if name in METHODS:
            raise ValueError(f"Merge method {name!r} is already registered.")
        if (merge is None) != (objective is not None) or (statistics and objective):
            raise TypeError(f"Method {name!r}: give a merge function (data-free) or an objective (learned), not both.")
        METHODS[name] = MergeMethod(name, description, url, merge, dict(hyperparameters or {}), objective, transform,
                                    preprocess, random, needs_depth, statistics, granularity)
        return merge

    return register


def get_method(name: str) -> MergeMethod:
    """Return the registered method `name`.

    Raises `ValueError` for a name that is not registered; the message lists the known names."""
    if name not in METHODS:
        raise ValueError(f"Unknown merge method {name!r}. Known methods: {sorted(METHODS)}.")
    return METHODS[name]


# ---- data-free methods: `deltas  # (S, *shape)` -> merged delta `# (*shape)` ---------------------------------

@register_method("average", url="https://arxiv.org/abs/2203.05482", hyperparameters={"weights": WEIGHTS},
                 description="Uniform or weighted mean of the task vectors (model soups).")
def average(deltas: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Σ_s w_s τ_s / Σ_s w_s; the plain mean when `weights` is None."""
    if weights is None:
        return deltas.mean(dim=0)  # (*shape)
    if weights.sum() == 0:
        raise ValueError(f"`average` divides by the sum of `weights`, which is 0: {weights.tolist()}.")
    return weighted(deltas, weights).sum(dim=0) / weights.sum()  # (*shape)


@register_method("task_arithmetic", url="https://arxiv.org/abs/2212.04089",
                 hyperparameters={"weights": WEIGHTS, "lam": LAM},
                 description="λ times the (weighted) sum of the task vectors.")
def task_arithmetic(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0) -> Tensor:
    """λ Σ_s w_s τ_s."""
    return lam * weighted(deltas, weights).sum(dim=0)  # (*shape)


@register_method("magnitude_prune", url="https://arxiv.org/abs/2306.01708",
                 hyperparameters={"weights": WEIGHTS, "lam": LAM, "density": _density(0.2), "trim_scope": SCOPE},
                 description="Keep the largest-magnitude entries of each task vector, then sum.")
def magnitude_prune(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.2,
                    trim_scope: TrimScope = "tensor", threshold: Tensor | None = None) -> Tensor:
    """Trim to `density`, then λ Σ_s w_s τ̂_s (no rescaling)."""
    trimmed = trim_to_density(deltas, density, trim_scope, threshold)  # (S, *shape)
    return task_arithmetic(trimmed, weights=weights, lam=lam)


@register_method("ties", url="https://arxiv.org/abs/2306.01708",
                 hyperparameters={"weights": WEIGHTS, "lam": LAM, "density": _density(0.2),
                                  "majority_sign_method": SIGN, "trim_scope": SCOPE},
                 description="Trim, elect sign, disjoint mean (TIES-Merging).")
def ties(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.2,
         majority_sign_method: MajoritySignMethod = "total", trim_scope: TrimScope = "tensor",
         threshold: Tensor | None = None) -> Tensor:
    """Trim to `density`, elect the sign of the unweighted trimmed deltas, λ × disjoint mean of the weighted ones."""
    trimmed = trim_to_density(deltas, density, trim_scope, threshold)  # (S, *shape)
    return lam * disjoint_mean(trimmed, elect_sign(trimmed, majority_sign_method), weights)  # (*shape)


@register_method("dare_linear", url="https://arxiv.org/abs/2311.03099", random=True,
                 hyperparameters={"weights": WEIGHTS, "lam": LAM, "density": _density(0.5)},
                 description="Random drop and rescale (DARE), then task arithmetic.")
def dare_linear(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.5,
                generator: torch.Generator | None = None, mask: Tensor | None = None) -> Tensor:
    """Drop with probability 1 - `density`, rescale by 1 / `density`, then λ Σ_s w_s τ̃_s."""
    dropped = drop_and_rescale(deltas, density, generator=generator, mask=mask)  # (S, *shape)
    return task_arithmetic(dropped, weights=weights, lam=lam)


@register_method("dare_ties", url="https://arxiv.org/abs/2311.03099", random=True,
                 hyperparameters={"weights": WEIGHTS, "lam": LAM, "density": _density(0.5),
                                  "majority_sign_method": SIGN},
                 description="Random drop and rescale (DARE), then sign election and disjoint mean.")
def dare_ties(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0, density: float = 0.5,
              majority_sign_method: MajoritySignMethod = "total", generator: torch.Generator | None = None,
              mask: Tensor | None = None) -> Tensor:
    """Drop and rescale as [`dare_linear`], then elect the sign and take the disjoint mean as [`ties`]."""
    dropped = drop_and_rescale(deltas, density, generator=generator, mask=mask)  # (S, *shape)
    return lam * disjoint_mean(dropped, elect_sign(dropped, majority_sign_method), weights)  # (*shape)


# ---- the SVD era: the spectral math on matrices, the (weighted) mean on other tensors, as the papers' code -----

def _matrices_only(matrix_merge: Callable[[Tensor], Tensor], deltas: Tensor, weights: Tensor | None,
                   lam: float) -> Tensor:
    """λ `matrix_merge(w_s τ_s)` for a 2-D tensor (embeddings too, as the authors' code); λ mean_s w_s τ_s for any
    other (biases, norms, scalars)."""
    deltas = weighted(deltas, weights)  # (S, *shape)
    return lam * (matrix_merge(deltas) if deltas.dim() == 3 else deltas.mean(dim=0))  # (*shape)


@register_method("tsv_m", url="https://arxiv.org/abs/2412.00081", hyperparameters={"weights": WEIGHTS, "lam": LAM},
                 description="Task Singular Vectors: each task's top singular directions, decorrelated, summed.")
def tsv_m(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0) -> Tensor:
    """λ [`spectral.tsv_merge`] of the weighted task vectors (the paper's α = λ = 1)."""
    return _matrices_only(tsv_merge, deltas, weights, lam)


@register_method("iso_c", url="https://arxiv.org/abs/2502.04959",
                 hyperparameters={"weights": WEIGHTS, "lam": ISO_LAM},
                 description="Isotropic merging in the common subspace: the summed task vectors, spectrum made flat.")
def iso_c(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0) -> Tensor:
    """λ σ̄ U Vᵀ of Σ_s w_s τ_s = U Σ Vᵀ ([`spectral.iso_c_merge`]); the paper picks λ (its α) on validation data."""
    return _matrices_only(iso_c_merge, deltas, weights, lam)


@register_method("iso_cts", url="https://arxiv.org/abs/2502.04959",
                 hyperparameters={"weights": WEIGHTS, "lam": ISO_LAM,
                                  "common_space_fraction": Hyperparameter(float, 0.8, low=0.0, high=1.0)},
                 description="Iso-C with its weakest common directions replaced by each task's own.")
def iso_cts(deltas: Tensor, *, weights: Tensor | None = None, lam: float = 1.0,
            common_space_fraction: float = 0.8) -> Tensor:
    """λ [`spectral.iso_cts_merge`] of the weighted task vectors; `common_space_fraction` of the rank is common."""
    merge = functools.partial(iso_cts_merge, common_space_fraction=common_space_fraction)
    return _matrices_only(merge, deltas, weights, lam)


@register_method("lines", url="https://arxiv.org/abs/2410.17146", needs_depth=True,
                 hyperparameters={"weights": WEIGHTS, "alpha": Hyperparameter(float, None, low=0.0),
                                  "beta": Hyperparameter(float, 0.5, low=0.0, auto=True, grid=LAMBDA_GRID)},
                 description="LiNeS: summed task vectors scaled by α + β·depth; shallow layers stay near the base.")
def lines(deltas: Tensor, *, depth: float, weights: Tensor | None = None, alpha: float | None = None,
          beta: float = 0.5) -> Tensor:
    """(α + β (ℓ − 1) / (L − 1)) Σ_s w_s τ_s, `depth` = (ℓ − 1) / (L − 1) ([`plan.layer_depths`]); α defaults to
    1 / S, the paper's α for summed task vectors, and `beta: auto` picks β on the labelled examples as it does."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` is (ℓ - 1) / (L - 1) for layer ℓ of L and must be in [0, 1], got {depth}.")
    alpha = 1.0 / deltas.shape[0] if alpha is None else alpha
    return task_arithmetic(deltas, weights=weights, lam=alpha + beta * depth)  # (*shape)


# ---- from the inputs' statistics (run by `gram.merge_with_statistics`; ProDistill by `blockdistill.py`) --------

register_method("regmean", url="https://arxiv.org/abs/2212.09849", statistics="gram", hyperparameters={"alpha": ALPHA},
                description="Each linear layer solved from its inputs' Gram matrices; the mean elsewhere.")(regmean)
register_method("regmean_plusplus", url="https://arxiv.org/abs/2508.03121", hyperparameters={"alpha": ALPHA},
                statistics="gram_sequential", description="RegMean block by block, through the merged blocks.")(regmean)
register_method("prodistill", url="https://arxiv.org/abs/2502.12706", statistics="block_distill",
                hyperparameters={"lr": Hyperparameter(float, 1e-2, low=1e-12, high=10.0),
                                 "block_steps": Hyperparameter(int, 100, low=1),
                                 "max_inputs": Hyperparameter(int, 64, low=1)},
                description="Element-wise coefficients learned block by block: each merged block, fed the merged "
                "model's activations, reproduces each fine-tune's block output (MSE); the mean outside "
                "blocks.")(average)


# ---- learned methods (run by `learning.learn`) ---------------------------------------------------------------

register_method("adamerging", url="https://arxiv.org/abs/2310.02575", objective="entropy", transform="none",
                description="Task- or layer-wise coefficients in [0, 1] learned by entropy minimisation on "
                "unlabelled inputs.")(None)
register_method("adamerging_plus", url="https://arxiv.org/abs/2310.02575", objective="entropy", transform="none",
                preprocess=ties_trimmed, hyperparameters={"density": Hyperparameter(float, 0.2, low=1e-6, high=1.0)},
                description="AdaMerging++: AdaMerging applied to TIES-trimmed task vectors.")(None)
register_method("supermerge", url="https://arxiv.org/abs/2412.10416", objective="supervised", granularity="row",
                hyperparameters={"objective": Hyperparameter(str, "distill", choices=("labels", "distill", "both")),
                                 "temperature": Hyperparameter(float, 2.0, low=0.05, high=100.0),
                                 "distill_weight": Hyperparameter(float, 0.5, low=0.0, high=1.0),
                                 "start": Hyperparameter(str, "auto", choices=START_CHOICES, saved_before="constant"),
                                 "start_lam": Hyperparameter(float, "auto", low=1e-6, auto=True, grid=LAMBDA_GRID),
                                 "density": Hyperparameter(float, 0.2, low=1e-6, high=1.0),
                                 "refit_heads": Hyperparameter(int, 200, low=0, saved_before=0),
                                 "refit_lr": Hyperparameter(float, 1e-2, low=1e-12, high=10.0)},
                description="tanh coefficients, by default one per row of each block matrix, learned by distilling "
                "each fine-tune's outputs on its task's inputs (`objective: distill`, method.md section 9; `both`: "
                "(1 - distill_weight) x labels + distill_weight x distill); the paper: `objective: labels` with "
                "`granularity: tensor`, `start: constant`, `refit_heads: 0`. `start`: learning starts at c = "
                "init_coefficient, the task-arithmetic λ or the TIES / TSV-M merge (`auto`: TSV-M for a flat merge "
                "of full fine-tunes, else constant); `refit_heads`: Adam steps refitting each task's head to the "
                "merged body by distillation.")(None)
