"""Learning the coefficients (Adam on w through Accelerate, the exact cheap gradient, hold-out selection) on one
or two objectives, and data-free merges with `auto` hyperparameters picked on examples. Every function returns
its result."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .config import SuperMergeConfig
from .data import BatchSampler, Example, Split
from .distill import attach_teachers
from .functional import FunctionalMerge
from .methods import MergeMethod
from .plan import MergePlan, layer_depths
from .results import Coefficients, LearnResult, check_finite, inverse_transform, transform
from .sparsify import magnitude_thresholds
from .start import check_lam_known, choose_start_lam, initial_coefficient, preprocesses, score, start_preprocess

logger = logging.getLogger(__name__)

Splits = dict[str, Split]  # task -> (train, holdout, unlabelled)


class CoefficientModule(nn.Module):
    """Holds w `(S, G)`; `forward()` returns c(w). The only module given to `accelerator.prepare`."""

    def __init__(self, num_sources: int, num_groups: int, *, init: float | torch.Tensor, kind: str) -> None:
        super().__init__()
        self.kind = kind
        start = torch.as_tensor(init, dtype=torch.float32).expand(num_sources, num_groups)  # c: one value or (S, G)
        if kind == "tanh":  # a saved c of exactly ±1 (float32 tanh of a large w) would start at w = ±inf
            start = start.clamp(-1 + 1e-6, 1 - 1e-6)
        self.w = nn.Parameter(inverse_transform(start, kind).clone())

    def forward(self) -> torch.Tensor:
        return transform(self.w, self.kind)  # (S, G)


def functional_merge(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod, *,
                     device: torch.device | str = "cpu") -> FunctionalMerge:
    """The plan's merged model as the method sees it (AdaMerging++: over TIES-trimmed task vectors; SuperMerge's
    `start: ties / tsv_m`: over the components of that merge, `start.start_preprocess`)."""
    preprocess = functools.partial(method.preprocess, **config.method_kwargs) if method.preprocess else \
        start_preprocess(plan, config, device=device)
    return FunctionalMerge(plan, dtype=config.compute_dtype, device=device, preprocess=preprocess,
                           streaming=config.streaming)


def one_hot(plan: MergePlan, task: str, device: torch.device | str) -> torch.Tensor:
    """Coefficients `(S, G)` that select the source carrying `task`: its fine-tune (flat plans)."""
    c = torch.zeros(plan.num_sources, len(plan.groups), device=device)
    c[plan.task_rows[task]] = 1.0
    return c


def loss_weights(method: MergeMethod, kwargs: Mapping[str, Any]) -> dict[str, float]:
    """What learning minimises, `{objective: weight}`: the method's objective, or what SuperMerge's `objective`
    option says: `distill` alone, or `both` = (1 - distill_weight) supervised + distill_weight distill."""
    choice = kwargs.get("objective", "labels")
    if choice == "labels":
        return {method.objective: 1.0}
    weight = 1.0 if choice == "distill" else kwargs["distill_weight"]
    return {k: v for k, v in {"supervised": 1.0 - weight, "distill": weight}.items() if v}


def warn_without_unlabelled(method: MergeMethod, kwargs: Mapping[str, Any]) -> None:
    """A warning when a distilling method got no inputs without labels (it then distils on the labelled ones)."""
    if method.kind == "learned" and "distill" in loss_weights(method, kwargs):
        logger.warning("%s distils each fine-tune on its task's inputs and got only the labelled examples': on "
                       "text-5 the default gave 0.948 of the fine-tunes' accuracy with 32 labelled examples per "
                       "task alone (one draw), 0.989 with 480 more inputs per task (3 draws). Pass any inputs of "
                       "the tasks, no labels needed (fit(unlabelled={task: inputs})).", method.name)


def check_unlabelled(method: MergeMethod, kwargs: Mapping[str, Any]) -> None:
    """`ValueError` unless the method reads inputs without labels (distillation, entropy, head refitting, the Gram
    matrices of statistics methods): else they'd be ignored."""
    if method.kind == "statistics":
        return
    if method.kind != "learned" or (not kwargs.get("refit_heads")
                                    and {"distill", "entropy"}.isdisjoint(loss_weights(method, kwargs))):
        raise ValueError(f"`unlabelled` inputs are read only by objectives without labels (supermerge with "
                         f"`method_kwargs` objective 'distill' or 'both', adamerging), by supermerge's `refit_heads` "
                         f"and by the statistics methods (regmean, regmean_plusplus); {method.name!r} with "
                         f"{dict(kwargs)} would ignore them. Drop them, or choose such a method or objective.")


