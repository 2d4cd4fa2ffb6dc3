"""Which tensors are merged and which are task-specific, from configs and safetensors headers.

Task vectors themselves (dense, low-rank, streamed) are in `deltas.py`. Tensor names are "canonical": a model's parameter name without its `base_model_prefix` (`bert.`, `model.`,
`transformer.`), so a bare `BertModel` base and `BertForSequenceClassification` sources name the body alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)


class IncompatibleSourceError(ValueError):
    """A source does not fit the base: other architecture, other shapes, or missing tensors."""


def model_class(config: PretrainedConfig, *, trust_remote_code: bool = False) -> type[PreTrainedModel]:
    """The transformers class named by `config.architectures[0]`, or `AutoModel`'s class for the config."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        cls = getattr(transformers, architectures[0], None)
        if cls is None:
            raise ValueError(
                f"Architecture {architectures[0]!r} is not part of transformers {transformers.__version__}; "
                "custom model code is not supported (upgrade transformers or use a standard architecture)."
            )
        return cls
    return AutoModel._model_mapping[type(config)]


def _canonical(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


@dataclass
class ModelSpec:
    """A checkpoint folder described from its config and safetensors headers, without loading weights."""

    folder: Path
    config: PretrainedConfig
    cls: type[PreTrainedModel]
    checkpoint: Checkpoint
    param_names: dict[str, str]  # canonical name -> the model's own parameter name
    shapes: dict[str, tuple[int, ...]]  # canonical name -> shape in the model
    keys: dict[str, str]  # canonical name -> key in the checkpoint

    @classmethod
    def from_folder(cls, folder: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
        folder = Path(folder)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model_cls = model_class(config, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            meta = model_cls(config)
        prefix = meta.base_model_prefix
        checkpoint = Checkpoint(folder, allow_pickle=allow_pickle)
        param_names, shapes, keys, missing = {}, {}, {}, []
        for name, param in meta.named_parameters():  # tied parameters appear once
            canonical = _canonical(name, prefix)
            param_names[canonical] = name
            shapes[canonical] = tuple(param.shape)
            key = next((k for k in (name, canonical, f"{prefix}.{canonical}") if k in checkpoint), None)
            if key is None:
                missing.append(name)
            else:
                keys[canonical] = key
        if missing:
            raise IncompatibleSourceError(
                f"{folder} is missing {len(missing)} tensor(s) its {model_cls.__name__} needs, e.g. "
                f"{missing[:5]}. The checkpoint is incomplete or belongs to another architecture."
            )
        return cls(folder, config, model_cls, checkpoint, param_names, shapes, keys)

    def get_tensor(self, canonical: str) -> torch.Tensor:
        return self.checkpoint.get_tensor(self.keys[canonical])

    def read_tensor(self, canonical: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Like `get_tensor`, but into fresh memory or `out` (no file mapping stays resident)."""
        return self.checkpoint.read_tensor(self.keys[canonical], out=out)

    def delta(self, canonical: str, base: torch.Tensor) -> torch.Tensor:
        """This source's task vector of one tensor (dense for a full fine-tune)."""
        return self.read_tensor(canonical).to(dtype=base.dtype, device=base.device) - base


@dataclass
class MergePlan:
    """What a merge of `sources` into `base` touches.

    `merged` lists, in the base's parameter order, the tensors that base and every source share with the same
    shape; `task_specific[task]` lists the source's other tensors (heads), kept for that task only; `groups`
    names the coefficient groups and `group_index[name]` gives each merged tensor's group.
    """

    base: ModelSpec
    sources: list[ModelSpec]
    tasks: list[str]
    granularity: str
    merged: list[str] = field(default_factory=list)
    task_specific: dict[str, list[str]] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    group_index: dict[str, int] = field(default_factory=dict)
    # one source per task unless a hierarchical level merges group results that carry several tasks:
    source_names: list[str] = field(default_factory=list)  # row names of the coefficients
    task_specs: dict[str, ModelSpec] = field(default_factory=dict)  # each task's architecture and head
    task_source: dict[str, int] = field(default_factory=dict)  # the source that is the task's own fine-tune

    @property
    def num_sources(self) -> int:
        return len(self.sources)


def _block_container(config: PretrainedConfig, cls: type[PreTrainedModel]) -> str | None:
    """Canonical name of the ModuleList holding the transformer blocks (the one with most parameters)."""
    with torch.device("meta"):
        meta = cls(config)
    best, best_size = None, 0
    for name, module in meta.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return _canonical(best, meta.base_model_prefix) if best is not None else None


def group_name(canonical: str, granularity: str, container: str | None) -> str:
    """The coefficient group of one tensor: itself, its transformer block (or top-level module), or the task."""
    if granularity == "tensor":
        return canonical
    if granularity == "task":
        return "all"
    if container and canonical.startswith(container + "."):
        index = canonical[len(container) + 1 :].split(".", 1)[0]
        return f"{container}.{index}"
    return canonical.split(".", 1)[0]


def load_source(folder: str | Path, base: ModelSpec, *, base_name: str | None = None, **kwargs):
    """A source folder as a spec: a full fine-tune (`ModelSpec`) or a PEFT LoRA adapter (`LoraSpec`)."""
    from .lora import LoraSpec, is_adapter  # lora builds on this module

    if is_adapter(folder):
        return LoraSpec(folder, base, base_name=base_name)
    return ModelSpec.from_folder(folder, **kwargs)


def build_plan(
    base: ModelSpec,
    sources: list[ModelSpec],
    tasks: list[str],
    granularity: str,
    *,
    source_names: list[str] | None = None,
    task_specs: dict[str, ModelSpec] | None = None,
    task_source: dict[str, int] | None = None,
) -> MergePlan:
    """Check that every source fits the base and decide what is merged; reads headers only.

    Raises:
        `IncompatibleSourceError`: A source has another `model_type`, or a tensor of the base with another shape.
    """
    base_type = base.config.model_type
    for task, source in zip(tasks, sources):
        if source.config.model_type != base_type:
            raise IncompatibleSourceError(
                f"Source of task {task!r} ({source.folder}) is a {source.config.model_type!r} model but the base "
                f"is {base_type!r}: every source must be fine-tuned from the base."
            )
        for name, shape in source.shapes.items():
            if name in base.shapes and base.shapes[name] != shape:
                raise IncompatibleSourceError(
                    f"Shape mismatch for {name!r}: base {base.shapes[name]} vs source of task {task!r} "
                    f"{shape} ({source.folder}). Sources must keep the base's shapes (same config, same "
                    "vocabulary)."
                )
    merged = [n for n in base.shapes if all(n in s.shapes for s in sources)]
    plan = MergePlan(
        base, sources, tasks, granularity, merged=merged,
        source_names=source_names or list(tasks),
        task_specs=task_specs or dict(zip(tasks, sources)),
        task_source=task_source or {t: i for i, t in enumerate(tasks)},
    )
    merged_set = set(merged)
    for task, source in plan.task_specs.items():
        plan.task_specific[task] = [n for n in source.shapes if n not in merged_set]
        if plan.task_specific[task]:
            logger.info("Task %r keeps its own tensors (not merged): %s", task, plan.task_specific[task])
    container = _block_container(base.config, base.cls) if granularity == "block" else None
    index: dict[str, int] = {}
    for name in merged:
        plan.group_index[name] = index.setdefault(group_name(name, granularity, container), len(index))
    plan.groups = list(index)
    return plan


def load_task_specific(
    plan: MergePlan, task: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The task's own tensors (heads), keyed by the source model's parameter names."""
    source = plan.task_specs[task]
    return {
        source.param_names[n]: source.get_tensor(n).to(device=device, dtype=dtype)
        for n in plan.task_specific[task]
    }
