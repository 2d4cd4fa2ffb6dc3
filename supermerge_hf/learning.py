"""Learning the coefficients: Adam on w through Accelerate, the exact cheap gradient, hold-out selection."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .coefficients import CoefficientModule, transform
from .data_free import LAMBDA_GRID, ties_trimmed
from .examples import BatchSampler, Example, split_holdout
from .memory import release_memory
from .objectives import FunctionalMerge

if TYPE_CHECKING:
    from .merger import SuperMerger

logger = logging.getLogger(__name__)


def learn(merger: SuperMerger, data: dict[str, list[Example]], objective: str) -> None:
    """Learn the coefficients of `merger` on examples with Adam through Accelerate; keep the best step."""
    cfg, plan = merger.config, merger.plan
    acc = merger.accelerator or Accelerator(cpu=not torch.cuda.is_available())
    merger.accelerator = acc
    if cfg.batch_size % acc.num_processes:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by the {acc.num_processes} processes: each "
            "process must get an equal share of every global batch."
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    tasks = plan.tasks
    splits = {t: split_holdout(data[t], cfg.holdout_fraction, generator) for t in tasks}
    trim = ties_trimmed if merger.method.name == "adamerging_plus" else None
    merger._functional = None  # an earlier one (or a finished hierarchical group) goes back to the OS first
    release_memory()
    fm = merger._functional = FunctionalMerge(plan, dtype=merger.dtype, device=acc.device, delta_transform=trim,
                                            streaming=cfg.streaming)
    scale = loss_scale(merger, fm, {t: s[0] for t, s in splits.items()})
    kind = merger._kind
    from_task_arithmetic = cfg.init_from_task_arithmetic and objective == "supervised"  # AdaMerging starts at 0.3
    init = task_arithmetic_init(merger, fm, splits) if from_task_arithmetic else cfg.init_coefficient

    module = CoefficientModule(plan.num_sources, len(plan.groups), init=init, kind=kind)
    w0 = module.w.detach().clone().to(acc.device)
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.learning_rate)
    module, optimizer = acc.prepare(module, optimizer)
    raw = acc.unwrap_model(module)
    samplers = {t: BatchSampler(len(splits[t][0]), cfg.batch_size, generator) for t in tasks}
    share, rank = cfg.batch_size // acc.num_processes, acc.process_index
    has_holdout = all(splits[t][1] for t in tasks)
    metric = "entropy" if objective == "entropy" else "loss"

    def record(step: int, train: dict[str, float] | None) -> float | None:
        holdout = None
        if has_holdout:
            merged = fm.merged_params(raw().detach())
            holdout = {t: fm.evaluate(merged, t, splits[t][1])[metric] for t in tasks}
        score = sum(scale[t] * v for t, v in holdout.items()) if holdout else None
        merger.history.append({"step": step, "train": train, "holdout": holdout, "score": score})
        logger.info("step %d: train %s %s, hold-out %s", step, metric, train, holdout)
        return score

    best_score = record(0, None)
    _check_finite(merger.history[-1]["holdout"] or {}, 0)
    best_w, best_step = raw.w.detach().clone(), 0
    bar = tqdm(range(1, cfg.steps + 1), desc=f"Learning {merger.method.name} coefficients",
               disable=not acc.is_local_main_process)
    for step in bar:
        c = module()  # (S, G), through DDP so that the gradient of w is averaged over processes
        batches = {}
        for t in tasks:
            batch = [splits[t][0][i] for i in samplers[t].next()]
            batches[t] = batch[rank * share : (rank + 1) * share] or batch
        grad_c, losses = fm.coefficient_grad(c, batches, scale, objective)
        _check_finite({t: float(v) for t, v in losses.items()}, step)
        surrogate = (c * grad_c.to(c.dtype)).sum()  # d/dw = c'(w) * dL/dc: the exact chain rule
        if cfg.l2_to_init:
            surrogate = surrogate + cfg.l2_to_init * ((raw.w - w0) ** 2).sum()
        optimizer.zero_grad()
        acc.backward(surrogate)
        optimizer.step()
        if objective == "entropy":  # AdaMerging keeps its coefficients in [0, 1]
            with torch.no_grad():
                raw.w.clamp_(0.0, 1.0)
        train = {t: float(acc.reduce(v, reduction="mean")) for t, v in losses.items()}
        bar.set_postfix({metric: f"{sum(train.values()):.4f}"})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            score = record(step, train)
            if score is not None and score < best_score:
                best_score, best_w, best_step = score, raw.w.detach().clone(), step
    final_w = raw.w.detach().clone()
    if not has_holdout:
        best_w, best_step = final_w, cfg.steps
    merger.selected_step = best_step
    merger.final_coefficients = merger._table(final_w)
    logger.info("Selected step %d of %d (hold-out score %s)", best_step, cfg.steps, best_score)
    examples = {t: s[1] or s[0] for t, s in splits.items()}
    finetunes = finetune_metrics(merger, fm, examples)  # before the final merge: one merged copy at a time
    merger.apply_coefficients(transform(best_w, kind), raw=best_w)
    merger.metrics = before_after(merger, fm, examples, finetunes, has_holdout)


def task_arithmetic_init(merger: SuperMerger, fm: FunctionalMerge, splits) -> float:
    """The λ of the task-arithmetic grid with the lowest summed training loss, as initial coefficient."""
    shape = (merger.plan.num_sources, len(merger.plan.groups))
    losses = {lam: sum(fm.mean_loss(torch.full(shape, lam, device=fm.device), t, splits[t][0])
                       for t in merger.plan.tasks) for lam in LAMBDA_GRID}
    lam = min(losses, key=losses.get)
    logger.info("Task-arithmetic initialisation: losses %s, starting from c = %.1f", losses, lam)
    return min(lam, 0.95) if merger._kind == "tanh" else lam


def finetune_metrics(merger: SuperMerger, fm: FunctionalMerge, examples: dict[str, list[Example]]) -> dict:
    """Each task's own fine-tune (one-hot coefficients) on its examples."""
    out = {}
    for task in merger.plan.tasks:
        one_hot = torch.zeros(merger.plan.num_sources, len(merger.plan.groups), device=fm.device)
        one_hot[merger.plan.task_source[task]] = 1.0
        out[task] = fm.evaluate(fm.merged_params(one_hot), task, examples[task])
    return out