def merge_data_free(fm: FunctionalMerge, method: MergeMethod, kwargs: Mapping[str, Any], *, seed: int,
                    examples: Mapping[str, list[Example]] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float]]:
    """`(merged tensors, chosen hyperparameters, grid scores)` of a data-free method, each `auto` value picked from
    its hyperparameter's `grid` on `examples` (λ multiplies last: each other value costs one merge, each λ a
    scaling). A method that `needs_depth` gets each tensor's `depth` (`plan.layer_depths`)."""
    kwargs = dict(kwargs)
    lam = kwargs.pop("lam", 1.0)
    searched = [k for k, v in kwargs.items() if v == "auto"]  # besides λ
    reported = [k for k, spec in method.hyperparameters.items() if spec.auto]  # chosen or given
    if (lam == "auto" or searched) and not examples:
        raise ValueError(f"{method.name}: `auto` hyperparameters are picked on labelled examples; pass examples.")
    if kwargs.get("weights") is not None:
        kwargs["weights"] = torch.tensor(kwargs["weights"])
    lams = method.hyperparameters["lam"].grid if lam == "auto" else (lam,)
    depths = layer_depths(fm.deltas) if method.needs_depth else None
    best, grid = None, {}
    for values in itertools.product(*(method.hyperparameters[k].grid for k in searched)):
        options = kwargs | dict(zip(searched, values))  # a new dict per choice
        if method.random:
            options["generator"] = torch.Generator().manual_seed(seed)
        if options.get("trim_scope") == "task":
            options["threshold"] = magnitude_thresholds((s.dense() for s in fm.deltas.values()), options["density"])
        delta = {n: method.merge(s.dense(), **options, **({} if depths is None else {"depth": depths[n]}))
                 for n, s in fm.deltas.items()}  # name -> (*shape)
        for value in lams:
            merged = {n: fm.base_tensor(n) + value * delta[n] for n in fm.deltas}
            chosen = {k: value if k == "lam" else options[k] for k in reported}
            if len(lams) == 1 and not searched:
                return merged, chosen, grid
            key = ",".join(f"{k}={v}" for k, v in chosen.items())
            grid[key] = score(fm, examples, params=merged)
            if best is None or grid[key] > best[0]:
                best = (grid[key], merged, chosen)
    logger.info("%s grid scores: %s; chose %s", method.name, grid, best[2])
    return best[1], best[2], grid


