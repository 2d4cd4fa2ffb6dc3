"""A saved merge of full fine-tunes as a mergekit recipe, so that `mergekit-yaml` (out of core) redoes it.

The recipe is mergekit's `task_arithmetic` with `normalize: false` and λ 1: θ = θ_p + Σ_i w_i τ_i, where w_i is
source i's coefficient of each tensor's group, given per tensor through mergekit's parameter filters. mergekit
takes the first filter that is a substring of a tensor's name (`mergekit.config.evaluate_setting`), so each filter
is a tensor's canonical name, longest first (`layers.11.` never reaches `layers.1.`), and the export checks that
every tensor of the base meets its own filter first. Data-free `task_arithmetic`, `average` and `ties` (equal
weights) export as per-source scalars.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import SuperMergeConfig
from .export import load_levels
from .hierarchy import group_result_name
from .hub import resolve
from .merger import SuperMerger
from .plan import MergePlan, saved_dtype
from .results import COEFFICIENTS_NAME, Coefficients
from .sources import AdapterSpec, canonical
from .start import PREPROCESSED

logger = logging.getLogger(__name__)

LINEAR_METHODS = ("task_arithmetic", "average")
EXPORTABLE = ("supermerge", "adamerging", *LINEAR_METHODS, "ties")
HEADER = """\
# mergekit recipe of the {method} merge saved in {folder}, written by supermerge_hf.
# Run it with: mergekit-yaml {recipe} OUTPUT_DIR
# theta = base + sum_i w_i (source_i - base), w_i per tensor (first matching filter; the last entry, filter-less,
# keeps the base for anything else mergekit reads, e.g. buffers). The output has the base's architecture
# ({architecture}): task-specific tensors (heads such as {heads}) are not part of it; each task's head stays in
# {folder}/heads/<task> (supermerge_hf.load_task_model).
"""


def mergekit_recipe(merged_dir: str | Path, *, revision: str | None = None,
                    token: str | bool | None = None) -> dict[str, Any]:
    """The mergekit recipe that redoes the merge saved in `merged_dir` (a folder written by `save_pretrained`, or
    a Hub repo id at `revision`), as a dict ready for `yaml.safe_dump`; no merge is computed (Hub sources are resolved, i.e. downloaded).

    Sources and base are referenced as the merge recorded them: Hub ids pinned to the commit that was merged,
    local folders as absolute paths (a relative one, as `save_pretrained` records them, is looked up from
    `merged_dir`, then from the current folder). mergekit computes in the merge's compute dtype and writes the
    dtype the merge was saved in.
    Every model whose config declares another architecture than the base's gets `override_architecture`, so
    mergekit writes the base's tensors only: task-specific tensors (heads) are not merged and not written; they
    stay in `merged_dir/heads/<task>`. Coefficients are per tensor, block or task, never per row or element, so
    each is one filter value.

    Raises:
        `ValueError` (nothing written) where mergekit cannot redo the merge exactly: LoRA sources (adapter-space
        merges), methods other than supermerge / adamerging (learned) and task_arithmetic / average / ties,
        preprocessed task vectors (adamerging_plus, supermerge's start ties / tsv_m), ties with unequal weights,
        whole-task trimming or the `frequency` sign, a base tensor that some source lacks or shapes otherwise.
        `FileNotFoundError` for a folder without a merge, a local source that no longer exists, or one that was not
        published.

    Example:
        ```python
        recipe = mergekit_recipe("merged")  # then: mergekit-yaml recipe.yaml out
        ```
    """
    return _build(resolve(merged_dir, revision=revision, token=token).path, token)[0]


def save_mergekit_recipe(merged_dir: str | Path, output: str | Path, *, overwrite: bool = False,
                         revision: str | None = None, token: str | bool | None = None) -> Path:
    """Write [`mergekit_recipe`] of `merged_dir` as YAML to `output`, with a comment that says how to run it and
    what happens to the heads. Raises `FileExistsError` for an existing `output` unless `overwrite`, and the
    errors of [`mergekit_recipe`], before anything is written."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{str(output)!r} already exists. Pass overwrite=True (CLI: --overwrite) to replace "
                              "it, or choose another file.")
    recipe, config, plan = _build(resolve(merged_dir, revision=revision, token=token).path, token)
    heads = sorted({n for names in plan.task_specific.values() for n in names}) or ["none"]
    header = HEADER.format(method=config.method, folder=merged_dir, recipe=output.name, heads=", ".join(heads[:4]),
                           architecture=plan.base.cls.__name__)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(header + yaml.safe_dump(recipe, sort_keys=False, width=120))
    logger.info("Wrote the mergekit recipe of %s to %s", merged_dir, output)
    return output


