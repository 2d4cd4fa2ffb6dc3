"""A data-free method applied to a whole model, with λ and density picked on labelled examples when asked."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from .examples import Example
from .methods import MergeMethod
from .objectives import FunctionalMerge
from .sparsify import elect_sign, magnitude_thresholds, trim
from .deltas import DeltaStack

logger = logging.getLogger(__name__)

LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
DENSITY_GRID = (0.1, 0.2, 0.3, 0.5, 0.7)
RANDOM_METHODS = {"dare_linear", "dare_ties"}  # take a generator for their drop mask
TRIM_METHODS = {"ties", "magnitude_prune"}  # take trim_scope / threshold


def merged_deltas(
    method: MergeMethod, deltas: Mapping[str, DeltaStack], kwargs: Mapping[str, Any], seed: int
) -> dict[str, torch.Tensor]:
    """The method's merged delta `(*shape)` of every tensor; whole-task trimming thresholds computed first."""
    kwargs = dict(kwargs)
    if method.name in RANDOM_METHODS:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    if method.name in TRIM_METHODS and kwargs.get("trim_scope") == "task":
        kwargs["threshold"] = magnitude_thresholds((d.dense() for d in deltas.values()), kwargs.get("density", 0.2))
    return {name: method.merge(d.dense(), **kwargs) for name, d in deltas.items()}  # name -> (*shape)


def score(fm: FunctionalMerge, merged: Mapping[str, torch.Tensor], examples: Mapping[str, list[Example]]) -> float:
    """Mean over tasks of accuracy (classification) or of minus the loss: higher is better."""
    values = []
    for task, ex in examples.items():
        metrics = fm.evaluate(merged, task, ex)
        values.append(metrics.get("accuracy", -metrics["loss"]))
    return sum(values) / len(values)


def merge_data_free(
    fm: FunctionalMerge,
    method: MergeMethod,
    kwargs: Mapping[str, Any],
    *,
    seed: int,
    examples: Mapping[str, list[Example]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float]]:
    """Merge with a data-free method; `lam: auto` / `density: auto` are chosen from a grid on `examples`.

    λ multiplies the merged delta last in every method, so each density costs one merge and each λ only a
    scaling. Returns `(merged tensors, chosen hyperparameters, grid scores "lam=..,density=.." -> score)`.

    Raises:
        `ValueError`: `auto` without labelled examples, or `lam` for `average` (which has none).
    """
    kwargs = dict(kwargs)
    lam, density = kwargs.pop("lam", 1.0), kwargs.pop("density", None)
    if method.name == "average" and lam != 1.0:
        raise ValueError(f"`average` has no λ (got lam={lam!r}); use `task_arithmetic` to scale the task vectors.")
    if "auto" in (lam, density) and not examples:
        raise ValueError(f"{method.name}: `auto` hyperparameters are chosen on labelled examples; pass examples to fit().")
    lams = LAMBDA_GRID if lam == "auto" else (float(lam),)
    densities = DENSITY_GRID if density == "auto" else (density,)
    best, grid = None, {}
    for d in densities:
        options = kwargs if d is None else kwargs | {"density": d}
        delta = merged_deltas(method, fm.deltas, options, seed)
        for lam_value in lams:
            merged = {n: fm.base[n] + lam_value * delta[n] for n in fm.base}
            chosen = {"lam": lam_value} | ({"density": d} if d is not None else {})
            if len(lams) * len(densities) == 1:
                return merged, chosen, grid
            key = ",".join(f"{k}={v}" for k, v in chosen.items())
            grid[key] = score(fm, merged, examples)
            if best is None or grid[key] > best[0]:
                best = (grid[key], merged, chosen)
    logger.info("%s grid scores: %s; chose %s", method.name, grid, best[2])
    return best[1], best[2], grid


def ties_trimmed(deltas: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """TIES preprocessing of AdaMerging++: per source keep the top entries that agree with the elected sign.

    Args:
        deltas: `(S, *shape)`.
    """
    trimmed = trim(deltas, magnitude_thresholds([deltas], density))  # (S, *shape)
    sign = elect_sign(trimmed)  # (*shape)
    return trimmed * (trimmed.sign() == sign)  # (S, *shape)

