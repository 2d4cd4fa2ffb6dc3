"""What a merge touches, decided from configs and safetensors headers: the sources, merged tensors, heads and
groups."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ia3 import IA3Spec
from .lora import LoraSpec
from .sources import ADAPTER_CONFIG, DENSIFY, AdapterSpec, IncompatibleSourceError, ModelSpec, Source, is_adapter
from .vocab import Vocabulary, align_vocabulary

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # "encoder.layer.3.attention.self.query.weight" -> "encoder.layer.3"


ADAPTER_TYPES = {spec.peft_type: spec for spec in (LoraSpec, IA3Spec)}  # PEFT's peft_type -> its reader


def load_source(folder: str | Path, base: ModelSpec, *, base_name: str | None = None,
                allow_pickle: bool = False) -> Source:
    """A full fine-tune (`ModelSpec`), or a PEFT adapter by its `peft_type`: `LoraSpec`, `IA3Spec`."""
    if not is_adapter(folder):
        return ModelSpec.from_folder(folder, allow_pickle=allow_pickle)
    peft_type = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("peft_type")
    if peft_type not in ADAPTER_TYPES:
        raise IncompatibleSourceError(f"Adapter {str(folder)!r} is a {peft_type!r} adapter; the adapters read are "
                                      f"{sorted(ADAPTER_TYPES)}. {DENSIFY}")
    return ADAPTER_TYPES[peft_type](folder, base, base_name=base_name)


def block_name(name: str) -> str:
    """A tensor's transformer block: its name up to the first numeric part (`decoder.block.1`), else its
    top-level module (`embeddings`, `lm_head`). Every encoder and decoder block is its own block."""
    match = _BLOCK.match(name)
    return match[1] if match else name.split(".", 1)[0]


def layer_depths(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's depth (ℓ − 1) / (L − 1) in [0, 1]: its block's index over the last index of its stack of
    blocks (`encoder.layer`, `decoder.block`: each stack its own ramp); 0 outside numbered blocks (embeddings,
    final norms, heads) and in a stack of one block, which LiNeS scales like the first block."""
    blocks = {n: block_name(n).rpartition(".") for n in names}  # "encoder.layer.3" -> ("encoder.layer", ".", "3")
    last: dict[str, int] = {}
    for stack, _, index in blocks.values():
        if index.isdigit():
            last[stack] = max(last.get(stack, 0), int(index))
    return {name: int(index) / last[stack] if index.isdigit() and last[stack] else 0.0
            for name, (stack, _, index) in blocks.items()}


def group_name(name: str, granularity: str) -> str:
    """The coefficient group of one tensor: itself (`tensor`, and `row` / `singular` outside block matrices), its
    transformer block, or the whole task (`all`)."""
    return name if granularity in ("tensor", "row", "singular") else "all" if granularity == "task" else \
        block_name(name)


@dataclass
class MergePlan:
    """What a merge touches: `merged` (tensors the base and every source share with one shape, in the base's
    order), `task_specific[task]` (its other tensors, e.g. heads), the coefficient `groups` and each merged
    tensor's `group_index`. A source (a row, named in `source_names`) is a fine-tune or, in a hierarchical
    level, a group result carrying several tasks (`task_rows`); `task_specs[task]` is the task's own source."""

    base: ModelSpec
    sources: list[Source]
    tasks: list[str]
    granularity: str
    merged: list[str] = field(default_factory=list)
    task_specific: dict[str, list[str]] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    group_index: dict[str, int | slice] = field(default_factory=dict)  # a slice: per row or singular direction
    source_names: list[str] = field(default_factory=list)
    task_specs: dict[str, Source] = field(default_factory=dict)
    task_rows: dict[str, int] = field(default_factory=dict)  # the source (row) that carries each task
    vocabulary: Vocabulary | None = None  # the merged vocabulary, when it is not every model's own

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    def directions(self, name: str) -> bool:
        """Whether merged tensor `name` has one coefficient per singular direction of its task vectors (`singular`)."""
        return self.granularity == "singular" and isinstance(self.group_index[name], slice)

    def label_counts(self) -> dict[str, int | None]:
        """Per task, the number of classes of its classifier fine-tune (`None` for other heads)."""
        classifier = ("ForSequenceClassification", "ForTokenClassification")
        return {t: s.config.num_labels if s.cls.__name__.endswith(classifier) else None
                for t, s in self.task_specs.items()}


def _check_kind(base: ModelSpec, task: str, source: Source) -> None:
    if source.config.model_type != base.config.model_type:
        raise IncompatibleSourceError(f"Source of task {task!r} ({source.folder}) is a {source.config.model_type!r} "
                                      f"model but the base is {base.config.model_type!r}: every source must be "
                                      "fine-tuned from the base.")
    tied = [getattr(c, "tie_word_embeddings", None) for c in (base.config, source.config)]
    if tied[0] != tied[1]:
        raise IncompatibleSourceError(f"Source of task {task!r} ({source.folder}) has tie_word_embeddings={tied[1]} "
                                      f"but the base has {tied[0]}: its output embedding is another tensor than the "
                                      "base's. Re-save the source with the base's setting.")