def _build(folder: Path, token: str | bool | None) -> tuple[dict[str, Any], SuperMergeConfig, MergePlan]:
    config = _with_local_paths(SuperMergeConfig.from_pretrained(folder), folder)
    method = config.method
    if method not in EXPORTABLE:
        raise ValueError(f"Method {method!r} of {str(folder)!r} cannot be exported to mergekit: only "
                         f"{list(EXPORTABLE)} are redone exactly (random masks and whole-tensor trimming differ). "
                         "Use the saved merge itself.")
    if config.method_kwargs.get("start") in PREPROCESSED:  # its coefficients weight merge components
        raise ValueError(f"The supermerge merge of {str(folder)!r} learned over the {config.method_kwargs['start']} "
                         "merge's components (`start`; `auto` picks tsv_m for full fine-tunes), which mergekit does not "
                         "compute. Use the saved merge itself, or learn with `method_kwargs` start: constant and "
                         "`granularity` tensor, block or task.")
    plan = SuperMerger(config, token=token).plan  # resolves the sources and reads their headers; merges nothing
    _check_plan(plan, method)
    kwargs = config.method_kwargs | config.merge_info.get("chosen", {})  # `auto` -> the value that was chosen
    shared: dict[str, Any] = {"normalize": False, "lambda": 1.0}
    if method in LINEAR_METHODS:
        rows = torch.tensor(_linear_weights(method, kwargs, len(plan.tasks)), dtype=torch.float64)[:, None]
    elif method == "ties":
        rows, shared = torch.ones(len(plan.tasks), 1, dtype=torch.float64), _ties_parameters(kwargs)
    else:
        rows = _learned_weights(folder, config, plan)  # (S, G)
    names = _tensor_names(plan)
    models = []
    for i, (source, spec) in enumerate(zip(config.sources, plan.sources)):
        reference = _reference(source.path, config.merge_info.get("source_commits", {}).get(source.task)
                               or source.revision, spec.config.architectures, plan.base.cls.__name__)
        weight = float(rows[i, 0]) if bool((rows[i] == rows[i, 0]).all()) else _filters(plan, names, rows[i])
        models.append({"model": reference, "parameters": {"weight": weight}
                       | ({"density": kwargs["density"]} if method == "ties" else {})})
    base = _reference(config.base, config.merge_info.get("base_commit") or config.base_revision,
                      plan.base.config.architectures, plan.base.cls.__name__)
    compute, out = config.compute_dtype, saved_dtype(plan, config.dtype)
    recipe = {"merge_method": "ties" if method == "ties" else "task_arithmetic", "base_model": base,
              "models": models, "parameters": shared, "dtype": str(compute).removeprefix("torch.")}
    if out != compute:
        recipe["out_dtype"] = str(out).removeprefix("torch.")
    return recipe, config, plan


def _check_plan(plan: MergePlan, method: str) -> None:
    adapters = [t for t, s in zip(plan.tasks, plan.sources) if isinstance(s, AdapterSpec)]
    if adapters:
        kinds = " and ".join(sorted({s.kind for s in plan.sources if isinstance(s, AdapterSpec)}))
        raise ValueError(f"Sources {adapters} are {kinds} adapters: this merge happened in adapter space, which a "
                         "mergekit recipe of full checkpoints does not express. Densify each adapter "
                         "(`merge_and_unload().save_pretrained(dir)`), merge those folders, then export.")
    if plan.vocabulary is not None:
        raise ValueError("This merge re-indexed the embedding rows to another vocabulary (tokenizer_source union "
                         "or a task with added tokens), which a recipe of per-tensor weights does not redo. Use the "
                         "saved merged model instead.")
    if plan.granularity in ("row", "singular"):
        what = {"row": "row of each block matrix (granularity 'row', SuperMerge's default)",
                "singular": "singular direction of each block matrix's task vectors (granularity 'singular')"}
        raise ValueError(f"This merge has one coefficient per {what[plan.granularity]}; a mergekit recipe gives one "
                         "weight per tensor. Use the saved merged model, or merge with `granularity: tensor` to export "
                         "a recipe.")
    unmerged = [plan.base.param_names[n] for n in plan.base.shapes if n not in plan.group_index]
    if unmerged:
        raise ValueError(f"The base's tensors {unmerged[:5]} are missing from, or shaped otherwise in, some source, "
                         f"so the {method} merge kept the base's values; mergekit merges every tensor of the base's "
                         "architecture and would stop on them. Use as base a checkpoint whose tensors every source "
                         "has (e.g. the bare model: `AutoModel.from_pretrained(base).save_pretrained(dir)`).")


def _linear_weights(method: str, kwargs: dict[str, Any], num_sources: int) -> list[float]:
    weights = kwargs.get("weights") or [1.0] * num_sources
    if method == "average":
        return [w / sum(weights) for w in weights]
    return [kwargs.get("lam", 1.0) * w for w in weights]


