"""PEFT LoRA adapters as sources (low-rank task vectors, never densified) and the exact combined adapter.

An adapter's task vector of a targeted weight is s * B @ A (s = lora_alpha / r, or lora_alpha / sqrt(r) with
rsLoRA; transposed for `fan_in_fan_out` layers such as GPT-2's Conv1D), method.md section 5. Its saved
`modules_to_save` are dense: a module the base has with the same shape gets task vector (saved - base); any
other (a classifier head) is task-specific.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .checkpoint import Checkpoint
from .deltas import LowRankDelta
from .task_vectors import IncompatibleSourceError, ModelSpec, _canonical

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TASK_CLASSES = {  # PEFT task_type -> the Auto class whose model the adapter was trained on
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight", "qa_outputs.weight")
FACTOR_SUFFIXES = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}  # A -> B
NOT_LOW_RANK = {  # LoraConfig fields that, when set, make the task vector something other than s * B @ A
    "use_dora": "DoRA", "lora_bias": "lora_bias (a trained bias in lora_B)", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow routing", "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer_replication", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: a key matches a module path ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _same_base(declared: str | None, base: ModelSpec, base_name: str | None) -> bool:
    if not declared:
        return True  # PEFT leaves it empty for models built from a config; the shapes are still checked
    names = {str(base.folder), str(base.folder.resolve()), base.folder.name}
    if base_name:
        names |= {base_name, base_name.rstrip("/").split("/")[-1]}
    return declared in names or declared.rstrip("/").split("/")[-1] in names


class LoraSpec:
    """A LoRA adapter seen as a source of the base: the task model's tensors, low-rank deltas, saved modules.

    Raises:
        `IncompatibleSourceError`: Not a LoRA adapter, DoRA or trained biases (delta is not s * B A), an adapter
            declared for another base, or factors whose product does not have the base weight's shape.
    """

    def __init__(self, folder: str | Path, base: ModelSpec, *, base_name: str | None = None) -> None:
        self.folder = Path(folder)
        self.adapter_config = cfg = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        where = f"Adapter {str(self.folder)!r}"
        if cfg.get("peft_type") != "LORA":
            raise IncompatibleSourceError(
                f"{where} is a {cfg.get('peft_type')!r} adapter; only LoRA adapters are read. Merge it into its "
                "base with PEFT (`PeftModel.from_pretrained(model, dir).merge_and_unload().save_pretrained(out)`) "
                "and give that folder as the source."
            )
        kinds = [label for key, label in NOT_LOW_RANK.items() if cfg.get(key)]
        kinds += [f"bias={cfg['bias']!r}"] if cfg.get("bias", "none") != "none" else []
        if kinds:
            raise IncompatibleSourceError(
                f"{where} uses {', '.join(kinds)}: its task vector is not s * B @ A, so it cannot be merged in LoRA "
                "space. "
                "Densify it with PEFT (`PeftModel.from_pretrained(model, dir).merge_and_unload()`, then "
                "`save_pretrained`) and give that full checkpoint as the source."
            )
        if not _same_base(cfg.get("base_model_name_or_path"), base, base_name):
            raise IncompatibleSourceError(
                f"{where} was trained on {cfg.get('base_model_name_or_path')!r}, not on the base "
                f"{base_name or str(base.folder)!r}. Merge adapters of one base only."
            )
        self.checkpoint = Checkpoint(self.folder, weights=ADAPTER_WEIGHTS)
        keys = {k.removeprefix(PEFT_PREFIX): k for k in self.checkpoint.keys()}
        self.config = self._task_config(base, cfg, keys)
        self.cls = self._task_class(base, cfg)
        self.config.architectures = [self.cls.__name__]
        with torch.device("meta"):
            meta = self.cls(self.config)
        prefix = meta.base_model_prefix
        self.param_names = {_canonical(n, prefix): n for n, _ in meta.named_parameters()}
        self.shapes = {_canonical(n, prefix): tuple(p.shape) for n, p in meta.named_parameters()}
        self.factors: dict[str, tuple[str, str, float, bool]] = {}  # weight -> (A key, B key, scale, transposed)
        self.saved: dict[str, str] = {}  # modules_to_save tensors: canonical name -> key
        for name, key in keys.items():
            suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                module = name.removesuffix(suffix)
                weight = _canonical(module, prefix) + ".weight"
                r = self.checkpoint.shape(key)[0]
                alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
                scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
                transposed = self._transposed(meta, module)
                self.factors[weight] = (key, keys[module + FACTOR_SUFFIXES[suffix]], scale, transposed)
                self._check_shape(weight, r)
            elif ".lora_" in name:  # B factors are read with their A; anything else is not s * B @ A
                if not name.endswith(tuple(FACTOR_SUFFIXES.values())):
                    raise IncompatibleSourceError(
                        f"{where} holds {key!r}, which is not a LoRA factor: its task vector is not s * B @ A. "
                        "Densify it with PEFT (`merge_and_unload()`, then `save_pretrained`) and give that folder."
                    )
            else:
                self.saved[_canonical(name, prefix)] = key
        unknown = [self.saved[n] for n in self.saved if n not in self.shapes]
        if unknown:
            raise IncompatibleSourceError(
                f"{where} holds tensors its {self.cls.__name__} does not have: {unknown[:5]}. The adapter was "
                "trained on another architecture, or uses a PEFT feature that is not read here."
            )
        missing = [n for n in self.shapes if n not in base.shapes and n not in self.saved]
        if missing:
            raise IncompatibleSourceError(
                f"{where} lacks tensors its {self.cls.__name__} needs and the base does not have: {missing[:5]}. "
                "Save the head with the adapter (`modules_to_save`)."
            )

    def _transposed(self, meta: nn.Module, module: str) -> bool:
        """Whether PEFT stores this layer's delta transposed: Conv1D (`fan_in_fan_out`) and Embedding layers.

        Decided by the layer's type, as PEFT does: the saved `fan_in_fan_out` flag is the last layer's only.
        """
        try:
            layer = meta.get_submodule(module)
        except AttributeError:
            raise IncompatibleSourceError(
                f"Adapter {str(self.folder)!r} has LoRA factors for {module!r}, a module its {self.cls.__name__} "
                "does not have. The adapter was trained on another architecture."
            ) from None
        if isinstance(layer, (Conv1D, nn.Embedding)):
            return True
        if isinstance(layer, nn.Linear):
            return False
        raise IncompatibleSourceError(
            f"Adapter {str(self.folder)!r} has LoRA on {module!r}, a {type(layer).__name__}; only Linear, Conv1D and "
            "Embedding layers are read. Densify it with PEFT (`merge_and_unload()`) and give that folder."
        )

    def _check_shape(self, weight: str, r: int) -> None:
        a_key, b_key, _, transposed = self.factors[weight]
        out_dim, in_dim = self.checkpoint.shape(b_key)[0], self.checkpoint.shape(a_key)[1]
        shape = (in_dim, out_dim) if transposed else (out_dim, in_dim)
        if weight not in self.shapes or self.shapes[weight] != shape:
            raise IncompatibleSourceError(
                f"Adapter {str(self.folder)!r}: LoRA factors of {weight!r} (rank {r}) give shape {shape}, but the "
                f"base has {self.shapes.get(weight)}. The adapter was trained on another base."
            )

    @staticmethod
    def _task_class(base: ModelSpec, cfg: dict):
        auto = TASK_CLASSES.get(cfg.get("task_type") or "")
        if auto is None:
            return base.cls
        return getattr(transformers, auto)._model_mapping[type(base.config)]

    def _task_config(self, base: ModelSpec, cfg: dict, keys: dict[str, str]) -> PretrainedConfig:
        config = copy.deepcopy(base.config)
        if cfg.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):  # the label count is the saved head's
            heads = [key for name, key in keys.items() if name.endswith(HEAD_SUFFIXES)]
            if heads:
                config.num_labels = self.checkpoint.shape(heads[0])[0]
        return config

    def get_tensor(self, canonical: str) -> torch.Tensor:
        """A saved (`modules_to_save`) tensor, e.g. the task's head."""
        return self.checkpoint.get_tensor(self.saved[canonical])

    def delta(self, canonical: str, base: torch.Tensor) -> torch.Tensor | LowRankDelta | None:
        """Low-rank for LoRA-targeted weights, dense for saved modules of the base, None elsewhere."""
        if canonical in self.factors:
            a_key, b_key, scale, transposed = self.factors[canonical]
            return LowRankDelta(self.checkpoint.get_tensor(a_key), self.checkpoint.get_tensor(b_key), scale, transposed)
        if canonical in self.saved:
            return self.get_tensor(canonical).to(dtype=base.dtype, device=base.device) - base
        return None