def learn(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod, splits: Splits,
          generator: torch.Generator, *, accelerator: Accelerator, finetune_tasks: list[str] | None = None,
          resume: bool = False, init: torch.Tensor | None = None) -> LearnResult:
    """Learn the coefficients of `plan` with Adam through Accelerate, keeping the step with the best hold-out score.

    `splits[task]` = (train, holdout, unlabelled): each step takes a batch of every task for each objective of
    `loss_weights`, from `train` (supervised) or `unlabelled` (distill, entropy; the teachers' logits computed
    first, `distill.attach_teachers`); `generator` draws the batches. Each process takes a slice of every global
    batch, its loss weighted by its share (so P processes = one). `finetune_tasks`: the tasks whose own source is
    a row of the plan (all, if flat), for the fine-tune metrics. With `config.checkpoint_every` the state is written
    atomically beside `config.output_dir` every that many steps; with `resume`, learning continues from it. `init`:
    the coefficients c `(S, G)` to start from (a task added to a merge), instead of the config's start.
    """
    acc, tasks, weights = accelerator, plan.tasks, loss_weights(method, config.method_kwargs)
    checkpoint = None
    if config.checkpoint_every:  # beside the output, like its temporary folder
        checkpoint = Path(config.output_dir).parent / f".{Path(config.output_dir).name}.learning.pt"
        if not resume and checkpoint.is_file() and acc.is_main_process:
            checkpoint.unlink()
        acc.wait_for_everyone()
    fm = functional_merge(plan, config, method, device=acc.device)
    pools = {o: {t: splits[t].train if o == "supervised" else splits[t].unlabelled for t in tasks} for o in weights}
    if "distill" in pools:
        attach_teachers(plan, pools["distill"], dtype=fm.dtype, device=acc.device)
    train = {t: s.train for t, s in splits.items()}
    chosen = choose_start_lam(fm, config, {t: [*s.train, *s.holdout] for t, s in splits.items()})
    if chosen:  # the start's λ, picked: learning runs over the components scaled by it, as a reload builds them
        del fm
        config = dataclasses.replace(config, method_kwargs=config.method_kwargs | chosen)
        fm = functional_merge(plan, config, method, device=acc.device)
    own = FunctionalMerge(plan, dtype=fm.dtype, device=acc.device, streaming=True) \
        if preprocesses(method, config) else fm  # where one-hot coefficients give each fine-tune
    scale = loss_scale(plan, config, own, train)
    if init is None:
        init = initial_coefficient(plan, config, fm, train)
    module = CoefficientModule(plan.num_sources, len(plan.groups), init=init, kind=config.transform)
    w0 = module.w.detach().clone().to(acc.device)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    module, optimizer = acc.prepare(module, optimizer)
    raw = acc.unwrap_model(module)
    samplers = {(o, t): BatchSampler(len(pools[o][t]), config.batch_size, generator) for o in weights for t in tasks}
    holdout = [t for t in tasks if splits[t].holdout]
    metric = "entropy" if method.objective == "entropy" else "loss"  # selection: on the labelled hold-out's loss
    history: list[dict[str, Any]] = []

    def record(step: int, losses: dict[str, float] | None) -> float | None:
        held = {t: fm.evaluate(t, splits[t].holdout, c=raw().detach())[metric] for t in holdout} or None
        value = sum(scale[t] * v for t, v in held.items()) if held else None
        history.append({"step": step, "train": losses, "holdout": held, "score": value})
        if held:
            _check_finite(held, step, config)
        train = f"train {metric} {losses}" if losses else "before learning"  # step 0 has no train loss
        logger.debug("step %d: %s, hold-out %s %s", step, train, metric, held)
        return value

    start = 1
    if checkpoint is not None and checkpoint.is_file():  # resume: w, Adam, the batch order and the selection so far
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        with torch.no_grad():
            raw.w.copy_(state["w"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        for key, order in state["orders"].items():
            samplers[key].order = order
        history[:] = state["history"]
        best_score, best_w, best_step, start = state["best_score"], state["best_w"].to(acc.device), *state["steps"]
        logger.info("Resuming from step %d (%s)", start - 1, checkpoint)
    else:
        best_score, best_w, best_step = record(0, None), raw.w.detach().clone(), 0
    P, rank = acc.num_processes, acc.process_index
    bar = tqdm(range(start, config.steps + 1), desc=f"Learning {method.name} coefficients",
               disable=not acc.is_local_main_process)
    for step in bar:
        c = module()  # (S, G), through DDP so that the gradient of w is averaged over processes
        grad_c, mean = 0.0, dict.fromkeys(tasks, 0.0)
        for objective, weight in weights.items():
            batches, share = {}, {}
            for t in tasks:
                batch = [pools[objective][t][i] for i in samplers[objective, t].next()]
                bounds = [len(batch) * r // P for r in range(P + 1)]
                batches[t] = batch[bounds[rank]: bounds[rank + 1]]
                share[t] = len(batches[t]) * P / len(batch)  # DDP averages: P x my share of the global mean
            grad, losses = fm.coefficient_grad(c, batches, {t: weight * scale[t] * share[t] for t in tasks}, objective,
                                               temperature=config.method_kwargs.get("temperature", 1.0))
            grad_c = grad_c + grad  # (S, G)
            zero = torch.zeros((), device=acc.device)  # a process with no example of a task still joins the reduce
            for t in tasks:
                mean[t] += weight * float(acc.reduce(losses.get(t, zero) * share[t], reduction="mean"))
        surrogate = (c * grad_c.to(c.dtype)).sum()  # d/dw = c'(w) * dL/dc: the exact chain rule
        if config.l2_to_init:
            surrogate = surrogate + config.l2_to_init * ((raw.w - w0) ** 2).sum()
        optimizer.zero_grad()
        acc.backward(surrogate)
        optimizer.step()
        if method.transform == "none":  # AdaMerging keeps its coefficients in [0, 1]
            with torch.no_grad():
                raw.w.clamp_(0.0, 1.0)
        _check_finite(mean, step, config)
        bar.set_postfix({metric: f"{sum(mean.values()):.4f}"})
        if step % config.eval_every == 0 or step == config.steps:
            value = record(step, mean)
            if value is not None and value < best_score:
                best_score, best_w, best_step = value, raw.w.detach().clone(), step
        if checkpoint is not None and step % config.checkpoint_every == 0 and acc.is_main_process:
            state = {"w": raw.w.detach().cpu(), "optimizer": optimizer.state_dict(), "history": history,
                     "generator": generator.get_state(), "orders": {k: s.order for k, s in samplers.items()},
                     "best_score": best_score, "best_w": best_w.cpu(), "steps": (best_step, step + 1)}
            torch.save(state, checkpoint.with_suffix(".tmp"))
            os.replace(checkpoint.with_suffix(".tmp"), checkpoint)  # a kill leaves the previous state whole
    if checkpoint is not None and checkpoint.is_file() and acc.is_main_process:
        checkpoint.unlink()  # learning is done: nothing to resume
    last_w = raw.w.detach().clone()
    if not holdout:
        best_w, best_step = last_w, config.steps
    logger.info("Selected step %d of %d (hold-out score %s)", best_step, config.steps, best_score)

    def table(w: torch.Tensor) -> Coefficients:
        return Coefficients(plan.source_names, plan.groups, transform(w, config.transform).cpu(), w.cpu(),
                            config.transform)

    examples = {t: splits[t].holdout or splits[t].train for t in tasks}
    finetunes = {t: own.evaluate(t, examples[t], c=one_hot(plan, t, fm.device))
                 for t in (tasks if finetune_tasks is None else finetune_tasks)}
    merged = fm.params(transform(best_w, config.transform), dense=True)
    check_finite(merged, f"The {method.name} merge")
    metrics = {t: {"examples": "holdout" if splits[t].holdout else "train", "count": len(examples[t]),
                   "finetune": finetunes.get(t), "merged": fm.evaluate(t, examples[t], params=merged)} for t in tasks}
    return LearnResult(table(best_w), table(last_w), history, best_step, metrics,
                       {n: t.cpu() for n, t in merged.items()}, chosen)


def merge_with(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod,
               coefficients: Coefficients) -> tuple[Coefficients, dict[str, torch.Tensor]]:
    """The table aligned to the plan (rows and groups matched by name) and the merge it gives; `ValueError` for
    another merge's table, transform, or out-of-range values."""
    if coefficients.transform != config.transform:
        raise ValueError(f"The table's transform {coefficients.transform!r} is not this merge's {config.transform!r}.")
    check_lam_known(config)
    values = coefficients.aligned(plan.source_names, plan.groups)
    table = Coefficients.from_values(plan.source_names, plan.groups, values, config.transform)
    merged = functional_merge(plan, config, method).params(table.values, dense=True)
    check_finite(merged, "The merge")
    return table, {n: t.cpu() for n, t in merged.items()}


def loss_scale(plan: MergePlan, config: SuperMergeConfig, fm: FunctionalMerge,
               train: Mapping[str, list[Example]]) -> dict[str, float]:
    """Weight of each task's loss: 1 (sum), 1/T (mean) or 1 / its fine-tune's own loss (normalized)."""
    if config.loss_combination == "mean":
        return {t: 1.0 / len(plan.tasks) for t in plan.tasks}
    if config.loss_combination == "normalized":
        return {t: 1.0 / max(fm.evaluate(t, train[t], c=one_hot(plan, t, fm.device))["loss"], 1e-6)
                for t in plan.tasks}
    return {t: 1.0 for t in plan.tasks}


def _check_finite(losses: Mapping[str, float], step: int, config: SuperMergeConfig) -> None:
    bad = {t: v for t, v in losses.items() if not math.isfinite(v)}
    if bad:
        cause = (f"the learning rate {config.learning_rate} is too high for these coefficients (lower it)" if step
                 else "the labels or inputs are invalid (e.g. labels out of range), or a source holds NaN/Inf")
        raise FloatingPointError(f"Non-finite loss at step {step} for task(s) {sorted(bad)}: {cause}.")