def _ties_parameters(kwargs: dict[str, Any]) -> dict[str, Any]:
    """mergekit's ties elects the sign on weighted task vectors and divides by their weights: ours only with equal
    positive weights, whose value then scales λ."""
    weights = kwargs.get("weights") or [1.0]
    problems = [f"weights {weights} (mergekit elects the sign on weighted task vectors; give equal weights)"
                if len(set(weights)) > 1 or weights[0] <= 0 else "",
                f"trim_scope={kwargs['trim_scope']!r} (mergekit trims each tensor; use 'tensor')"
                if kwargs.get("trim_scope", "tensor") != "tensor" else "",
                f"majority_sign_method={kwargs['majority_sign_method']!r} (mergekit's ties sums; use 'total')"
                if kwargs.get("majority_sign_method", "total") != "total" else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"This ties merge cannot be redone by mergekit's ties: {'; '.join(problems)}.")
    return {"normalize": True, "lambda": kwargs.get("lam", 1.0) * weights[0]}


def _learned_weights(folder: Path, config: SuperMergeConfig, plan: MergePlan) -> torch.Tensor:
    """Per task and group, the coefficient `(S, G)`; a hierarchical merge's levels composed into one: each level
    is linear in its members' task vectors, so a task's weight is the product of its coefficients on its path."""
    levels = load_levels(folder)
    if levels is None:
        if not (folder / COEFFICIENTS_NAME).is_file():
            raise FileNotFoundError(f"{str(folder)!r} holds no {COEFFICIENTS_NAME}: it is not a finished "
                                    f"{config.method} merge. Save it with `save_pretrained` after `fit`.")
        return Coefficients.load(folder / COEFFICIENTS_NAME).aligned(plan.tasks, plan.groups).double()
    units = {t: {t: torch.ones(len(plan.groups), dtype=torch.float64)} for t in plan.tasks}  # unit -> task -> (G,)
    composed: dict[str, torch.Tensor] = {}
    for level in levels:
        c = level["coefficients"].aligned(level["group"], plan.groups).double()  # (K, G)
        composed = {t: c[k] * w for k, name in enumerate(level["group"]) for t, w in units.pop(name).items()}
        units[group_result_name(level["group"])] = composed
    return torch.stack([composed[t] for t in plan.tasks])  # (S, G)


def _tensor_names(plan: MergePlan) -> dict[str, list[tuple[str, str]]]:
    """Per merged tensor, `(name in the model, canonical name)` of it and of the tensors tied to it (an LM head
    tied to the embedding is one parameter under two names; mergekit reads both)."""
    with torch.device("meta"):
        model = plan.base.cls(plan.base.config)
    names: dict[int, list[tuple[str, str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append((name, canonical(name, model.base_model_prefix)))
    return {c: pairs for pairs in names.values() for c in [pairs[0][1]] if c in plan.group_index}


def _filters(plan: MergePlan, names: dict[str, list[tuple[str, str]]], row: torch.Tensor) -> list[dict[str, Any]]:
    """mergekit filters giving each tensor its group's value, longest name first; `ValueError` if a tensor of the
    base would meet another tensor's filter first (a name that contains another tensor's whole name)."""
    owner = {c: name for name, pairs in names.items() for _, c in pairs}
    order = sorted(owner, key=lambda f: (-len(f), f))
    for name, pairs in names.items():
        for full in {n for pair in pairs for n in pair}:
            first = next(f for f in order if f in full)  # its own canonical name is in it
            if owner[first] != name:
                raise ValueError(f"Tensor {full!r} would take the coefficient of {owner[first]!r} in mergekit, "
                                 "whose filters match substrings of tensor names; this model's names cannot be "
                                 "told apart by filters.")
    entries = [{"filter": f, "value": float(row[plan.group_index[owner[f]]])} for f in order]
    return entries + [{"value": 0.0}]  # anything else mergekit reads keeps the base, as the saved merge does


def _with_local_paths(config: SuperMergeConfig, folder: Path) -> SuperMergeConfig:
    """The config with every local model folder made absolute (Hub ids unchanged)."""
    config.check_published(str(folder))
    anchors = [folder, Path.cwd()]  # `save_pretrained` writes paths relative to the merged folder
    sources = [dataclasses.replace(s, path=_local(s.path, anchors)) for s in config.sources]
    return dataclasses.replace(config, base=_local(config.base, anchors), sources=sources)


def _local(path: str, anchors: list[Path]) -> str:
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [a / given for a in anchors]
    found = next((p for p in candidates if p.is_dir()), None)
    if found is not None:
        return str(found.resolve())
    if not given.is_absolute() and not path.startswith((".", "~")) and path.count("/") <= 1:
        return path  # a Hub repo id
    raise FileNotFoundError(f"The merge's model folder {path!r} no longer exists (looked for "
                            f"{[str(p) for p in candidates]}). Put it back where the merge read it.")


def _reference(path: str, revision: str | None, architectures: list[str] | None, architecture: str) -> Any:
    """A mergekit model reference: the plain path where it can be, else `{model: {path, revision}, ...}`."""
    reference: dict[str, Any] = {"model": {"path": path} | ({"revision": revision} if revision else {})}
    if list(architectures or []) != [architecture]:
        reference["override_architecture"] = architecture
    plain = len(reference) == 1 and not revision and not any(c in path for c in "+@")  # mergekit splits on them
    return path if plain else reference
