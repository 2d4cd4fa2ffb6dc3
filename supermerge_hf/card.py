"""The model card of a merge: Hub metadata (`base_model_relation: merge`), recipe, commits, metrics, coefficients."""

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers.models.auto import modeling_auto

from .config import LOCAL, SuperMergeConfig
from .hub import ResolvedSource

from .plan import block_name
from .results import Coefficients, MergeResult

logger = logging.getLogger(__name__)

HEATMAP_NAME = "coefficients.png"
MAX_TABLE_GROUPS = 40  # above this the full table is only in coefficients.json
AUTO_MAPPINGS = {"AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                 "AutoModelForSeq2SeqLM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                 "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                 "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
                 "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES}


def _source_cell(path: str, repo_id: str | None) -> str:
    if repo_id:
        return f"[`{repo_id}`](https://huggingface.co/{repo_id})"
    return "a local folder (not published)" if path == LOCAL else f"`{path}` (local folder, relative to this one)"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Per task, its fine-tune vs the merge (`LearnResult.metrics`) as a Markdown table; the split and count of the
    examples in the second column."""
    keys = [k for k in ("loss", "accuracy", "exact_match", "entropy")
            if any(k in m["merged"] for m in metrics.values())]
    head = " | ".join(f"{k} fine-tune | {k} merged" for k in keys)
    lines = [f"| task | examples | {head} |", "|---|---|" + "---|---|" * len(keys)]
    for task, m in metrics.items():
        cells = [f"{m[side][k]:.4f}" if k in (m[side] or {}) else "-" for k in keys for side in ("finetune", "merged")]
        lines.append(f"| {task} | {m['examples']} ({m['count']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metrics_section(metrics: dict[str, Any]) -> str:
    if not metrics:
        return ""
    return ("## Metrics before and after merging\n\nEach task's own fine-tune against the merge, on the few labelled "
            "examples of that task given for learning: the `holdout` ones kept aside from learning (or, with no "
            "hold-out configured, the `train` ones it learned on), as many as the count in brackets. A check that "
            "the merge kept each task, not a test result.\n\n" + metrics_table(metrics) + "\n\n")


def heatmap_table(coefficients: Coefficients) -> tuple[list[str], torch.Tensor]:
    """Column labels and values `(S, B)` of the heatmap: groups averaged per block (`plan.block_name`); block and task
    groups (`encoder.layer.0`, `all`) map to themselves."""
    blocks: dict[str, list[int]] = {}
    for g, name in enumerate(coefficients.groups):
        blocks.setdefault(block_name(name), []).append(g)
    values = torch.stack([coefficients.values[:, idx].mean(dim=1) for idx in blocks.values()], dim=1)  # (S, B)
    return list(blocks), values


def write_heatmap(coefficients: Coefficients, path: str | Path) -> Path | None:
    """Write a sources x blocks heatmap PNG of the coefficients; `None` (and a log note) without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: savefig renders with Agg, never a GUI backend
    except ImportError:
        logger.info("matplotlib is not installed: no coefficient heatmap (pip install 'supermerge_hf[card]').")
        return None
    labels, values = heatmap_table(coefficients)
    values = values.float().numpy()  # (S, B)
    limit = 1.0 if coefficients.transform == "tanh" else max(float(abs(values).max()), 1e-8)
    fig = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2.5), 1.2 + 0.45 * len(coefficients.sources)))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(coefficients.sources)), coefficients.sources)
    if values.size <= 200:  # small enough to print each value in its cell
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7)
    per_block = ", mean per block" if len(labels) < len(coefficients.groups) else ""
    ax.set_title(f"learned coefficients c(w){per_block}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def _coefficients_section(coefficients: Coefficients, heatmap: bool) -> str:
    sources, groups, values = coefficients.sources, coefficients.groups, coefficients.values  # values: (S, G)
    lines = ["## Learned coefficients", "", f"Transform `{coefficients.transform}`; {len(sources)} sources x "
             f"{len(groups)} groups.", ""]
    if heatmap:
        lines += [f"![Learned coefficients, sources x blocks]({HEATMAP_NAME})", ""]
    lines += ["| task | mean | min | max |", "|---|---|---|---|"]
    lines += [f"| {s} | {row.mean():.4f} | {row.min():.4f} | {row.max():.4f} |" for s, row in zip(sources, values)]
    lines.append("")
    if len(groups) <= MAX_TABLE_GROUPS:
        lines += ["| group | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
        lines += [f"| `{group}` | " + " | ".join(f"{v:.4f}" for v in values[:, g].tolist()) + " |"
                  for g, group in enumerate(groups)]
        lines.append("")
    lines.append("All values (and the raw w): [`coefficients.json`](coefficients.json).")
    return "\n".join(lines) + "\n\n"


def published_path(path: str, resolved: ResolvedSource, save_directory: Path, hub: bool) -> str:
    """How a source is written into a saved merge: a Hub id as it is; a local folder relative to the output folder
    (`../base`), or, for a merge pushed to the Hub, `LOCAL` (never a path of this machine)."""
    if resolved.repo_id:
        return path
    if hub:
        return LOCAL
    relative = os.path.relpath(resolved.path.resolve(), Path(save_directory).resolve())
    return relative if relative.startswith("..") else f"./{relative}"


def published_config(result: MergeResult, save_directory: str | Path, *, hub: bool = False) -> SuperMergeConfig:
    """The config as saved with a merge: its paths made `published_path`s, the `merge_info`, and no run-time
    options (`output_dir`, `checkpoint_every`)."""
    cfg, out, info = result.config, Path(save_directory), result.merge_info()
    sources = [dataclasses.replace(s, path=published_path(s.path, r, out, hub))
               for s, r in zip(cfg.sources, result.sources)]
    if info["extends"]:
        merge, commit = info["extends"]["merge"], info["extends"]["commit"]
        resolved = ResolvedSource(Path(merge), commit, merge if commit else None)
        info["extends"] = info["extends"] | {"merge": published_path(merge, resolved, out, hub)}
    return dataclasses.replace(cfg, base=published_path(cfg.base, result.base, out, hub), sources=sources,
                               output_dir=None, checkpoint_every=0, merge_info=info)


def auto_class_name(cls: type) -> str:
    """The `transformers` Auto class that loads `cls` (e.g. `AutoModelForCausalLM` for `LlamaForCausalLM`)."""
    for auto, names in AUTO_MAPPINGS.items():
        if any(cls.__name__ in (n if isinstance(n, tuple) else (n,)) for n in names.values()):
            return auto
    return "AutoModel"


def _sources_table(cfg: SuperMergeConfig, result: MergeResult) -> str:
    entries = [("base", cfg.base, cfg.base_revision, result.base)] + [
        (s.task, s.path, s.revision, r) for s, r in zip(cfg.sources, result.sources)]
    rows = [f"| {task} | {_source_cell(path, r.repo_id)} | {revision or '-'} | {r.commit or '-'} |"
            for task, path, revision, r in entries]
    return ("## Sources\n\nThe commit is the exact revision merged (Hub repos).\n\n| task | source | revision | commit "
            "|\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n")


def _lineage(cfg: SuperMergeConfig) -> str:
    extends = cfg.merge_info.get("extends")
    if not extends:
        return ""
    how = ("learned again from its coefficients, the new task's row starting fresh" if extends["form"] == "incremental"
           else "that merge taken as one source (its task vector) beside the new fine-tune")
    where = _source_cell(extends["merge"], extends["merge"] if extends["commit"] else None)
    commit = f" at commit {extends['commit']}" if extends["commit"] else ""
    new = [t for t in cfg.tasks if t not in extends["tasks"]]
    return (f"## Lineage\n\nThis merge extends {where}{commit} (tasks {', '.join(extends['tasks'])}) with "
            f"{', '.join(new)}: {how}.\n\n")


def _start_and_heads_note(cfg: SuperMergeConfig, result: MergeResult) -> str:
    """What the coefficients weight (a TIES / TSV-M start) and whether the heads were refit, in words."""
    start, text = cfg.method_kwargs.get("start"), ""
    if start in ("ties", "tsv_m"):
        text += (f"Learning started from the {start} merge: each coefficient weights its source's {start} component "
                 f"(scaled so that c = {cfg.init_coefficient} everywhere is that merge), not its task vector. ")
    if result.heads:
        text += (f"The heads of {', '.join(f'`{t}`' for t in result.heads)} were refit on the merged body by "
                 f"distillation from each fine-tune ({cfg.method_kwargs['refit_heads']} steps). ")
    return text + "\n\n" if text else ""


def build_model_card(result: MergeResult, save_directory: str | Path, *, name: str, hub: bool = False) -> ModelCard:
    """The model card of a merge; writes its coefficient heatmap (with matplotlib) into `save_directory`. Metadata:
    the Hub sources as `base_model`, `base_model_relation: merge`, `tags: [merge, supermerge, <method>]`; body: the
    sources and their commits, what `auto` chose, metrics before and after merging, coefficients, recipe, loading.

    Args:
        result (`MergeResult`): A finished merge.
        save_directory (`str` or `Path`): The (existing) folder the card is saved into.
        name (`str`): The name to load the merge by (the final folder name, or the repo id when pushed).
        hub (`bool`): For a merge pushed to the Hub: local sources are named by task only, never by path.
    """
    cfg = published_config(result, save_directory, hub=hub)
    hub_ids = [r.repo_id for r in result.sources if r.repo_id] or None
    data = ModelCardData(base_model=hub_ids, base_model_relation="merge", library_name="transformers",
                         tags=["merge", "supermerge", cfg.method])
    coef = result.coefficients
    heatmap = coef is not None and write_heatmap(coef, Path(save_directory) / HEATMAP_NAME) is not None
    coefficients = "" if coef is None else _coefficients_section(coef, heatmap)
    chosen = "" if not result.chosen else (
        "Picked on the labelled examples: " + ", ".join(f"`{k}` = {v}" for k, v in result.chosen.items()) + ".\n\n")
    heads = [t for t, names in result.plan.task_specific.items() if names]
    heads_section = "" if not heads else (
        "\nTasks with their own head (" + ", ".join(f"`{t}`" for t in heads) + ") load as complete models with:\n\n"
        f'```python\nfrom supermerge_hf import load_task_model\n\nmodel = load_task_model("{name}", '
        f'"{heads[0]}")\n```\n')
    recipe = yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "merge_info"}, sort_keys=False)  # no token
    auto = auto_class_name(result.plan.base.cls)
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# Merge of {', '.join(cfg.tasks)}\n\n"
        f"This model merges {len(cfg.sources)} fine-tunes of {_source_cell(cfg.base, result.base.repo_id)} with "
        f"[supermerge_hf](https://arxiv.org/abs/2412.10416) (method: `{cfg.method}`, granularity: "
        f"`{cfg.granularity}`, transform: `{cfg.transform}`).\n\n" + _start_and_heads_note(cfg, result) + chosen
        + _lineage(cfg)
        + _sources_table(cfg, result)
        + _metrics_section(result.metrics) + coefficients
        + f"## Recipe\n\n```yaml\n{recipe}```\n\n## Loading\n\n```python\nfrom transformers import {auto}\n\n"
        f'model = {auto}.from_pretrained("{name}")\n```\n{heads_section}'
    )


