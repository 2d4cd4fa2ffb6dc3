"""A merge method's typed hyperparameters (`method_kwargs`) and their checking against what the user gave."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hyperparameter:
    """A `method_kwargs` entry of type `kind` (`float`, `int`, `str`, or `list`: one float per source), with bounds
    or choices; if `auto`, the value `"auto"` picks one of `grid` on the labelled examples. `saved_before`: the value
    a merge saved before this entry existed (or had another default) ran with, which reloading it reads."""

    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    auto: bool = False
    grid: tuple[float, ...] = ()
    saved_before: Any = None

    def __post_init__(self) -> None:
        if self.auto and not self.grid:
            raise ValueError(f"An `auto` hyperparameter needs the `grid` of values it picks from, got {self.grid!r}.")


def as_number(value: Any) -> Any:
    """A YAML string such as "1e-3" as the number it spells; anything else as it is."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def check_hyperparameters(method: str, hyperparameters: Mapping[str, Hyperparameter], kwargs: Mapping[str, Any],
                          num_sources: int) -> dict[str, Any]:
    """`kwargs` of method `method` checked against its declared `hyperparameters` (`ValueError` naming the field),
    completed with the defaults."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"`method_kwargs` must be a mapping of hyperparameters, got {kwargs!r}.")
    unknown = sorted(set(kwargs) - set(hyperparameters))
    if unknown:
        known = sorted(hyperparameters) or "none"
        raise ValueError(f"`method_kwargs` {unknown} are not hyperparameters of {method!r} (it takes: {known}).")
    out = {}
    for name, spec in hyperparameters.items():
        value, where = kwargs.get(name, spec.default), f"`method_kwargs.{name}` of {method!r}"
        if name not in kwargs or value == spec.default or (spec.auto and value == "auto"):
            out[name] = value
        elif spec.kind in (float, int):
            value, what = as_number(value), "an integer" if spec.kind is int else "a number"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (spec.kind is int and not float(value).is_integer()):
                raise ValueError(f"{where} must be {what}{' or auto' if spec.auto else ''}, got {value!r}.")
            if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
                raise ValueError(f"{where} must be in [{spec.low}, {spec.high}], got {value!r}.")
            out[name] = spec.kind(value)
        elif spec.kind is list:
            if (not isinstance(value, (list, tuple)) or len(value) != num_sources
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"{where} must be a list of {num_sources} numbers, one per source; got {value!r}.")
            out[name] = [float(v) for v in value]
        elif value not in spec.choices:
            raise ValueError(f"{where} must be one of {list(spec.choices)}, got {value!r}.")
        else:
            out[name] = value
    return out
