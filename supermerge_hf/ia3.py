"""IA³ adapters as sources (method.md section 8), read as PEFT reads them (`peft.tuners.ia3`).

PEFT stores one vector `ia3_l` per targeted Linear / Conv1D layer, initialised to ones. A feed-forward-type layer
(`feedforward_modules`) scales its input, y = W (l * x): `ia3_l` is `(1, in)` and the merged weight W diag(l). An
attention-type layer scales its output, bias included, y = l * (W x + b): `ia3_l` is `(out, 1)`, the merged weight
diag(l) W and the bias l * b. Conv1D (GPT-2) stores W as `(in, out)`, so the scaled dimension swaps
(PEFT's `fan_in_fan_out`, decided by the layer's type). The task vector is l - 1 times the base
(`deltas.ScaleDelta`), and the merge stays in IA³ space: l = 1 + sum_i c_i (l_i - 1). While learning, a layer
changed by IA³ sources only scales its input or output by l(c) in a forward hook (`hook_scale_layers`), as PEFT's
forward does: no merged weight of it is formed, and autograd through c gives its part of dL/dc exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .deltas import DeltaStack, ScaleDelta
from .sources import DENSIFY, AdapterSpec, IncompatibleSourceError, ModelSpec, canonical

VECTOR_SUFFIX = ".ia3_l"


def is_feedforward(adapter_config: dict, module: str, model_type: str) -> bool:
    """PEFT's rule (`IA3Model._check_target_module_feedforward`): a string `feedforward_modules` is a regex the
    whole module path matches, a list holds suffixes of it; unset, PEFT's default for the architecture."""
    patterns = adapter_config.get("feedforward_modules")
    if patterns is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            raise IncompatibleSourceError(f"An IA3 adapter without `feedforward_modules` on a {model_type!r} model, "
                                          "for which PEFT has no default: set them in its adapter_config.json.")
        patterns = DEFAULTS[model_type]
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module.endswith(pattern) for pattern in patterns)


class IA3Spec(AdapterSpec):
    """A PEFT IA³ adapter as a source: per targeted layer the vector l (`vectors`: the weight and, for an
    attention-type layer with a bias, the bias), dense saved modules (`modules_to_save`), the base's other
    tensors. A scaled bias shares its weight's coefficient group (`follows`), so that the merge is one IA³ adapter.
    `IncompatibleSourceError` for layers other than Linear / Conv1D, vectors whose shape PEFT would not load,
    another base."""

    peft_type, kind, label = "IA3", "IA³", "IA³ vectors"

    def __init__(self, folder: str | Path, base: ModelSpec, *, base_name: str | None = None) -> None:
        self.vectors: dict[str, tuple[str, int, bool]] = {}  # tensor -> (key of l, dim that l scales, on input)
        super().__init__(folder, base, base_name=base_name)

    def _read(self, meta: nn.Module, name: str, key: str, keys: dict[str, str]) -> bool:
        if not name.endswith(VECTOR_SUFFIX):
            if ".ia3_" in name:
                raise IncompatibleSourceError(f"{self.where} holds {key!r}, which is not an IA³ vector `ia3_l`.")
            return False
        module = name.removesuffix(VECTOR_SUFFIX)
        layer = self._layer(meta, module, (nn.Linear, Conv1D))
        on_input = is_feedforward(self.adapter_config, module, self.config.model_type)
        conv = isinstance(layer, Conv1D)  # weight (in, out)
        n_in, n_out = tuple(layer.weight.shape) if conv else (layer.in_features, layer.out_features)
        shape, expected = self.checkpoint.shape(key), (1, n_in) if on_input else (n_out, 1)
        if shape != expected:
            kind = "feed-forward" if on_input else "attention"
            raise IncompatibleSourceError(
                f"{self.where}: the IA³ vector of {module!r} has shape {shape}, but by its feedforward_modules "
                f"{self.adapter_config.get('feedforward_modules')!r} the layer is of {kind} type, whose vector PEFT "
                f"reads as {expected}. Fix feedforward_modules in adapter_config.json, or the adapter belongs to "
                "another architecture.")
        prefix = canonical(module, meta.base_model_prefix)
        if f"{prefix}.weight" not in self.shapes:  # named_parameters() gives a tied weight once, by its other user
            raise IncompatibleSourceError(f"{self.where} scales {module!r}, whose weight is tied to another module's "
                                          f"(e.g. an LM head tied to the input embedding). {DENSIFY}")
        self.vectors[f"{prefix}.weight"] = (key, int(on_input != conv), on_input)  # Linear W is (out, in)
        if not on_input and layer.bias is not None:
            self.vectors[f"{prefix}.bias"] = (key, 0, False)
            self.follows[f"{prefix}.bias"] = f"{prefix}.weight"
        return True

    @property
    def targeted(self) -> list[str]:
        return list(self.vectors)

    def read_vector(self, name: str) -> torch.Tensor:
        """The layer's l `(n,)` in float32, for tensor `name` (its weight or scaled bias)."""
        return self.checkpoint.read_tensor(self.vectors[name][0]).flatten().float()

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | ScaleDelta | None:
        """(l - 1) scaling the base for IA³-targeted tensors, dense for saved modules, None elsewhere."""
        if name in self.vectors:
            _, dim, on_input = self.vectors[name]
            return ScaleDelta((self.read_vector(name) - 1).to(base.device, base.dtype), dim, base, on_input)
        return super().delta(name, base)