def combined_factors(merger, rank: int | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Per LoRA-targeted weight, factors (A `(R, in)`, B `(out, R)`) with B @ A = sum_i c_i s_i B_i A_i exactly.

    A = [A_1; ...; A_K] stacked on the rank axis, B = [c_1 s_1 B_1, ..., c_K s_K B_K] side by side (R = sum r_i,
    scaling 1; no cross terms B_i A_j). With `rank`, each product is cut to its best rank-`rank` approximation
    (SVD of the small core, never of the dense matrix) and the relative Frobenius error is reported.

    Returns:
        `(factors, report)`, `report[weight] = {"rank": R, "relative_error": e}`.

    Raises:
        `ValueError`: No coefficients (nothing learned yet, or a data-free method other than a weighted sum), a
            merged tensor has a dense task vector (not all sources LoRA), or `rank` is not positive.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank!r}: the compressed adapter's rank must be a positive integer (or None).")
    if merger.coefficients is None:
        raise ValueError(
            f"A combined adapter is sum_i c_i s_i B_i A_i with learned coefficients c; this merge "
            f"({merger.config.method!r}) has none. Call `fit(examples)` with a learned method first, or save the "
            "dense merge with `save_pretrained`."
        )
    plan, fm = merger.plan, merger.functional
    c = merger.coefficients.values.to(fm.device)  # (S, G)
    factors, report = {}, {}
    for name in plan.merged:
        parts = fm.deltas[name].parts
        if all(p is None for p in parts):
            continue
        dense = [t for t, p in zip(plan.tasks, parts) if p is not None and not isinstance(p, LowRankDelta)]
        if dense:
            raise ValueError(
                f"{name!r} has dense task vectors (sources {dense}: full fine-tunes or saved modules), which a LoRA "
                "adapter cannot hold exactly. Save the dense merge with `save_pretrained` instead."
            )
        g = plan.group_index[name]
        A = torch.cat([p.A for p in parts if p is not None])  # (R, in)
        B = torch.cat([c[i, g] * p.scale * p.B for i, p in enumerate(parts) if p is not None], dim=1)  # (out, R)
        error = 0.0
        if rank is not None and rank < A.shape[0]:
            q_b, r_b = torch.linalg.qr(B.double())  # (out, R), (R, R)
            q_a, r_a = torch.linalg.qr(A.double().T)  # (in, R), (R, R)
            u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core (R, R)
            error = float(s[rank:].norm() / s.norm().clamp(min=1e-30))
            B = (q_b @ u[:, :rank] * s[:rank]).to(B.dtype)  # (out, rank)
            A = (vh[:rank] @ q_a.T).to(A.dtype)  # (rank, in)
        factors[name] = (A, B)
        report[name] = {"rank": A.shape[0], "relative_error": error}
    return factors, report


