"""`SuperMergeConfig`: what to merge and how to learn the coefficients, validated once, saved as JSON or YAML."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml

from .hub import resolve
from .hyperparameters import as_number
from .methods import get_method

CONFIG_NAME = "supermerge_config.json"
LOCAL = "<local folder, not published>"  # a source's path in a merge saved for the Hub

Granularity = Literal["tensor", "block", "task", "row", "singular"]  # singular: tau = U S V^T -> U diag(c S) V^T
Transform = Literal["tanh", "none"]
LossCombination = Literal["sum", "mean", "normalized"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Grouping = Literal["similarity", "explicit", "random"]


def _check_choice(name: str, value: Any, allowed: Any) -> None:
    if value not in get_args(allowed):
        raise ValueError(f"Unknown {name} {value!r}. Expected one of {sorted(get_args(allowed))}.")


def _check_types(obj: Any, prefix: str = "") -> None:
    """Booleans must be booleans (never the string "false"), integers integers, numbers numbers ("1e-3" too)."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"`{prefix}{f.name}`"
        if f.type == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}.")
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where} must be an integer, got {value!r}.")
        if f.type == "float":
            value = as_number(value)  # "1e-3" too
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}.")
            setattr(obj, f.name, float(value))


def locate(path: str, folder: Path) -> str:
    """A path a merge saved relative to its `folder` (`./x`, `../x`) made a path from here; others as they are."""
    return str(folder / path) if path.startswith(("./", "../")) else path


@dataclass
class SourceConfig:
    """One fine-tuned model (or LoRA adapter) of the base: `task` (its examples' key), `path` (a local folder or a
    Hub repo id) and `revision` (of a Hub repo id)."""

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
class HierarchicalConfig:
    """Merge level by level (method.md section 4), at most `group_size` (>= 2) task vectors at a time, grouped by
    `similarity` (cosine of task vectors), `random`ly, or `explicit`ly (`groups` of task names, first level)."""

    group_size: int
    grouping: Grouping = "similarity"
    groups: list[list[str]] | None = None

    def __post_init__(self) -> None:
        _check_types(self, "hierarchical.")
        if self.group_size < 2:
            raise ValueError(f"`hierarchical.group_size` must be an integer >= 2, got {self.group_size!r}.")
        _check_choice("hierarchical.grouping", self.grouping, Grouping)


