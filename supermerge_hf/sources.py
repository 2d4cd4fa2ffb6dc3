"""Sources of a merge, from configs and safetensors headers: full fine-tunes (`ModelSpec`) and PEFT adapters
(`AdapterSpec`: `lora.LoraSpec`, `ia3.IA3Spec`; `merger.load_source` picks the kind of a folder).

All answer `config`, `cls` (the task's model class), `param_names` and `shapes` by canonical name (without the
`base_model_prefix`, so a bare `BertModel` and a `BertForSequenceClassification` name the body alike),
`delta(name, base)` (one tensor's task vector) and `read_tensor(name)` (e.g. a head).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}  # PEFT task_type -> the model it was trained on
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight", "qa_outputs.weight")
DENSIFY = "Densify it with PEFT (`PeftModel.from_pretrained(model, dir).merge_and_unload().save_pretrained(out)`) " \
          "and give that folder as the source."


class IncompatibleSourceError(ValueError):
    """A source does not fit the base: other architecture, other shapes, or missing tensors."""


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class named by `config.architectures[0]`, or `AutoModel`'s class for the config."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return AutoModel._model_mapping[type(config)]
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise ValueError(f"Architecture {architectures[0]!r} is not part of transformers {transformers.__version__}; "
                         "custom model code is not supported (upgrade transformers or use a standard architecture).")
    return cls


def canonical(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name


def _meta_parameters(cls: type[PreTrainedModel], config: PretrainedConfig) -> tuple[nn.Module, dict, dict]:
    """A parameter-free (meta) model, and its parameters' names and shapes by canonical name (tied ones once)."""
    with torch.device("meta"):
        meta = cls(config)
    prefix = meta.base_model_prefix
    named = list(meta.named_parameters())
    return meta, {canonical(n, prefix): n for n, _ in named}, {canonical(n, prefix): tuple(p.shape) for n, p in named}