def save_combined_adapter(merger, save_directory: str | Path, *, rank: int | None = None, overwrite: bool = False) -> Path:
    """Write the merge's LoRA part as one PEFT adapter of the base model (PEFT's own save format).

    `PeftModel.from_pretrained(AutoModel.from_pretrained(base), save_directory)` then equals the dense merge.
    Heads are not part of it (they stay per task in the dense merge's `heads/`).
    """
    from peft import LoraConfig, get_peft_model

    from .outputs import atomic_output_dir

    factors, report = combined_factors(merger, rank)
    plan = merger.plan
    modules = {plan.base.param_names[n].removesuffix(".weight"): f for n, f in factors.items()}
    ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    fan_in_fan_out = any(bool(s.adapter_config.get("fan_in_fan_out")) for s in plan.sources if isinstance(s, LoraSpec))
    config = LoraConfig(
        r=default, lora_alpha=default, target_modules=sorted(modules), fan_in_fan_out=fan_in_fan_out,
        rank_pattern={m: r for m, r in ranks.items() if r != default},
        alpha_pattern={m: r for m, r in ranks.items() if r != default},  # scaling alpha / r = 1 everywhere
        base_model_name_or_path=merger.config.base, init_lora_weights=False,
    )
    model = get_peft_model(plan.base.cls.from_pretrained(plan.base.folder, dtype=merger.dtype), config)
    with torch.no_grad():
        for module, (A, B) in modules.items():
            layer = model.base_model.model.get_submodule(module)
            if "default" in layer.lora_embedding_A:  # Embedding layers keep bare parameters
                layer.lora_embedding_A["default"].copy_(A)
                layer.lora_embedding_B["default"].copy_(B)
            else:
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B)
    with atomic_output_dir(save_directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        (tmp / "supermerge_adapter.json").write_text(json.dumps(
            {"tasks": plan.tasks, "rank": rank, "modules": report}, indent=1) + "\n")
    return Path(save_directory)
