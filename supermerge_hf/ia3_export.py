"""The merge of IA³ sources as one PEFT IA³ adapter of the base (method.md section 8): per layer the vector
l = 1 + sum_i c_i (l_i - 1), which PEFT applies as diag(l) W (bias l * b) or W diag(l): exactly the dense merge.
`export.check_adapter_export` and `export.save_combined_adapter` hand merges with IA³ sources to this module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from .card import build_adapter_card, published_config
from .checkpoint import atomic_output_dir
from .config import SuperMergeConfig
from .ia3 import IA3Spec
from .methods import MergeMethod
from .plan import MergePlan, saved_dtype
from .results import Coefficients, MergeResult
from .sources import AdapterSpec, IncompatibleSourceError
from .start import preprocesses

WHAT = "A combined IA³ adapter holds l = 1 + sum_i c_i (l_i - 1) of IA³ sources with learned coefficients"
DENSE = "Save the dense merge with `save_pretrained` instead: it holds any mix of sources exactly."


def has_ia3(plan: MergePlan) -> bool:
    return any(isinstance(s, IA3Spec) for s in plan.sources)


def ia3_layers(plan: MergePlan) -> dict[str, bool]:
    """Each merged weight that IA³ sources scale, and whether they scale its input (feed-forward type);
    `IncompatibleSourceError` for a layer scaled on its input by some sources and on its output by others."""
    sides: dict[str, dict[bool, list[str]]] = {}
    for task, source in zip(plan.tasks, plan.sources):
        for name, (_, _, on_input) in getattr(source, "vectors", {}).items():
            if name not in source.follows and name in plan.group_index:
                sides.setdefault(name, {}).setdefault(on_input, []).append(task)
    mixed = {n: s for n, s in sides.items() if len(s) > 1}
    if mixed:
        name, by_side = next(iter(mixed.items()))
        raise IncompatibleSourceError(f"{WHAT}; but {len(mixed)} layer(s) are scaled on the input (feed-forward type) "
                                      f"by some sources and on the output by others, e.g. {name!r}: input by "
                                      f"{by_side[True]}, output by {by_side[False]}. One IA³ adapter has one type per "
                                      f"layer. {DENSE}")
    return {n: next(iter(s)) for n, s in sides.items()}


def check_ia3_export(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod) -> None:
    """`IncompatibleSourceError` (sources of another kind, layers scaled on both sides) or `ValueError` (a merge that
    is not l = 1 + sum_i c_i (l_i - 1)), before any work, where one IA³ adapter would not equal the merge."""
    other = {t: s.kind + " adapter" if isinstance(s, AdapterSpec) else "full fine-tune"
             for t, s in zip(plan.tasks, plan.sources) if not isinstance(s, IA3Spec)}
    if other:
        raise IncompatibleSourceError(f"{WHAT}; here sources {other} are not IA³ adapters: their task vectors are "
                                      f"not scalings of the base. {DENSE}")
    reason = (f"{method.name!r} learns no coefficients" if method.kind != "learned" else
              f"{method.name!r} learns over preprocessed task vectors" if preprocesses(method, config) else
              "a hierarchical merge's group results are dense" if config.hierarchical else
              "the merged vocabulary is not the base's" if plan.vocabulary is not None else None)
    if reason:
        raise ValueError(f"{WHAT}; here {reason}. {DENSE}")
    dense = {t: [n for n in s.saved if n in plan.group_index] for t, s in zip(plan.tasks, plan.sources)}
    dense = {t: names for t, names in dense.items() if names}
    if dense:
        raise ValueError(f"{WHAT}; here merged tensors have dense task vectors (saved modules, `modules_to_save`): "
                         f"{dense}. {DENSE}")
    ia3_layers(plan)


def merged_vectors(plan: MergePlan, coefficients: Coefficients) -> dict[str, torch.Tensor]:
    """Per IA³-scaled weight, l = 1 + sum_i c_i (l_i - 1) `(n,)` float32 over the sources that scale it (a scaled
    bias shares its weight's group, `plan.build_plan`, so the same l scales it)."""
    c = coefficients.aligned(plan.source_names, plan.groups)  # (S, G)
    merged = {}
    for name in ia3_layers(plan):
        g = plan.group_index[name]
        merged[name] = 1 + sum(c[i, g] * (s.read_vector(name) - 1)  # (n,)
                               for i, s in enumerate(plan.sources) if name in s.vectors)
    return merged


def save_ia3_adapter(result: MergeResult, save_directory: str | Path, *, rank: int | None = None,
                     overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write the merge as one PEFT IA³ adapter of the base (PEFT's own format, written atomically):
    `PeftModel.from_pretrained(AutoModel.from_pretrained(base), save_directory)` equals the dense merge. Heads are
    not part of it (they stay per task in the dense merge's `heads/`). `ValueError` for a `rank` (LoRA's)."""
    from peft import IA3Config, get_peft_model

    if rank is not None:
        raise ValueError(f"rank={rank!r} compresses a combined LoRA adapter; a combined IA³ adapter is exact and has "
                         "no rank. Leave `rank` (`--adapter-rank`) unset.")
    plan = result.plan
    vectors, sides = merged_vectors(plan, result.coefficients), ia3_layers(plan)
    modules = {plan.base.param_names[n].removesuffix(".weight"): n for n in vectors}
    model = plan.base.build({}, saved_dtype(plan, result.config.dtype))
    config = IA3Config(target_modules=sorted(modules), feedforward_modules=sorted(m for m, n in modules.items()
                                                                                  if sides[n]),
                       fan_in_fan_out=any(isinstance(model.get_submodule(m), Conv1D) for m in modules))
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = published_config(result, save_directory,
                                                                            hub=repo_id is not None).base
    with torch.no_grad():
        for module, name in modules.items():
            vector = model.base_model.model.get_submodule(module).ia3_l["default"]  # (1, in) or (out, 1)
            vector.copy_(vectors[name].view_as(vector))
    with atomic_output_dir(save_directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        build_adapter_card(result, tmp, name=repo_id or Path(save_directory).name, rank=None, kind="IA³",
                           hub=repo_id is not None).save(tmp / "README.md")
        (tmp / "supermerge_adapter.json").write_text(json.dumps(
            {"tasks": plan.tasks, "peft_type": "IA3", "modules": {n: {"feedforward": sides[n]} for n in vectors}},
            indent=1) + "\n")
    return Path(save_directory)