@dataclass
class SuperMergeConfig:
    """Configuration of a merge.

    Args:
        base (`str`): The pretrained model the sources were fine-tuned from (local folder or Hub repo id).
        sources (`list[SourceConfig]`): The fine-tuned models or adapters, one per task (dicts accepted).
        base_revision (`str`, *optional*): Revision of `base` when it is a Hub repo id.
        method (`str`, defaults to `"supermerge"`): A name from `supermerge_hf.METHODS`.
        method_kwargs (`dict`): The method's hyperparameters (`supermerge methods` lists them), checked here and
            completed with their defaults; `"auto"` picks `lam` / `density` / `start_lam` on the examples.
        granularity (`str`, *optional*): What shares a coefficient: `tensor`, `block`, `task`, `row` or `singular`
            (per row / singular direction of block matrices, else per tensor); default: the method's (SuperMerge: row).
        transform (`str`, *optional*): c(w), `tanh` or `none`; defaults to the method's (AdaMerging: `none`).
        init_coefficient (`float`, defaults to 0.3): c(w) for every entry at the start of learning (`start.py`).
        init_from_task_arithmetic (`bool`): Deprecated: read as SuperMerge's `method_kwargs.start: task_arithmetic`.
        learning_rate (`float`, defaults to 0.05): Adam learning rate on w.
        steps (`int`, defaults to 100): Optimisation steps; each visits one batch of every task.
        examples_per_task (`int`, defaults to 32): Examples used per task (the first ones given).
        batch_size (`int`, defaults to 8): Examples per task per step (global, over all processes).
        holdout_fraction (`float`, defaults to 0.25): Part of each task's examples kept to select the best step.
        eval_every (`int`, defaults to 10): Steps between two hold-out evaluations.
        loss_combination (`str`, defaults to `"sum"`): `sum`, `mean` or `normalized` (by the fine-tune's loss).
        l2_to_init (`float`): Weight of an L2 pull of w towards its initial value.
        hierarchical (`HierarchicalConfig`, *optional*): Merge level by level (a dict is accepted).
        streaming (`bool`): Re-read full fine-tunes tensor by tensor each step (memory ~ one merged model).
        checkpoint_every (`int`): Save the learning state every N steps beside `output_dir`, so that
            `fit(..., resume=True)` (CLI: `--resume`) continues a killed run; 0 (default) never.
        seed (`int`, defaults to 42): Seed of the example split, the batch order and every random choice.
        dtype (`str`, defaults to `"auto"`): dtype the merge is saved in: `auto` keeps the sources' (the base's when
            they differ) and learns in float32; `float32`, `bfloat16` or `float16` also learns in it.
        allow_pickle (`bool`): Allow reading pickle `.bin` checkpoints (only files you trust).
        output_dir (`str`, *optional*): Where `save_pretrained` writes when no folder is given.
        save_examples (`bool`): Keep the labelled examples learned from in the merged folder (`examples/`), so that
            `add_source` (CLI: `supermerge add`) can learn from them again; off by default, examples may be private.
        overwrite_output_dir (`bool`): Replace an existing, non-empty output folder.
        max_shard_size (`str`, defaults to `"5GB"`): Largest safetensors shard written.
        tokenizer_source (`str`, defaults to `"base"`): The merged vocabulary and whose tokenizer (and generation
            config) the merge ships: `base`, a task (its tokenizer, added tokens included) or `union` (the base's
            plus every source's added tokens, first seen first; the base's generation config). Embedding and
            output-embedding rows are matched by token: a token the base lacks starts from the mean of the rows
            of the sources that have it, a token a source lacks keeps the base's row. Sources that changed the
            vocabulary need their tokenizer beside them (adapters: their saved embeddings too).
        chat_template (`str`, *optional*): The tokenizer's chat template: `base` or a task (that model's), a
            built-in name (`chatml`), a `.jinja` file (read here: the config holds its text) or the template text;
            default: the tokenizer source's.
        merge_info (`dict`): Written by the merger: commits, task-specific tensors, selected step, `auto` choices.
    """

    base: str
    sources: list[SourceConfig] = field(default_factory=list)
    base_revision: str | None = None
    method: str = "supermerge"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    granularity: Granularity | None = None
    transform: Transform | None = None
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
    hierarchical: HierarchicalConfig | None = None
    streaming: bool = False
    checkpoint_every: int = 0
    seed: int = 42
    dtype: DType = "auto"
    allow_pickle: bool = False
    output_dir: str | None = None
    save_examples: bool = False
    overwrite_output_dir: bool = False
    max_shard_size: str = "5GB"
    tokenizer_source: str = "base"
    chat_template: str | None = None
    merge_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sources, list) or not all(isinstance(s, (dict, SourceConfig)) for s in self.sources):
            raise ValueError(f"`sources` must be a list of {{task, path}} entries, got {self.sources!r}.")
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if isinstance(self.hierarchical, dict):
            self.hierarchical = HierarchicalConfig(**self.hierarchical)
        if not self.base:
            raise ValueError("`base` is empty: give the pretrained model's local folder or Hub repo id.")
        if not self.sources:
            raise ValueError("No sources given: add at least one fine-tuned model to `sources`.")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"Task names must be unique, got {self.tasks}: give each source its own `task`.")
        _check_types(self)
        method = get_method(self.method)
        self.granularity = self.granularity or method.granularity
        for name, allowed in (("granularity", Granularity), ("loss_combination", LossCombination), ("dtype", DType)):
            _check_choice(name, getattr(self, name), allowed)
        if self.init_from_task_arithmetic and "start" in method.hyperparameters:  # `start`'s old spelling
            if dict(self.method_kwargs).get("start", "task_arithmetic") != "task_arithmetic":
                raise ValueError("init_from_task_arithmetic=True contradicts `method_kwargs.start`: drop one.")
            self.init_from_task_arithmetic, self.method_kwargs = False, dict(self.method_kwargs, start="task_arithmetic")
        self.method_kwargs = method.check_kwargs(self.method_kwargs, len(self.sources))
        self.transform = self.transform or method.transform or "tanh"
        _check_choice("transform", self.transform, Transform)
        if method.transform and self.transform != method.transform:
            raise ValueError(f"{self.method!r} learns with transform {method.transform!r}; got {self.transform!r}.")
        if self.transform == "tanh" and not -1.0 < self.init_coefficient < 1.0:
            raise ValueError(f"init_coefficient={self.init_coefficient} is out of tanh's range (-1, 1): pick a value "
                             "inside it or use transform='none'.")
        for name in ("steps", "examples_per_task", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be a positive number, got {self.learning_rate!r}.")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"`holdout_fraction` must be in [0, 1), got {self.holdout_fraction!r}.")
        if self.checkpoint_every < 0 or (self.checkpoint_every and (not self.output_dir or self.hierarchical)):
            raise ValueError(f"`checkpoint_every` ({self.checkpoint_every}) must be >= 0, and needs `output_dir` "
                             "(the state is kept beside it) and a flat merge (not `hierarchical`).")
        if self.l2_to_init < 0:
            raise ValueError(f"`l2_to_init` must be >= 0, got {self.l2_to_init!r}.")
        if self.loss_combination == "normalized" and method.objective != "supervised":
            raise ValueError(f"loss_combination='normalized' divides by the fine-tunes' supervised losses; "
                             f"{self.method!r} learns without labels. Use 'sum' or 'mean'.")
        if self.hierarchical is not None:
            self._check_hierarchical(method.kind)
        ambiguous = self.tokenizer_source == "union" and "union" in self.tasks
        if self.tokenizer_source not in ["base", "union", *self.tasks] or ambiguous:
            raise ValueError(f"`tokenizer_source` {self.tokenizer_source!r} must be `base` or a task {self.tasks}, "
                             "or `union` (then no task may be named `union`).")
        if isinstance(self.chat_template, str) and self.chat_template.endswith(".jinja"):  # saved as its text
            if not Path(self.chat_template).is_file():
                raise FileNotFoundError(f"`chat_template` file {self.chat_template!r} does not exist.")
            self.chat_template = Path(self.chat_template).read_text()

    def _check_hierarchical(self, kind: str) -> None:
        options = self.hierarchical
        if kind != "learned":
            raise ValueError(f"Hierarchical merging learns coefficients; method {self.method!r} learns none ({kind}).")
        if options.grouping == "explicit":
            groups = options.groups or []
            flat = [t for g in groups for t in g]
            if sorted(flat) != sorted(self.tasks) or any(len(g) > options.group_size for g in groups):
                raise ValueError(f"`hierarchical.groups` {groups} must split the tasks {self.tasks} into groups of at "
                                 f"most {options.group_size}, each task once.")
        elif options.groups is not None:
            raise ValueError("`hierarchical.groups` is only read with grouping='explicit'.")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype learning runs in: float32 for `dtype: auto`, else `dtype`."""
        return torch.float32 if self.dtype == "auto" else getattr(torch, self.dtype)

    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.sources]

    def check_published(self, where: str) -> None:
        """`FileNotFoundError` for a merge saved for the Hub from local folders, which it does not name."""
        if LOCAL in [self.base, *self.paths]:
            raise FileNotFoundError(f"{where!r} was merged from local folders that were not published (see its "
                                    "card): use it on the machine that holds them, from the folder saved there.")

    def pinned(self) -> SuperMergeConfig:
        """This config with the base and every Hub source at the commit it merged (`merge_info`), so that a
        reloaded merge is the saved one even after a repo moved on."""
        commits, base = self.merge_info.get("source_commits", {}), self.merge_info.get("base_commit")
        sources = [dataclasses.replace(s, revision=commits.get(s.task) or s.revision) for s in self.sources]
        return dataclasses.replace(self, base_revision=base or self.base_revision, sources=sources)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.sources]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SuperMergeConfig:
        if not isinstance(data, dict):
            raise ValueError(f"A config is a mapping of fields, got {type(data).__name__}: {data!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown config field(s) {unknown}. Known fields: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | Path) -> SuperMergeConfig:
        """Read a JSON or YAML config (YAML is a superset of JSON)."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the config as `supermerge_config.json` into `save_directory` (created if needed)."""
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, revision: str | None = None,
                        token: str | bool | None = None) -> SuperMergeConfig:
        """Load `supermerge_config.json` from a local folder or a Hub repo id (`FileNotFoundError` if none); the
        local paths a merge saved relative to its folder (`./x`, `../x`) are resolved against that folder."""
        folder = resolve(path_or_repo_id, revision=revision, token=token).path
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(path_or_repo_id)!r} has no {CONFIG_NAME}: is it a supermerge_hf output?")
        data = yaml.safe_load((folder / CONFIG_NAME).read_text())
        if isinstance(data, dict) and not data.get("init_from_task_arithmetic"):  # (`start`'s old spelling)
            method = get_method(data.get("method", cls.method))
            data["method_kwargs"] = method.saved_kwargs(data.get("method_kwargs") or {})
        config = cls.from_dict(data)
        located = [locate(p, folder) for p in [config.base, *config.paths]]
        return dataclasses.replace(config, base=located[0], sources=[
            dataclasses.replace(s, path=p) for s, p in zip(config.sources, located[1:])])
