"""Writing a merge: the standard checkpoint folder (atomically), a task's complete model, the combined adapter."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel

from .card import build_adapter_card, build_model_card, published_config
from .checkpoint import atomic_output_dir, copy_tokenizer
from .config import SuperMergeConfig, locate
from .heads import HEAD_FILE, HEADS_DIR, load_heads, save_heads
from .hierarchy import rebuild
from .hub import resolve
from .ia3_export import check_ia3_export, has_ia3, save_ia3_adapter
from .learning import merge_with
from .methods import MergeMethod
from .plan import MergePlan, saved_dtype
from .results import COEFFICIENTS_NAME, Coefficients, MergeResult, check_finite
from .lora import LoraSpec
from .sources import ModelSpec, model_class
from .start import preprocesses
from .vocab import UNION, has_tokenizer

logger = logging.getLogger(__name__)

HIERARCHY_NAME = "hierarchy.json"
EXAMPLES_DIR = "examples"


def save_merge(result: MergeResult, save_directory: str | Path, *, overwrite: bool = False,
               repo_id: str | None = None) -> Path:
    """Write a merge as a standard checkpoint folder, built in a temporary folder moved into place at the end:
    the merged model (in the config's dtype), the base's tokenizer, `supermerge_config.json` (with what was
    resolved and chosen), `coefficients.json`, `hierarchy.json` (every level's), `README.md` (the card) and
    `heads/<task>/` (the task's config and own tensors, refit with `refit_heads`: `load_task_model`). Local source
    paths are written relative to the output, or not at all when it is for the Hub repo `repo_id`. Raises
    `FileExistsError` for a folder with files unless `overwrite`, and `FloatingPointError` (nothing written) for
    non-finite weights."""
    check_finite(result.merged, "The merge")
    plan, config = result.plan, result.config
    with atomic_output_dir(save_directory, overwrite=overwrite) as tmp:
        plan.base.build(result.merged, saved_dtype(plan, config.dtype)).save_pretrained(
            tmp, max_shard_size=config.max_shard_size)
        write_tokenizer(plan, config, tmp)
        save_heads(result, tmp)
        published_config(result, save_directory, hub=repo_id is not None).save_pretrained(tmp)
        if result.coefficients is not None:
            result.coefficients.save(tmp / COEFFICIENTS_NAME)
        if result.examples and repo_id:
            logger.info("save_examples: the examples are kept in local saves only, never pushed to the Hub.")
        for task, examples in ({} if repo_id else result.examples or {}).items():  # opt-in: `save_examples`
            (tmp / EXAMPLES_DIR).mkdir(exist_ok=True)
            (tmp / EXAMPLES_DIR / f"{task}.jsonl").write_text("".join(
                json.dumps({k: v.tolist() if hasattr(v, "tolist") else v for k, v in ex.items()}) + "\n"
                for ex in examples))
        if result.levels:
            levels = [level | {"coefficients": level["coefficients"].to_dict()} for level in result.levels]
            (tmp / HIERARCHY_NAME).write_text(json.dumps(levels, indent=1, allow_nan=False) + "\n")
        card = build_model_card(result, tmp, name=repo_id or Path(save_directory).name, hub=repo_id is not None)
        card.save(tmp / "README.md")
    logger.info("Saved the merge to %s", save_directory)
    return Path(save_directory)


CHAT_TEMPLATES = {  # by name, as `chat_template` in a recipe
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}",
}


def tokenizer_folder(plan: MergePlan, source: str) -> Path:
    """The folder whose tokenizer and generation config a merge takes: the base's (for `union` too), or task
    `source`'s."""
    return plan.task_specs[source].folder if source in plan.task_specs else plan.base.folder


def read_chat_template(plan: MergePlan, value: str) -> str:
    """`chat_template` of a config as Jinja text: a built-in name (`CHAT_TEMPLATES`), `base` or a task (that
    model's own template), a `.jinja` file, or the template itself. `ValueError` (before any work) otherwise."""
    from transformers import AutoTokenizer

    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value == "base" or value in plan.task_specs:
        template = AutoTokenizer.from_pretrained(tokenizer_folder(plan, value)).chat_template
        if not isinstance(template, str):
            raise ValueError(f"chat_template={value!r}: that model's tokenizer has no (single) chat template. Name "
                             f"another source, a built-in ({sorted(CHAT_TEMPLATES)}) or a .jinja file.")
        return template
    if Path(value).is_file():
        return Path(value).read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template={value!r} is neither a built-in ({sorted(CHAT_TEMPLATES)}), `base`, a task "
                     f"({sorted(plan.task_specs)}), an existing .jinja file nor a Jinja template.")


def check_tokenizer(plan: MergePlan, config: SuperMergeConfig) -> None:
    """`ValueError`, before any work, for a task's `tokenizer_source` without a tokenizer or with more tokens than
    the merged embedding has rows (`build_plan(..., tokenizer_source=...)` checks the vocabulary), and for a
    `chat_template` that cannot be read."""
    from transformers import AutoTokenizer

    if config.tokenizer_source in plan.task_specs:
        folder = tokenizer_folder(plan, config.tokenizer_source)
        if not has_tokenizer(folder):
            raise ValueError(f"tokenizer_source={config.tokenizer_source!r}: {folder} has no tokenizer files. Save "
                             "the tokenizer beside that fine-tune, or use tokenizer_source: base.")
        tokens, rows = len(AutoTokenizer.from_pretrained(folder)), plan.base.config.get_text_config().vocab_size
        if tokens > rows:
            raise ValueError(f"tokenizer_source={config.tokenizer_source!r} has {tokens} tokens but the merged "
                             f"embedding has {rows} rows: its added tokens would have no embedding.")
    if config.chat_template is not None:
        read_chat_template(plan, config.chat_template)


def write_tokenizer(plan: MergePlan, config: SuperMergeConfig, folder: Path) -> None:
    """The tokenizer and generation config of `config.tokenizer_source` into `folder`, with `config.chat_template`."""
    source = tokenizer_folder(plan, config.tokenizer_source)
    if config.tokenizer_source == UNION and plan.vocabulary is not None:
        plan.vocabulary.tokenizer.save_pretrained(folder)  # the base's tokenizer plus the sources' added tokens
    else:
        copy_tokenizer(source, folder)
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", folder / "generation_config.json")
    if config.chat_template is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = read_chat_template(plan, config.chat_template)
        tokenizer.save_pretrained(folder)


def load_examples(folder: Path) -> dict[str, list[dict]]:
    """The labelled examples a merge kept (`save_examples`), per task; empty when it kept none."""
    files = sorted((folder / EXAMPLES_DIR).glob("*.jsonl"))
    return {f.stem: [json.loads(line) for line in f.read_text().splitlines() if line] for f in files}


def load_levels(folder: Path) -> list[dict] | None:
    """Every level of a hierarchical merge saved in `folder` (`hierarchy.json`), or `None` for a flat one."""
    if not (folder / HIERARCHY_NAME).is_file():
        return None
    levels = json.loads((folder / HIERARCHY_NAME).read_text())
    return [level | {"coefficients": Coefficients.from_dict(level["coefficients"])} for level in levels]


def load_result(folder: Path, info: dict[str, Any], method: MergeMethod, **resolved: Any) -> MergeResult | None:
    """The merge that `folder` (written by `save_merge`, its `merge_info` = `info`) holds, rebuilt from its sources
    (`resolved`: config, plan, base, sources): from every level's coefficients (hierarchical) or its coefficient
    table; for a statistics merge (RegMean), whose inputs it does not keep, the saved weights; `None` for a data-free
    merge (recomputed by `fit` with the saved `auto` choices). Refit heads (`refit_heads`) are the saved ones."""
    plan, config, extends = resolved["plan"], resolved["config"], info.get("extends")
    heads = load_heads(folder, plan, config)
    if extends:  # the merge it extends, saved relative to this one
        extends = extends | {"merge": locate(extends["merge"], folder)}
    if levels := load_levels(folder):
        merged = {n: t.cpu() for n, t in rebuild(plan, config, method, levels).items()}
        return MergeResult(**resolved, merged=merged, coefficients=levels[-1]["coefficients"],
                           selected_step=info.get("selected_step"), levels=levels, extends=extends, heads=heads)
    if method.kind == "statistics":
        saved = ModelSpec.from_folder(folder)
        return MergeResult(**resolved, merged={n: saved.read_tensor(n).to(config.compute_dtype) for n in plan.merged})
    if not (folder / COEFFICIENTS_NAME).is_file():
        return None
    table, merged = merge_with(plan, config, method, Coefficients.load(folder / COEFFICIENTS_NAME))
    return MergeResult(**resolved, merged=merged, coefficients=table, selected_step=info.get("selected_step"),
                       extends=extends, heads=heads)


def load_task_model(merged_dir: str | Path, task: str, *, revision: str | None = None,
                    token: str | bool | None = None, **kwargs) -> PreTrainedModel:
    """Load one task's complete model from a merge (a folder, or a Hub repo id at `revision`): the merged body
    plus the task's own head; `kwargs` go to `from_pretrained` (e.g. `dtype`). `FileNotFoundError` if the task
    has no head (then the merged model itself is complete).

    Example:
        ```python
        model = load_task_model("merged", "bbc")  # a BertForSequenceClassification with bbc's classifier
        ```
    """
    folder = resolve(merged_dir, revision=revision, token=token).path
    head_dir = folder / HEADS_DIR / task
    if not (head_dir / HEAD_FILE).is_file():
        known = sorted(p.name for p in (folder / HEADS_DIR).iterdir()) if (folder / HEADS_DIR).is_dir() else []
        raise FileNotFoundError(f"No head for task {task!r} in {str(merged_dir)!r} (tasks with heads: {known}). "
                                "Without a head the merged model is complete: load it with AutoModel*.from_pretrained.")
    config = AutoConfig.from_pretrained(head_dir)
    head = load_file(head_dir / HEAD_FILE)
    model = model_class(config).from_pretrained(folder, config=config, **kwargs)
    with torch.no_grad():
        for name, tensor in head.items():
            param = model.get_parameter(name)
            param.copy_(tensor.to(param.dtype))
    return model.eval()


def check_adapter_export(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod) -> None:
    """`ValueError`, before any work, where a combined adapter would not equal the merge exactly (IA³: `ia3_export`)."""
    if has_ia3(plan):
        return check_ia3_export(plan, config, method)
    full = [t for t, s in zip(plan.tasks, plan.sources) if not isinstance(s, LoraSpec)]
    reason = (f"sources {full} are full fine-tunes, whose task vectors no adapter holds exactly" if full else
              f"{method.name!r} learns no coefficients" if method.kind != "learned" else
              f"{method.name!r} learns over preprocessed task vectors" if preprocesses(method, config) else
              "a hierarchical merge's group results are dense" if config.hierarchical else
              "the merged vocabulary is not the base's" if plan.vocabulary is not None else None)
    if reason:
        raise ValueError(f"A combined LoRA adapter is sum_i c_i s_i B_i A_i of LoRA sources with learned "
                         f"coefficients; here {reason}. Save the dense merge with `save_pretrained` instead.")


def combined_factors(plan: MergePlan, coefficients: Coefficients, rank: int | None = None):
    """Per LoRA weight, `(A (R, in), B (out, R))` with B @ A = sum_i c_i s_i B_i A_i exactly: A = [A_1; ...; A_K],
    B = [c_1 s_1 B_1, ..., c_K s_K B_K], R = sum r_i, scaling 1, no cross terms (per row: diag(c_i) B_i; per singular
    direction: U_i diag(c_i S_i) and V_i^T). With `rank`, each product is cut to its best rank-`rank` approximation
    (SVD of the small core). Returns `(factors, report)` with `report[weight] = {"rank", "relative_error"}`."""
    if rank is not None and rank < 1:
        raise ValueError(f"rank={rank!r}: the compressed adapter's rank must be a positive integer (or None).")
    c = coefficients.aligned(plan.source_names, plan.groups)  # (S, G)
    factors, report = {}, {}
    for name in plan.merged:
        dense = [t for t, s in zip(plan.tasks, plan.sources) if name in s.saved]
        if dense:
            raise ValueError(f"{name!r} has dense task vectors (saved modules of {dense}), which a LoRA adapter "
                             "cannot hold exactly. Save the dense merge with `save_pretrained` instead.")
        parts = [(i, s.delta(name, None)) for i, s in enumerate(plan.sources) if name in s.factors]
        if not parts:
            continue
        g = plan.group_index[name]  # per row (a slice): c_i scales B_i's rows, or A_i's columns when transposed
        rows = [c[i, g].view(-1, 1) if isinstance(g, slice) else c[i, g] for i, _ in parts]  # (out, 1) or ()
        if plan.directions(name):  # s_i B_i A_i = U_i S_i V_i^T: A_i = V_i^T, B_i = U_i diag(c_i S_i), scale 1
            parts, rows = [(i, p.singular(c[i, g])) for i, p in parts], [torch.ones(())] * len(parts)
        A = torch.cat([p.A * r.T if p.transpose and r.dim() else p.A for r, (_, p) in zip(rows, parts)])  # (R, in)
        B = torch.cat([(1 if p.transpose and r.dim() else r) * p.scale * p.B for r, (_, p) in zip(rows, parts)],
                      dim=1)  # (out, R)
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


def save_combined_adapter(result: MergeResult, save_directory: str | Path, *, rank: int | None = None,
                          overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write the merge's LoRA part as one PEFT adapter of the base (PEFT's own format, written atomically):
    `PeftModel.from_pretrained(AutoModel.from_pretrained(base), save_directory)` equals the dense merge. Heads
    are not part of it (they stay per task in the dense merge's `heads/`). IA³ sources: `ia3_export`."""
    from peft import LoraConfig, get_peft_model

    plan = result.plan
    if has_ia3(plan):
        return save_ia3_adapter(result, save_directory, rank=rank, overwrite=overwrite, repo_id=repo_id)
    factors, report = combined_factors(plan, result.coefficients, rank)
    modules = {plan.base.param_names[n].removesuffix(".weight"): f for n, f in factors.items()}
    ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    fan_in_fan_out = any(bool(s.adapter_config.get("fan_in_fan_out")) for s in plan.sources)
    config = LoraConfig(r=default, lora_alpha=default, target_modules=sorted(modules), fan_in_fan_out=fan_in_fan_out,
                        rank_pattern={m: r for m, r in ranks.items() if r != default},
                        alpha_pattern={m: r for m, r in ranks.items() if r != default},  # scaling alpha / r = 1
                        init_lora_weights=False)
    model = get_peft_model(plan.base.build({}, saved_dtype(plan, result.config.dtype)), config)
    base = published_config(result, save_directory, hub=repo_id is not None).base
    model.peft_config["default"].base_model_name_or_path = base  # get_peft_model sets this machine's path
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
        build_adapter_card(result, tmp, name=repo_id or Path(save_directory).name, rank=rank,
                           hub=repo_id is not None).save(tmp / "README.md")
        (tmp / "supermerge_adapter.json").write_text(json.dumps(
            {"tasks": plan.tasks, "rank": rank, "modules": report}, indent=1) + "\n")
    return Path(save_directory)