@dataclass
class ModelSpec:
    """A full checkpoint folder, described from its config and headers."""

    folder: Path
    config: PretrainedConfig
    cls: type[PreTrainedModel]
    checkpoint: Checkpoint
    param_names: dict[str, str]  # canonical name -> the model's own parameter name
    shapes: dict[str, tuple[int, ...]]  # canonical name -> shape in the model
    keys: dict[str, str]  # canonical name -> key in the checkpoint
    rows: Any = None  # `vocab.VocabRows`: the vocabulary tensors seen re-indexed to the merged vocabulary

    @classmethod
    def from_folder(cls, folder: str | Path, *, allow_pickle: bool = False) -> ModelSpec:
        folder = Path(folder)
        config = AutoConfig.from_pretrained(folder)
        model_cls = model_class(config)
        meta, param_names, shapes = _meta_parameters(model_cls, config)
        checkpoint = Checkpoint(folder, allow_pickle=allow_pickle)
        keys, missing = {}, []
        for name, param in param_names.items():
            key = next((k for k in (param, name, f"{meta.base_model_prefix}.{name}") if k in checkpoint), None)
            if key is None:
                missing.append(param)
            elif checkpoint.shape(key) != shapes[name]:
                raise IncompatibleSourceError(f"{folder}: tensor {key!r} has shape {checkpoint.shape(key)} in the file "
                                              f"but {shapes[name]} by its config.json: the weights and the config "
                                              "belong to different models (e.g. another vocab_size).")
            else:
                keys[name] = key
        if missing:
            raise IncompatibleSourceError(f"{folder} is missing {len(missing)} tensor(s) its {model_cls.__name__} "
                                          f"needs, e.g. {missing[:5]}: it is incomplete or of another architecture. "
                                          "Re-save the whole fine-tuned model with `save_pretrained`, or give the "
                                          "adapter folder if it is a PEFT adapter.")
        buffers = {n for b, _ in meta.named_buffers() for n in (b, canonical(b, meta.base_model_prefix))}
        extra = sorted(set(checkpoint.keys()) - set(keys.values()) - buffers)
        if extra:
            logger.warning("%s holds %d tensor(s) its %s does not have; they are not merged: %s", folder, len(extra),
                           model_cls.__name__, extra[:5])
        return cls(folder, config, model_cls, checkpoint, param_names, shapes, keys)

    def read_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.rows is not None and name in self.rows.names:
            return self.rows.align(name, self.checkpoint.read_tensor(self.keys[name]), out=out)
        return self.checkpoint.read_tensor(self.keys[name], out=out)

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        return self.read_tensor(name).to(dtype=base.dtype, device=base.device) - base

    def build(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> PreTrainedModel:
        """This checkpoint's model in `dtype`, with `tensors` (by canonical name) in place of its own."""
        model = self.cls.from_pretrained(self.folder, dtype=dtype)
        if self.rows is not None:  # the merged vocabulary: other rows than the folder's
            model.resize_token_embeddings(self.config.get_text_config().vocab_size, mean_resizing=False)
            tensors = {n: self.read_tensor(n) for n in self.rows.names} | tensors
        with torch.no_grad():
            for name, tensor in tensors.items():
                model.get_parameter(self.param_names[name]).copy_(tensor)
        return model.eval()


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _same_base(declared: str | None, base: ModelSpec, base_name: str | None) -> bool:
    """Whether the adapter's `base_model_name_or_path` names this base (a Hub id must match exactly)."""
    if not declared or declared in {base_name, str(base.folder), str(base.folder.resolve())}:
        return True  # PEFT leaves it empty for models built from a config; the shapes are still checked
    if Path(declared).expanduser().exists():
        return Path(declared).expanduser().resolve() == base.folder.resolve()
    hub_id = declared.count("/") == 1 and not declared.startswith((".", "/", "~"))
    return not hub_id and Path(declared).name == base.folder.name  # a folder named as when it was trained


class AdapterSpec:
    """A PEFT adapter of the base as a source: the task's class and config (`task_type`, the saved head's label
    count), dense saved modules (`modules_to_save`, in `saved`) and the base's other tensors. `LoraSpec` and
    `ia3.IA3Spec` read the adapter's own tensors (`_read`) and give their task vectors (`delta`); `follows[t]`
    names the tensor whose coefficient group tensor `t` shares (an IA³-scaled bias follows its weight).
    `IncompatibleSourceError` for another adapter type or base, or tensors the architecture does not have."""

    peft_type = ""  # `peft_type` of adapter_config.json
    kind, label = "", ""  # how messages name the adapter type and its own tensors

    def __init__(self, folder: str | Path, base: ModelSpec, *, base_name: str | None = None) -> None:
        self.folder, self.base, self.rows = Path(folder), base, None
        self.adapter_config = cfg = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        self.where = where = f"Adapter {str(self.folder)!r}"
        if cfg.get("peft_type") != self.peft_type:
            raise IncompatibleSourceError(f"{where} is a {cfg.get('peft_type')!r} adapter, not {self.peft_type}; "
                                          f"LoRA and IA3 adapters are read. {DENSIFY}")
        self._check_config(cfg)
        if not _same_base(cfg.get("base_model_name_or_path"), base, base_name):
            raise IncompatibleSourceError(f"{where} was trained on {cfg.get('base_model_name_or_path')!r}, not on the "
                                          f"base {base_name or str(base.folder)!r}. Merge adapters of one base only.")
        self.checkpoint = Checkpoint(self.folder, weights=ADAPTER_WEIGHTS)
        keys = {k.removeprefix(PEFT_PREFIX): k for k in self.checkpoint.keys()}
        auto = TASK_CLASSES.get(cfg.get("task_type") or "")
        self.cls = getattr(transformers, auto)._model_mapping[type(base.config)] if auto else base.cls
        self.config = copy.deepcopy(base.config)
        heads = [key for name, key in keys.items() if name.endswith(HEAD_SUFFIXES)]
        if cfg.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and heads:  # the label count is the saved head's
            self.config.num_labels = self.checkpoint.shape(heads[0])[0]
        self.config.architectures = [self.cls.__name__]
        meta, self.param_names, self.shapes = _meta_parameters(self.cls, self.config)
        self.follows: dict[str, str] = {}
        self.saved: dict[str, str] = {}  # modules_to_save tensors: canonical name -> key
        for name, key in keys.items():
            if not self._read(meta, name, key, keys):
                self.saved[canonical(name, meta.base_model_prefix)] = key
        unknown = [self.saved[n] for n in self.saved if n not in self.shapes]
        if unknown:
            raise IncompatibleSourceError(f"{where} holds tensors its {self.cls.__name__} does not have: {unknown[:5]}."
                                          " The adapter was trained on another architecture.")
        missing = [n for n in self.shapes if n not in base.shapes and n not in self.saved]
        if missing:
            raise IncompatibleSourceError(f"{where} lacks tensors its {self.cls.__name__} needs and the base does not "
                                          f"have: {missing[:5]}. Save the head with the adapter (`modules_to_save`).")

    def _check_config(self, cfg: dict) -> None:
        """`IncompatibleSourceError` for adapter options whose task vector this reader would not give exactly."""

    def _read(self, meta: nn.Module, name: str, key: str, keys: dict[str, str]) -> bool:
        """Record `key` (`name` without PEFT's prefix) if it is one of the adapter's own tensors; False otherwise."""
        raise NotImplementedError

    @property
    def targeted(self) -> list[str]:
        """The tensors whose task vector is in the adapter's own form (not dense)."""
        raise NotImplementedError

    def _layer(self, meta: nn.Module, module: str, types: tuple[type, ...]) -> nn.Module:
        """The base layer `module` that adapter tensors belong to, checked to be one of `types`."""
        try:
            layer = meta.get_submodule(module)
        except AttributeError:
            raise IncompatibleSourceError(f"{self.where} has {self.label} for {module!r}, a module its "
                                          f"{self.cls.__name__} does not have.") from None
        if not isinstance(layer, types):
            raise IncompatibleSourceError(f"{self.where} has {self.label} on {module!r}, a {type(layer).__name__}; "
                                          f"only {', '.join(t.__name__ for t in types)} are read. {DENSIFY}")
        return layer

    def read_tensor(self, name: str) -> torch.Tensor:
        """A saved module's tensor (e.g. the head), else the base's."""
        if name not in self.saved:
            return self.base.read_tensor(name)
        tensor = self.checkpoint.read_tensor(self.saved[name])
        return tensor if self.rows is None or name not in self.rows.names else self.rows.align(name, tensor)

    def aligned(self, base: ModelSpec, config: PretrainedConfig, shapes: dict, rows: Any) -> AdapterSpec:
        """This adapter over `base` seen in the merged vocabulary (`vocab.align_vocabulary`): its `config` and
        `shapes`, its saved vocabulary tensors re-indexed by `rows` (`None`: it saved none)."""
        view = copy.copy(self)
        view.base, view.config, view.shapes, view.rows = base, config, shapes, rows
        return view

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Dense for saved modules, None (no change) for the base's other tensors."""
        if name in self.saved:
            return self.read_tensor(name).to(dtype=base.dtype, device=base.device) - base
        return None


Source = ModelSpec | AdapterSpec