def _check_shapes(base: ModelSpec, task: str, source: Source) -> None:
    has_body = any(param != name for name, param in source.param_names.items())
    for name, shape in source.shapes.items():
        head = has_body and source.param_names[name] == name  # outside the body (`bert.`, `model.`): a head
        if name in base.shapes and base.shapes[name] != shape and not head:
            raise IncompatibleSourceError(f"Shape mismatch for {name!r}: base {base.shapes[name]} vs source of task "
                                          f"{task!r} {shape} ({source.folder}). Sources must keep the base's shapes "
                                          "(same config, same vocabulary); only heads may differ. A source that added "
                                      "tokens: save its tokenizer beside it and merge with tokenizer_source: union.")


def build_plan(base: ModelSpec, sources: list[Source], tasks: list[str], granularity: str, *,
               source_names: list[str] | None = None, task_specs: dict[str, Source] | None = None,
               task_rows: dict[str, int] | None = None, merged: list[str] | None = None,
               tokenizer_source: str | None = None) -> MergePlan:
    """Check that every source fits the base and decide what is merged, from headers; a head whose shape differs
    is task-specific, a body tensor that differs raises `IncompatibleSourceError`. `merged` restricts the merge
    (a hierarchical level merges what the flat plan merges). `tokenizer_source` (`base`, `union` or a task; flat
    plans only) first aligns every model's vocabulary tensors to that vocabulary (`vocab.align_vocabulary`). A
    tensor an adapter ties to another (`AdapterSpec.follows`: an IA³-scaled bias) is in that one's group."""
    task_specs = task_specs or dict(zip(tasks, sources))
    for task, source in task_specs.items():
        _check_kind(base, task, source)
    vocabulary = None
    if tokenizer_source is not None:
        vocabulary, base, task_specs = align_vocabulary(base, task_specs, tokenizer_source)
        sources = [task_specs[t] for t in tasks]
    for task, source in task_specs.items():
        _check_shapes(base, task, source)
    shared = [n for n in base.shapes if all(base.shapes[n] == s.shapes.get(n) for s in sources)]
    merged = [n for n in shared if n in merged] if merged is not None else shared
    plan = MergePlan(base, sources, tasks, granularity, merged=merged, source_names=source_names or list(tasks),
                     task_specs=task_specs, task_rows=task_rows or {t: i for i, t in enumerate(tasks)},
                     vocabulary=vocabulary)
    merged_set = set(merged)
    for task, source in task_specs.items():
        plan.task_specific[task] = [n for n in source.shapes if n not in merged_set]
    index: dict[str, int] = {}
    # an IA³-scaled bias is in its weight's group, so the merge is one IA³ vector per layer; under `row` too, an
    # IA³-scaled layer keeps one coefficient per vector (per-row coefficients would not be a scaling)
    follows = {t: w for s in sources if isinstance(s, AdapterSpec) for t, w in s.follows.items() if w in merged_set}
    scaled = {n for s in sources if isinstance(s, IA3Spec) for n in s.vectors}
    for name in merged:
        shape = base.shapes[name]
        split = granularity in ("row", "singular") and _in_block_matrix(name, shape) and name not in scaled
        rows = 0 if not split else shape[0] if granularity == "row" else _directions(name, shape, sources)
        if rows:  # a block's matrix has one group per row (`row`) or singular direction, `group_index` their slice
            plan.group_index[name] = slice(len(index), len(index) + rows)
            label = "{}[{}]" if granularity == "row" else "{}[σ{}]"
            index.update({label.format(name, r): len(index) + r for r in range(rows)})
        else:
            plan.group_index[name] = index.setdefault(group_name(follows.get(name, name), granularity), len(index))
    plan.groups = list(index)
    return plan


def _in_block_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """A matrix inside a numbered transformer block (not an embedding, head or final norm)."""
    return len(shape) >= 2 and _BLOCK.match(name) is not None


def _directions(name: str, shape: tuple[int, ...], sources: list[Source]) -> int:
    """The singular directions a matrix's task vectors can have, from headers: min(out, in) where a source changes it
    densely (a fine-tune, a saved module), else the largest LoRA rank; 0 (one group) where no source changes it or
    it is not 2-D."""
    if len(shape) != 2:
        return 0
    lora = [s.checkpoint.shape(s.factors[name][0])[0] for s in sources if name in getattr(s, "factors", {})]
    dense = any(not isinstance(s, AdapterSpec) or name in s.saved for s in sources)
    return min(shape) if dense else min(max(lora, default=0), *shape)


def saved_dtype(plan: MergePlan, dtype: str) -> torch.dtype:
    """The dtype a merge is saved in: `dtype`, or for `auto` the full fine-tunes' common floating dtype (the base's
    when they differ or when every source is an adapter), from the headers."""
    if dtype != "auto":
        return getattr(torch, dtype)
    full = {s.checkpoint.dtype() for s in plan.sources if isinstance(s, ModelSpec)}
    return full.pop() if len(full) == 1 and None not in full else plan.base.checkpoint.dtype() or torch.float32


def load_task_specific(plan: MergePlan, task: str, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The task's own tensors (heads), keyed by the task model's parameter names."""
    source = plan.task_specs[task]
    return {source.param_names[n]: source.read_tensor(n).to(device=device, dtype=dtype)
            for n in plan.task_specific[task]}