class ScaleLayer:
    """The IA³ vectors of one layer, all sources stacked: its scale l(c) = 1 + sum_i c_i (l_i - 1) `(n,)`, applied
    to the input (`on_input`) or the output; `names`: the tensors it stands for (the weight, a scaled bias)."""

    def __init__(self, parts: list[tuple[int, ScaleDelta]], group: int, names: list[str]) -> None:
        self.group, self.names, self.on_input = group, names, parts[0][1].on_input
        self.vectors = torch.stack([p.vector for _, p in parts])  # (S', n): l_i - 1
        self.source = torch.tensor([i for i, _ in parts], device=self.vectors.device)  # (S',)

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        """l(c) `(n,)`, differentiable in the coefficients `c` `(S, G)`."""
        return 1 + c[self.source, self.group].to(self.vectors.dtype) @ self.vectors


def _only_scales(stack: DeltaStack) -> bool:
    return all(p is None or isinstance(p, ScaleDelta) for p in stack.parts)


def hook_scale_layers(deltas: dict[str, DeltaStack], group_index: dict[str, int | slice],
                      modules_of: Callable[[str], list[nn.Module | None]],
                      coefficients: Callable[[], torch.Tensor | None]) -> dict[str, ScaleLayer]:
    """Hook every layer whose task vectors are all IA³ ones, in one coefficient group with its scaled bias, so that
    it scales its input or output by l(c) whenever `coefficients()` gives c; `modules_of(weight)`: the layer in
    each task's model. Any other layer keeps its IA³ task vectors dense (a weight that LoRA or a full fine-tune also
    changes, sources of both IA³ types, `row` groups, a weight tied to a second module). Returns the hooked layers
    by weight name."""
    layers = {}
    for name, stack in deltas.items():
        parts = [(i, p) for i, p in enumerate(stack.parts) if isinstance(p, ScaleDelta)]
        group = group_index[name]
        if not parts or not _only_scales(stack) or not isinstance(group, int) or \
                len({p.on_input for _, p in parts}) > 1:
            continue
        modules = modules_of(name)
        if not modules or not all(isinstance(m, (nn.Linear, Conv1D)) for m in modules):
            continue
        names = [name]
        if not parts[0][1].on_input and modules[0].bias is not None:  # the output scale covers the bias too
            bias = name.removesuffix("weight") + "bias"
            if bias not in deltas or group_index[bias] != group or not _only_scales(deltas[bias]):
                continue
            names.append(bias)
        layers[name] = layer = ScaleLayer(parts, group, names)
        for module in modules:
            if layer.on_input:
                module.register_forward_pre_hook(lambda m, args, layer=layer: None if coefficients() is None
                                                 else (args[0] * layer(coefficients()), *args[1:]))
            else:
                module.register_forward_hook(lambda m, args, out, layer=layer: out if coefficients() is None
                                             else out * layer(coefficients()))
    return layers
