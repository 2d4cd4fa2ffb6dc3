"""A merge's heads (each task's own tensors, e.g. its classifier: `plan.task_specific`): refit on the merged body
by distillation from the task's fine-tune (SuperMerge's `refit_heads`, method.md section 9), and saved per task in
`heads/<task>/`.

Refitting runs the merged body once over the task's inputs (the labelled ones' and the unlabelled, hold-out
excepted) and caches what the head reads (the input of the one module that holds the task's own tensors) with the
fine-tune's logits (`distill.attach_teachers`); then `refit_heads` full-batch Adam steps at `refit_lr` on the head
alone minimise T² KL(teacher ‖ head(features)) at the configured `temperature`, keeping the head with the lowest
loss (the fine-tune's own, step 0, included). The body is never touched. A task without tensors of its own (a
causal LM: its output layer is shared and merged) or whose own tensors are not one module that outputs the logits
keeps its fine-tune's head, with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SuperMergeConfig
from .data import Example, Split
from .distill import attach_teachers
from .functional import EVAL_BATCH, FunctionalMerge
from .generative import answer_batch
from .objectives import TEACHER, answer_distillation, output_logits
from .plan import MergePlan
from .results import MergeResult, check_finite

logger = logging.getLogger(__name__)

HEADS_DIR = "heads"
HEAD_FILE = "head.safetensors"
Cache = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # per batch: (features, teacher logits, mask)


def head_module(model: nn.Module, names: list[str]) -> str | None:
    """The path of the one submodule whose parameters are exactly `names` (e.g. `classifier`), else `None`."""
    wanted = set(names)
    for path, module in model.named_modules():
        if path and {f"{path}.{n}" for n, _ in module.named_parameters()} == wanted:
            return path
    return None


def use_heads(fm: FunctionalMerge, heads: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Run `fm`'s tasks with `heads` (per task, its tensors by parameter name) instead of their fine-tunes'."""
    for task, head in heads.items():
        fm.heads[task] = {k: v.to(device=fm.device, dtype=fm.dtype) for k, v in head.items()}


@torch.no_grad()
def _features(fm: FunctionalMerge, task: str, path: str, merged: Mapping[str, torch.Tensor],
              examples: list[Example]) -> Cache | None:
    """The head's input, the teacher's logits and the answer mask of every batch of `examples` through the merged
    body; `None` if the model's logits are not the output of the module at `path`, called once on one input."""
    seen = []
    hook = fm.models[task].get_submodule(path).register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args, kwargs, out)), with_kwargs=True)
    cache = []
    try:
        for i in range(0, len(examples), EVAL_BATCH):
            batch, mask = answer_batch(examples[i: i + EVAL_BATCH], fm.models[task], fm.pad_id)  # mask (B, T)
            teacher = batch.pop(TEACHER)  # (B, C) or (B, A, V): the answer positions'
            seen.clear()
            logits = output_logits(fm.forward(task, merged, batch))
            if len(seen) != 1 or len(seen[0][0]) != 1 or seen[0][1] or seen[0][2] is not logits:
                return None
            cache.append((seen[0][0][0].float(), teacher.to(logits.device), mask))
    finally:
        hook.remove()
    return cache


