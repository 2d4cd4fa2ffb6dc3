"""LoRA adapters as sources (method.md section 5): each targeted weight's task vector is s * B @ A (s = alpha / r,
alpha / sqrt(r) with rsLoRA, per module with `alpha_pattern`; transposed for Conv1D / Embedding), read as PEFT
reads it and kept low-rank (`deltas.LowRankDelta`)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .deltas import LowRankDelta
from .sources import DENSIFY, AdapterSpec, IncompatibleSourceError, ModelSpec, canonical

FACTOR_SUFFIXES = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}  # A -> B
NOT_LOW_RANK = {  # LoraConfig fields that, when set, make the task vector something other than s * B @ A
    "use_dora": "DoRA", "lora_bias": "lora_bias (a trained bias in lora_B)", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow routing", "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer_replication", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: a key matches a module path ending in it."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


class LoraSpec(AdapterSpec):
    """A LoRA adapter as a source: low-rank deltas s * B A (`factors`), dense saved modules, the base's other
    tensors. `IncompatibleSourceError` for variants whose deltas are not s * B A (DoRA, ...), another base."""

    peft_type, kind, label = "LORA", "LoRA", "LoRA factors"

    def __init__(self, folder: str | Path, base: ModelSpec, *, base_name: str | None = None) -> None:
        self.factors: dict[str, tuple[str, str, float, bool]] = {}  # weight -> (A key, B key, scale, transposed)
        super().__init__(folder, base, base_name=base_name)

    def _check_config(self, cfg: dict) -> None:
        kinds = [label for key, label in NOT_LOW_RANK.items() if cfg.get(key)]
        kinds += [f"bias={cfg['bias']!r}"] if cfg.get("bias", "none") != "none" else []
        if kinds:
            raise IncompatibleSourceError(f"{self.where} uses {', '.join(kinds)}: its task vector is not s * B @ A, "
                                          f"so it cannot be merged in LoRA space. {DENSIFY}")

    def _read(self, meta: nn.Module, name: str, key: str, keys: dict[str, str]) -> bool:
        suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is None:  # B factors are read with their A; anything else of LoRA's is not s * B @ A
            if ".lora_" in name and not name.endswith(tuple(FACTOR_SUFFIXES.values())):
                raise IncompatibleSourceError(f"{self.where} holds {key!r}, which is not a LoRA factor: its task "
                                              f"vector is not s * B @ A. {DENSIFY}")
            return ".lora_" in name
        module = name.removesuffix(suffix)
        weight = canonical(module, meta.base_model_prefix) + ".weight"
        r, cfg = self.checkpoint.shape(key)[0], self.adapter_config
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layer = self._layer(meta, module, (nn.Linear, Conv1D, nn.Embedding))
        transposed = isinstance(layer, (Conv1D, nn.Embedding))  # PEFT orients each layer by its type
        self.factors[weight] = (key, keys[module + FACTOR_SUFFIXES[suffix]], scale, transposed)
        self._check_shape(weight, r)
        return True

    @property
    def targeted(self) -> list[str]:
        return list(self.factors)

    def _check_shape(self, weight: str, r: int) -> None:
        a_key, b_key, _, transposed = self.factors[weight]
        out_dim, in_dim = self.checkpoint.shape(b_key)[0], self.checkpoint.shape(a_key)[1]
        shape = (in_dim, out_dim) if transposed else (out_dim, in_dim)
        if self.shapes.get(weight) != shape:
            raise IncompatibleSourceError(f"{self.where}: LoRA factors of {weight!r} (rank {r}) give shape {shape}, "
                                          f"but the base has {self.shapes.get(weight)}.")

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | LowRankDelta | None:
        """Low-rank for LoRA-targeted weights, dense for saved modules, None elsewhere."""
        if name in self.factors:
            a_key, b_key, scale, transposed = self.factors[name]
            return LowRankDelta(self.checkpoint.read_tensor(a_key), self.checkpoint.read_tensor(b_key), scale,
                                transposed)
        return super().delta(name, base)