def build_adapter_card(result: MergeResult, save_directory: str | Path, *, name: str, rank: int | None,
                       hub: bool = False, kind: str = "LoRA") -> ModelCard:
    """The card of the combined adapter (`kind` `LoRA` or `IA³`): its base as `base_model`, the merged sources, and
    how to load it."""
    cfg = published_config(result, save_directory, hub=hub)
    data = ModelCardData(base_model=result.base.repo_id, base_model_relation="adapter", library_name="peft",
                         tags=["merge", "supermerge", "lora" if kind == "LoRA" else "ia3"])
    auto = auto_class_name(result.plan.base.cls)
    if kind == "LoRA":
        size = "of the exact rank (the sum of the source ranks)" if rank is None else \
            f"compressed to rank {rank} by SVD"
        size += " (per-module errors: `supermerge_adapter.json`)"
    else:
        size = "exactly: one vector l = 1 + sum_i c_i (l_i - 1) per layer"
    return ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# {kind} adapter: merge of {', '.join(cfg.tasks)}\n\n"
        f"One PEFT {kind} adapter of {_source_cell(cfg.base, result.base.repo_id)} that equals the `{cfg.method}` "
        f"merge of {len(cfg.sources)} {kind} adapters, {size}. Heads are not part of it.\n\n"
        + _sources_table(cfg, result)
        + f"## Loading\n\n```python\nfrom peft import PeftModel\nfrom transformers import {auto}\n\n"
        f'base = {auto}.from_pretrained("{cfg.base}")\nmodel = PeftModel.from_pretrained(base, "{name}")\n```\n'
    )
