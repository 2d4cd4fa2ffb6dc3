"""The learned coefficients: the transform c(w), the module Accelerate trains, and the table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

COEFFICIENTS_NAME = "coefficients.json"


def transform(w: torch.Tensor, kind: str) -> torch.Tensor:
    """c(w): `tanh` bounds each contribution in (-1, 1); `none` is the identity."""
    return torch.tanh(w) if kind == "tanh" else w


def inverse_transform(c: float, kind: str) -> float:
    return float(torch.atanh(torch.tensor(c))) if kind == "tanh" else float(c)


class CoefficientModule(nn.Module):
    """Holds w `(S, G)`; `forward()` returns c(w). The only module given to `accelerator.prepare`."""

    def __init__(self, num_sources: int, num_groups: int, *, init: float, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.full((num_sources, num_groups), inverse_transform(init, kind)))

    def forward(self) -> torch.Tensor:
        return transform(self.w, self.kind)  # (S, G)


@dataclass
class Coefficients:
    """The coefficient table: `values[i, g]` = c(w[i, g]) for source (task) i and group g.

    Example:
        `coefficients["bbc", "encoder.layer.0.attention.self.query.weight"]`, `coefficients.to_dict()`.
    """

    tasks: list[str]
    groups: list[str]
    values: torch.Tensor  # (S, G), transformed
    raw: torch.Tensor  # (S, G), w itself
    transform: str

    def __getitem__(self, key: tuple[str, str]) -> float:
        task, group = key
        return float(self.values[self.tasks.index(task), self.groups.index(group)])

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {t: dict(zip(self.groups, map(float, row))) for t, row in zip(self.tasks, self.values)}

    def save(self, path: str | Path) -> None:
        data = {"tasks": self.tasks, "groups": self.groups, "transform": self.transform,
                "values": self.values.tolist(), "raw": self.raw.tolist()}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Coefficients:
        data = json.loads(Path(path).read_text())
        return cls(data["tasks"], data["groups"], torch.tensor(data["values"]), torch.tensor(data["raw"]),
                   data["transform"])

    def __repr__(self) -> str:
        width = max(len(t) for t in self.tasks)
        lines = [f"Coefficients({len(self.tasks)} sources x {len(self.groups)} groups, transform={self.transform})"]
        for task, row in zip(self.tasks, self.values):
            summary = f"mean {row.mean():+.3f}  min {row.min():+.3f}  max {row.max():+.3f}"
            lines.append(f"  {task:<{width}}  {summary}")
        return "\n".join(lines)