def _refit(module: nn.Module, path: str, head: Mapping[str, torch.Tensor], cache: Cache, *, steps: int, lr: float,
           temperature: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """`(the best head, its loss at step 0, the best loss)`: Adam on the head's tensors (float32) over `cache`."""
    n = sum(len(features) for features, _, _ in cache)
    params = {k.removeprefix(path + "."): v.detach().float().clone().requires_grad_() for k, v in head.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    losses, best = [], None
    for step in range(steps + 1):  # step s scores the head of s steps; the last one is only scored
        optimizer.zero_grad()
        loss = 0.0
        for features, teacher, mask in cache:
            logits = torch.func.functional_call(module, params, (features,))  # (B, C) or (B, T, V)
            part = answer_distillation(logits, teacher, temperature, mask) * (len(features) / n)
            part.backward()
            loss += float(part.detach())
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, {f"{path}.{k}": v.detach().clone() for k, v in params.items()})
        if step < steps:
            optimizer.step()
    return best[1], losses[0], best[0]


def refit_heads(plan: MergePlan, config: SuperMergeConfig, merged: Mapping[str, torch.Tensor],
                splits: Mapping[str, Split], metrics: Mapping[str, dict], *, device: torch.device | str = "cpu",
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """Refit each task's head on the merged body `merged` from its fine-tune's logits on `splits[task].unlabelled`
    (`method_kwargs`: `refit_heads` steps, `refit_lr`, `temperature`).

    Returns `(heads, metrics)`: per refit task its head (its tensors by parameter name, in the fine-tune's dtype, on
    the CPU), and `metrics` (`LearnResult.metrics`) with each refit task's `merged` evaluated again with it."""
    kwargs, dtype = config.method_kwargs, config.compute_dtype
    for task in [t for t in plan.tasks if not plan.task_specific[t]]:
        logger.info("refit_heads: task %r has no head of its own (its output layer is merged, e.g. a causal LM's "
                    "lm_head): nothing to refit.", task)
    todo = [t for t in plan.tasks if plan.task_specific[t]]
    if not todo:
        return {}, dict(metrics)
    inputs = {t: splits[t].unlabelled for t in todo}
    attach_teachers(plan, inputs, dtype=dtype, device=device)
    fm = FunctionalMerge(plan, dtype=dtype, device=device, streaming=True)  # task vectors stay on disk
    body = {n: t.to(device=device, dtype=dtype) for n, t in merged.items()}
    heads, metrics = {}, dict(metrics)
    for task in todo:
        source, names = plan.task_specs[task], plan.task_specific[task]
        path = head_module(fm.models[task], [source.param_names[n] for n in names])
        cache = None if path is None or not inputs[task] else _features(fm, task, path, body, inputs[task])
        if not cache:
            logger.info("refit_heads: task %r keeps its fine-tune's head: its own tensors %s are not one module whose "
                        "output is the model's logits, or it has no inputs.", task, names)
            continue
        head, before, after = _refit(fm.models[task].get_submodule(path), path, fm.heads[task], cache,
                                     steps=kwargs["refit_heads"], lr=kwargs["refit_lr"],
                                     temperature=kwargs["temperature"])
        logger.info("refit_heads: task %r, %d steps on %d inputs: distillation loss %.4f -> %.4f", task,
                    kwargs["refit_heads"], len(inputs[task]), before, after)
        dtypes = {source.param_names[n]: source.read_tensor(n).dtype for n in names}
        heads[task] = {k: v.to(dtypes[k]).cpu() for k, v in head.items()}
        use_heads(fm, {task: heads[task]})
        if "merged" in metrics.get(task, {}):
            examples = splits[task].holdout or splits[task].train
            metrics[task] = metrics[task] | {"merged": fm.evaluate(task, examples, params=body)}
    return heads, metrics


def save_heads(result: MergeResult, folder: Path) -> None:
    """Write `heads/<task>/` into `folder` for every task with tensors of its own: its config and those tensors
    (`HEAD_FILE`), the refit ones where `result.heads` holds them."""
    plan = result.plan
    for task, source in plan.task_specs.items():
        names = plan.task_specific[task]
        if not names:
            continue
        head_dir = folder / HEADS_DIR / task
        head_dir.mkdir(parents=True)
        source.config.save_pretrained(head_dir)
        tensors = result.heads.get(task) or {source.param_names[n]: source.read_tensor(n) for n in names}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        check_finite(tensors, f"The head of task {task!r}")
        save_file(tensors, head_dir / HEAD_FILE, metadata={"format": "pt"})


def load_heads(folder: Path, plan: MergePlan, config: SuperMergeConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The refit heads a merge saved in `folder`, per task; `{}` unless its config has `refit_heads`."""
    if not config.method_kwargs.get("refit_heads"):
        return {}
    return {t: load_file(folder / HEADS_DIR / t / HEAD_FILE) for t in plan.tasks if plan.task_specific[t]}
