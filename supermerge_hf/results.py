"""What a merge produces, as values: the coefficient table, one learning run, and the whole merge."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SuperMergeConfig
from .hub import ResolvedSource
from .plan import MergePlan

COEFFICIENTS_NAME = "coefficients.json"


def transform(w: torch.Tensor, kind: str) -> torch.Tensor:
    """c(w): `tanh` bounds each contribution in (-1, 1); `none` is the identity."""
    return torch.tanh(w) if kind == "tanh" else w


def inverse_transform(c: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.atanh(c) if kind == "tanh" else c


@dataclass
class Coefficients:
    """The coefficient table: `values[i, g]` = c(w[i, g]) `(S, G)` for source i and group g, and `raw` = w.

    Example: `coefficients["bbc", "encoder.layer.0.attention.self.query.weight"]`.
    """

    sources: list[str]
    groups: list[str]
    values: torch.Tensor
    raw: torch.Tensor
    transform: str

    @classmethod
    def from_values(cls, sources: list[str], groups: list[str], values: torch.Tensor, transform: str) -> Coefficients:
        """A table from transformed values; `ValueError` if one is not finite or (tanh) outside (-1, 1)."""
        values = torch.as_tensor(values, dtype=torch.float32).cpu()
        bad = ~torch.isfinite(values) | ((values.abs() >= 1) if transform == "tanh" else False)
        if bad.any():
            limits = " and inside (-1, 1) for tanh" if transform == "tanh" else ""
            raise ValueError(f"Coefficients must be finite{limits}; got {values[bad][:5].tolist()}.")
        return cls(list(sources), list(groups), values, inverse_transform(values, transform), transform)

    def aligned(self, sources: list[str], groups: list[str]) -> torch.Tensor:
        """The values `(S, G)` with rows and columns matched by name to `sources` and `groups` (`ValueError` if
        the table lacks one)."""
        column = {g: i for i, g in enumerate(self.groups)}  # by dict: `row` granularity has ~10^4 groups
        missing = [s for s in sources if s not in self.sources] + [g for g in groups if g not in column]
        if missing:
            raise ValueError(f"The coefficient table (sources {self.sources}) lacks {missing[:5]} of this merge "
                             f"(sources {sources}, {len(groups)} groups): it belongs to another merge.")
        rows, cols = [self.sources.index(s) for s in sources], [column[g] for g in groups]
        return self.values[rows][:, cols]

    def __getitem__(self, key: tuple[str, str]) -> float:
        if key[0] not in self.sources or key[1] not in self.groups:
            raise KeyError(f"No coefficient for {key!r}: sources {self.sources}, {len(self.groups)} groups.")
        return float(self.values[self.sources.index(key[0]), self.groups.index(key[1])])

    def to_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "groups": self.groups, "transform": self.transform,
                "values": self.values.tolist(), "raw": self.raw.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coefficients:
        return cls(data["sources"], data["groups"], torch.tensor(data["values"]), torch.tensor(data["raw"]),
                   data["transform"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Coefficients:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        width = max(len(s) for s in self.sources)
        rows = [f"  {s:<{width}}  mean {r.mean():+.3f}  min {r.min():+.3f}  max {r.max():+.3f}"
                for s, r in zip(self.sources, self.values)]
        return "\n".join([f"Coefficients({len(self.sources)} sources x {len(self.groups)} groups, "
                          f"transform={self.transform})", *rows])


@dataclass
class LearnResult:
    """One learning run: the selected step's coefficients and the last step's, the curve, per-task `metrics`
    (`{"examples": "holdout" | "train", "count", "finetune", "merged"}`), the `merged` tensors and what the start
    `chosen` (`start.choose_start_lam`)."""

    coefficients: Coefficients
    last_coefficients: Coefficients
    history: list[dict[str, Any]]
    selected_step: int
    metrics: dict[str, Any]
    merged: dict[str, torch.Tensor]
    chosen: dict[str, float] = field(default_factory=dict)


@dataclass
class MergeResult:
    """A finished merge, what `export.save_merge` writes: `levels` (hierarchical) holds each level's groups and
    `Coefficients`, `chosen` the hyperparameters picked by `auto`, `extends` the merge it added a task to (`merge`:
    its folder or repo id, `commit`, `tasks`, `form`), `examples` the labelled examples kept with it (opt-in),
    `heads` the heads refit on the merged body (`refit_heads`: per task, its own tensors by the task model's
    parameter names; a task not in it keeps its fine-tune's head)."""

    config: SuperMergeConfig
    plan: MergePlan
    base: ResolvedSource
    sources: list[ResolvedSource]
    merged: dict[str, torch.Tensor]
    coefficients: Coefficients | None = None
    last_coefficients: Coefficients | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, float] = field(default_factory=dict)
    grid_scores: dict[str, float] = field(default_factory=dict)
    levels: list[dict[str, Any]] = field(default_factory=list)
    extends: dict[str, Any] | None = None
    examples: dict[str, list] | None = None
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def merge_info(self) -> dict[str, Any]:
        """What the merge resolved and decided, saved in `supermerge_config.json`."""
        return {"base_commit": self.base.commit, "task_specific": self.plan.task_specific,
                "source_commits": {s.task: r.commit for s, r in zip(self.config.sources, self.sources)},
                "groups": len(self.plan.groups), "selected_step": self.selected_step, "chosen": self.chosen,
                "extends": self.extends}


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """`FloatingPointError` if a tensor holds NaN or Inf: such weights are never saved."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{what} has non-finite values in {bad[:3]}: a source holds NaN/Inf or learning "
                                 "diverged (lower `learning_rate`). Nothing was saved.")
