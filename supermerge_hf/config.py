"""`SuperMergeConfig`: what to merge and how to learn the coefficients, validated once, saved as JSON or YAML."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

CONFIG_NAME = "supermerge_config.json"

Granularity = Literal["tensor", "block", "task"]
Transform = Literal["tanh", "none"]
LossCombination = Literal["sum", "mean", "normalized"]
DType = Literal["float32", "bfloat16", "float16"]
Grouping = Literal["similarity", "explicit", "random"]


def _check_choice(name: str, value: Any, allowed: Any) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}. Expected one of {sorted(choices)}.")


@dataclass
class SourceConfig:
    """One fine-tuned model (or LoRA adapter) of the base, and the task it was trained for.

    Args:
        task (`str`): Name of the task; labelled examples are given per task name.
        path (`str`): A local folder or a Hub repo id.
        revision (`str`, *optional*): Branch, tag or commit of a Hub repo id.
    """

    task: str
    path: str
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.task or not isinstance(self.task, str):
            raise ValueError(f"Every source needs a non-empty `task` name, got {self.task!r}.")
        if not self.path:
            raise ValueError(f"Source of task {self.task!r} has an empty `path`: give a local folder or a Hub repo id.")
        self.path = str(self.path)


@dataclass
class SuperMergeConfig:
    """Configuration of a merge.

    Args:
        base (`str`): The pretrained model the sources were fine-tuned from (local folder or Hub repo id).
        sources (`list[SourceConfig]`): The fine-tuned models, one per task (dicts are accepted).
        base_revision (`str`, *optional*): Revision of `base` when it is a Hub repo id.
        method (`str`, defaults to `"supermerge"`): A name from `supermerge_hf.METHODS`.
        method_kwargs (`dict`): Hyperparameters of a data-free method (e.g. `{"density": 0.2}`).
        granularity (`str`, defaults to `"tensor"`): What shares one coefficient: each parameter `tensor`, each
            transformer `block`, or the whole `task` vector.
        transform (`str`, defaults to `"tanh"`): Coefficient transform c(w): `tanh` or `none` (identity).
        init_coefficient (`float`, defaults to 0.3): c(w) at the start of learning, for every entry, when
            `init_from_task_arithmetic` is off (and always for AdaMerging).
        init_from_task_arithmetic (`bool`, defaults to `False`): Start from the task-arithmetic λ (grid 0.1 ... 1.0)
            with the lowest training loss (the hold-out selection then keeps that start as a candidate).
        learning_rate (`float`): Adam learning rate on w.
        steps (`int`): Number of optimisation steps; each visits one batch of every task.
        examples_per_task (`int`, defaults to 32): Labelled examples used per task (the first ones given).
        batch_size (`int`): Examples per task per step (global, over all processes).
        holdout_fraction (`float`): Part of each task's examples kept aside to select the best step (0 disables).
        eval_every (`int`): Steps between two hold-out evaluations.
        loss_combination (`str`, defaults to `"sum"`): How task losses add up: `sum`, `mean`, or `normalized`
            (each task's loss divided by its fine-tune's loss on the same examples).
        l2_to_init (`float`): Weight of an optional L2 pull of w towards its initial value.
        hierarchical (`dict`, *optional*): Merge level by level: `{"group_size": g, "grouping": "similarity" |
            "explicit" | "random", "groups": [[task, ...], ...]}` (groups only for `explicit`); each level holds
            at most g task vectors and the base.
        streaming (`bool`): Keep full fine-tunes' task vectors on disk and re-read them tensor by tensor at each
            step (memory ~ base + merged model + gradients, whatever the number of sources; slower).
        seed (`int`): Seed of the example split, the batch order and every random choice.
        dtype (`str`): dtype in which the merged model runs (`float32`, `bfloat16`, `float16`).
        allow_pickle (`bool`): Allow reading pickle `.bin` checkpoints (only for files you trust).
        trust_remote_code (`bool`): Allow model code from the Hub. Off unless you opt in.
        output_dir (`str`, *optional*): Where `save_pretrained` writes when no folder is given.
        overwrite_output_dir (`bool`): Replace an existing, non-empty output folder.
        max_shard_size (`str`): Largest safetensors shard written.
        merge_info (`dict`): Written by the merger, not read: resolved commits of base and sources, the
            task-specific tensors of each task, the selected step.
    """

    base: str
    sources: list[SourceConfig] = field(default_factory=list)
    base_revision: str | None = None
    method: str = "supermerge"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    granularity: Granularity = "tensor"
    transform: Transform = "tanh"
    init_coefficient: float = 0.3
    init_from_task_arithmetic: bool = False
    learning_rate: float = 0.05
    steps: int = 100
    examples_per_task: int = 32
    batch_size: int = 8
    holdout_fraction: float = 0.25
    eval_every: int = 10
    loss_combination: LossCombination = "sum"
    l2_to_init: float = 0.0
    hierarchical: dict[str, Any] | None = None
    streaming: bool = False
    seed: int = 42
    dtype: DType = "float32"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    max_shard_size: str = "5GB"
    merge_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if not self.base:
            raise ValueError("`base` is empty: give the pretrained model's local folder or Hub repo id.")
        if not self.sources:
            raise ValueError("No sources given: add at least one fine-tuned model to `sources`.")
        tasks = [s.task for s in self.sources]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"Task names must be unique, got {tasks}: give each source its own `task`.")
        _check_choice("granularity", self.granularity, Granularity)
        _check_choice("transform", self.transform, Transform)
        _check_choice("loss_combination", self.loss_combination, LossCombination)
        _check_choice("dtype", self.dtype, DType)
        if self.transform == "tanh" and not -1.0 < self.init_coefficient < 1.0:
            raise ValueError(
                f"init_coefficient={self.init_coefficient} is out of tanh's range (-1, 1): pick a value inside "
                "it or use transform='none'."
            )
        for name in ("steps", "examples_per_task", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a positive number, got {self.learning_rate!r}.")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"`holdout_fraction` must be in [0, 1), got {self.holdout_fraction!r}.")
        if self.l2_to_init < 0:
            raise ValueError(f"`l2_to_init` must be >= 0, got {self.l2_to_init!r}.")
        if self.hierarchical is not None:
            self._check_hierarchical()
        from .methods import get_method  # the registry raises on an unknown name, listing the known ones

        get_method(self.method)

    def _check_hierarchical(self) -> None:
        options = self.hierarchical
        unknown = sorted(set(options) - {"group_size", "grouping", "groups"})
        if unknown:
            raise ValueError(f"Unknown `hierarchical` option(s) {unknown}: use group_size, grouping, groups.")
        size = options.get("group_size")
        if not isinstance(size, int) or size < 2:
            raise ValueError(f"`hierarchical.group_size` must be an integer >= 2, got {size!r}.")
        _check_choice("hierarchical.grouping", options.setdefault("grouping", "similarity"), Grouping)
        if options["grouping"] == "explicit":
            groups = options.get("groups") or []
            flat = [t for g in groups for t in g]
            if sorted(flat) != sorted(self.tasks) or any(len(g) > size for g in groups):
                raise ValueError(
                    f"`hierarchical.groups` {groups} must split the tasks {self.tasks} into groups of at most "
                    f"{size}, each task once."
                )
        if self.method not in ("supermerge", "adamerging", "adamerging_plus"):
            raise ValueError(f"Hierarchical merging learns coefficients; method {self.method!r} is data-free.")

    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.sources]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SuperMergeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown config field(s) {unknown}. Known fields: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_yaml_string(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json_file(cls, path: str | Path) -> SuperMergeConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> SuperMergeConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the config as `supermerge_config.json` into `save_directory` (created if needed)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / CONFIG_NAME
        path.write_text(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
    ) -> SuperMergeConfig:
        """Load `supermerge_config.json` from a local folder or a Hub repo id.

        Raises:
            `FileNotFoundError`: The folder or repo has no `supermerge_config.json`.
        """
        from .hub import resolve

        folder = resolve(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir).path
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path_or_repo_id!r} has no {CONFIG_NAME}: is it a supermerge_hf output?")
        return cls.from_json_file(path)