def before_after(merger: SuperMerger, fm: FunctionalMerge, examples: dict[str, list[Example]], finetunes: dict,
                 holdout: bool) -> dict:
    """Per task: its fine-tune's metrics and the merge's, on the hold-out examples (or the training ones)."""
    merged = {n: t.to(fm.device) for n, t in merger.merged_tensors.items()}
    return {task: {"examples": "holdout" if holdout else "train", "count": len(examples[task]),
                   "finetune": finetunes[task], "merged": fm.evaluate(merged, task, examples[task])}
            for task in merger.plan.tasks}  # fmt: skip


def loss_scale(merger: SuperMerger, fm: FunctionalMerge, train: dict[str, list[Example]]) -> dict[str, float]:
    """Weight of each task's loss: 1 (sum), 1/T (mean) or 1 / the fine-tune's own loss (normalized)."""
    tasks = merger.plan.tasks
    if merger.config.loss_combination == "mean":
        return {t: 1.0 / len(tasks) for t in tasks}
    if merger.config.loss_combination == "normalized":  # each task's loss over its fine-tune's own loss
        scale = {}
        for t in tasks:
            one_hot = torch.zeros(merger.plan.num_sources, len(merger.plan.groups), device=fm.device)
            one_hot[merger.plan.task_source[t]] = 1.0
            scale[t] = 1.0 / max(fm.mean_loss(one_hot, t, train[t]), 1e-6)
        return scale
    return {t: 1.0 for t in tasks}


def _check_finite(losses: dict[str, float], step: int) -> None:
    bad = {t: v for t, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"Non-finite loss at step {step} for task(s) {bad}. Check the labels (e.g. out of range) and the "
            "inputs, or use dtype='float32'."
        )
