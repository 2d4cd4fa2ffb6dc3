"""`SuperMerger`: resolve and check the sources, learn the coefficients with Accelerate, build the merged model."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .coefficients import CoefficientModule, Coefficients, transform
from .config import SuperMergeConfig
from .data_free import LAMBDA_GRID, merge_data_free, ties_trimmed
from .examples import BatchSampler, Example, as_examples, split_holdout
from .objectives import FunctionalMerge
from .hub import ResolvedSource, push_folder, resolve
from .methods import get_method
from .task_vectors import MergePlan, ModelSpec, build_plan, load_source

logger = logging.getLogger(__name__)

ENTROPY_METHODS = {"adamerging", "adamerging_plus"}  # unsupervised: entropy of predictions, no labels


class SuperMerger:
    """Merge fine-tunes of one base with the method of `config` (SuperMerge by default).

    Construction resolves the base and sources (local folders or Hub ids) and checks that they fit together,
    reading configs and safetensors headers only; `fit` does the heavy work.

    Args:
        config (`SuperMergeConfig`): What to merge and how.
        accelerator (`accelerate.Accelerator`, *optional*): Defaults to one on the GPU if there is one, else CPU.
        token (`str` or `bool`, *optional*): Hub token for private repos; never logged or written.
        cache_dir (`str`, *optional*): Hub cache folder.
        endpoint (`str`, *optional*): Hub endpoint (defaults to huggingface_hub's).

    Example:
        ```python
        merger = SuperMerger(config)
        merger.fit({"sst2": sst2_examples, "rte": rte_examples})
        merger.save_pretrained("merged")
        ```
    """

    def __init__(
        self,
        config: SuperMergeConfig,
        *,
        accelerator: Accelerator | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.method = get_method(config.method)
        hub = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint, "allow_pickle": config.allow_pickle}
        self.resolved_base = resolve(config.base, revision=config.base_revision, **hub)
        self.resolved_sources = [resolve(s.path, revision=s.revision, **hub) for s in config.sources]
        load = {"allow_pickle": config.allow_pickle, "trust_remote_code": config.trust_remote_code}
        base = ModelSpec.from_folder(self.resolved_base.path, **load)
        sources = [load_source(r.path, base, base_name=config.base, **load) for r in self.resolved_sources]
        self._setup(build_plan(base, sources, config.tasks, config.granularity), token=token, endpoint=endpoint)

    @classmethod
    def from_plan(cls, config: SuperMergeConfig, plan: MergePlan, *, accelerator: Accelerator | None = None):
        """A merger over an already checked plan (a hierarchical level); nothing is resolved again."""
        merger = cls.__new__(cls)
        merger.config, merger.accelerator, merger.method = config, accelerator, get_method(config.method)
        merger.resolved_base = ResolvedSource(plan.base.folder)
        merger.resolved_sources = [ResolvedSource(s.folder) for s in plan.sources]
        merger._setup(plan)
        return merger

    def _setup(self, plan: MergePlan, *, token: str | bool | None = None, endpoint: str | None = None) -> None:
        self.plan = plan
        self.coefficients: Coefficients | None = None
        self.final_coefficients: Coefficients | None = None
        self.history: list[dict[str, Any]] = []
        self.selected_step: int | None = None
        self.merged_tensors: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, Any] = {}
        self.chosen: dict[str, float] = {}
        self.grid_scores: dict[str, float] = {}
        self._functional: FunctionalMerge | None = None
        self._hub = {"token": token, "endpoint": endpoint}
        self.levels: list[dict[str, Any]] = []
        logger.info(
            "Merging %d sources: %d shared tensors in %d groups, task-specific: %s",
            self.plan.num_sources, len(self.plan.merged), len(self.plan.groups),
            {t: len(n) for t, n in self.plan.task_specific.items()},
        )

    @property
    def functional(self) -> FunctionalMerge:
        """The merged model as a function of the coefficients (loads base and task vectors on first use)."""
        if self._functional is None:
            self._functional = FunctionalMerge(self.plan, dtype=self.dtype, streaming=self.config.streaming)
        return self._functional

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def merge_info(self) -> dict[str, Any]:
        """What a merge resolved and decided, saved in `supermerge_config.json` for reproducibility."""
        return {
            "base_commit": self.resolved_base.commit,
            "source_commits": {t: r.commit for t, r in zip(self.config.tasks, self.resolved_sources)},
            "task_specific": self.plan.task_specific,
            "num_merged_tensors": len(self.plan.merged),
            "groups": len(self.plan.groups),
            "selected_step": self.selected_step,
        }

    # ------------------------------------------------------------------ learning
    def fit(self, examples: Mapping[str, Any] | None = None) -> SuperMerger:
        """Learn the coefficients (learned methods) or compute the merge (data-free methods).

        Args:
            examples (`dict[str, Any]`): Per task name, labelled examples: a `datasets.Dataset`, a list of
                dicts of model inputs with `labels`, or a `DataLoader`. Only the first
                `config.examples_per_task` are used.

        Raises:
            `ValueError`: A task without examples or labels, examples for an unknown task.
            `FileExistsError`: `config.output_dir` already holds files and overwriting was not asked.
            `FloatingPointError`: A task's loss is not finite at the start.
        """
        from .outputs import check_output_dir

        if self.config.output_dir:
            check_output_dir(self.config.output_dir, overwrite=self.config.overwrite_output_dir)
        entropy = self.method.name in ENTROPY_METHODS
        needs_examples = self.method.kind == "learned" or "auto" in self.config.method_kwargs.values()
        data = self._prepare_examples(examples or {}, require_labels=not entropy) if needs_examples else None
        if self.method.kind == "data_free":
            merged, self.chosen, self.grid_scores = merge_data_free(
                self.functional, self.method, self.config.method_kwargs, seed=self.config.seed, examples=data
            )
            self.merged_tensors = {n: t.to(self.dtype).cpu() for n, t in merged.items()}
            return self
        return self.fit_examples(data)

    def fit_examples(self, data: dict[str, list[Example]]) -> SuperMerger:
        """Learn from examples already in the form of `examples.as_examples` (flat, or level by level)."""
        if self.config.hierarchical:
            from .hierarchy import fit_hierarchical

            fit_hierarchical(self, data)
        else:
            self._learn(data, objective="entropy" if self.method.name in ENTROPY_METHODS else "supervised")
        return self

    def adopt(self, other: SuperMerger) -> None:
        """Take the result of another merger over the same base and tasks (the last hierarchical level)."""
        for name in ("coefficients", "final_coefficients", "history", "selected_step", "merged_tensors", "metrics"):
            setattr(self, name, getattr(other, name))

    def _prepare_examples(self, examples: Mapping[str, Any], require_labels: bool = True) -> dict[str, list[Example]]:
        unknown = sorted(set(examples) - set(self.plan.tasks))
        if unknown:
            raise ValueError(f"Examples given for unknown task(s) {unknown}; the tasks are {self.plan.tasks}.")
        data = {
            task: as_examples(task, examples.get(task, []), limit=self.config.examples_per_task,
                              require_labels=require_labels)
            for task in self.plan.tasks
        }
        if not require_labels:  # unsupervised methods never see a label, even one that was given
            data = {t: [{k: v for k, v in ex.items() if k != "labels"} for ex in exs] for t, exs in data.items()}
        return data

    def _learn(self, data: dict[str, list[Example]], objective: str) -> None:
        cfg, plan = self.config, self.plan
        acc = self.accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.accelerator = acc
        if cfg.batch_size % acc.num_processes:
            raise ValueError(
                f"batch_size={cfg.batch_size} is not divisible by the {acc.num_processes} processes: each "
                "process must get an equal share of every global batch."
            )
        generator = torch.Generator().manual_seed(cfg.seed)
        tasks = plan.tasks
        splits = {t: split_holdout(data[t], cfg.holdout_fraction, generator) for t in tasks}
        trim = ties_trimmed if self.method.name == "adamerging_plus" else None
        fm = self._functional = FunctionalMerge(plan, dtype=self.dtype, device=acc.device, delta_transform=trim,
                                                streaming=cfg.streaming)
        scale = self._loss_scale(fm, {t: s[0] for t, s in splits.items()})
        kind = self._kind
        init = self._task_arithmetic_init(fm, splits) if cfg.init_from_task_arithmetic else cfg.init_coefficient

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
            merged = fm.merged_params(raw().detach())
            holdout = {t: fm.evaluate(merged, t, splits[t][1])[metric] for t in tasks} if has_holdout else None
            score = sum(scale[t] * v for t, v in holdout.items()) if holdout else None
            self.history.append({"step": step, "train": train, "holdout": holdout, "score": score})
            logger.info("step %d: train %s %s, hold-out %s", step, metric, train, holdout)
            return score

        best_score = record(0, None)
        _check_finite(self.history[-1]["holdout"] or {}, 0)
        best_w, best_step = raw.w.detach().clone(), 0
        bar = tqdm(range(1, cfg.steps + 1), desc=f"Learning {self.method.name} coefficients",
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
        self.selected_step = best_step
        self.final_coefficients = self._table(final_w)
        logger.info("Selected step %d of %d (hold-out score %s)", best_step, cfg.steps, best_score)
        self.apply_coefficients(transform(best_w, kind), raw=best_w)
        self.metrics = self._before_after(fm, {t: s[1] or s[0] for t, s in splits.items()}, has_holdout)

    @property
    def _kind(self) -> str:
        """The coefficient transform: AdaMerging uses the identity (projected to [0, 1]), SuperMerge the config's."""
        return "none" if self.method.name in ENTROPY_METHODS else self.config.transform

    def _task_arithmetic_init(self, fm: FunctionalMerge, splits) -> float:
        """The λ of the task-arithmetic grid with the lowest summed training loss, as initial coefficient."""
        shape = (self.plan.num_sources, len(self.plan.groups))
        losses = {lam: sum(fm.mean_loss(torch.full(shape, lam, device=fm.device), t, splits[t][0])
                           for t in self.plan.tasks) for lam in LAMBDA_GRID}
        lam = min(losses, key=losses.get)
        logger.info("Task-arithmetic initialisation: losses %s, starting from c = %.1f", losses, lam)
        return min(lam, 0.95) if self._kind == "tanh" else lam

    def _before_after(self, fm: FunctionalMerge, examples: dict[str, list[Example]], holdout: bool) -> dict:
        """Per task: each fine-tune's metrics and the merge's, on the hold-out examples (or the training ones)."""
        merged = {n: t.to(fm.device) for n, t in self.merged_tensors.items()}
        out = {}
        for task in self.plan.tasks:
            one_hot = torch.zeros(self.plan.num_sources, len(self.plan.groups), device=fm.device)
            one_hot[self.plan.task_source[task]] = 1.0
            out[task] = {"examples": "holdout" if holdout else "train", "count": len(examples[task]),
                         "finetune": fm.evaluate(fm.merged_params(one_hot), task, examples[task]),
                         "merged": fm.evaluate(merged, task, examples[task])}
        return out

    def _loss_scale(self, fm: FunctionalMerge, train: dict[str, list[Example]]) -> dict[str, float]:
        tasks = self.plan.tasks
        if self.config.loss_combination == "mean":
            return {t: 1.0 / len(tasks) for t in tasks}
        if self.config.loss_combination == "normalized":  # each task's loss over its fine-tune's own loss
            scale = {}
            for t in tasks:
                one_hot = torch.zeros(self.plan.num_sources, len(self.plan.groups), device=fm.device)
                one_hot[self.plan.task_source[t]] = 1.0
                scale[t] = 1.0 / max(fm.mean_loss(one_hot, t, train[t]), 1e-6)
            return scale
        return {t: 1.0 for t in tasks}

    def _table(self, w: torch.Tensor) -> Coefficients:
        kind = self._kind
        return Coefficients(self.plan.source_names, self.plan.groups, transform(w, kind).cpu(), w.cpu(), kind)

    @torch.no_grad()
    def apply_coefficients(self, values: torch.Tensor, *, raw: torch.Tensor | None = None) -> None:
        """Merge with given coefficient values `(S, G)` (already transformed), e.g. ones saved earlier.

        Raises:
            `ValueError`: `values` does not have shape (num sources, num groups).
        """
        expected = (self.plan.num_sources, len(self.plan.groups))
        if tuple(values.shape) != expected:
            raise ValueError(f"Coefficients of shape {tuple(values.shape)} given; this merge needs {expected}.")
        fm = self.functional
        values = values.to(device=fm.device, dtype=torch.float32)
        kind = self._kind
        raw = raw if raw is not None else (torch.atanh(values) if kind == "tanh" else values)
        self.coefficients = Coefficients(self.plan.source_names, self.plan.groups, values.cpu(), raw.cpu(), kind)
        self.merged_tensors = {n: t.cpu() for n, t in fm.merged_params(values).items()}

    # ------------------------------------------------------------------ outputs
    def merge_and_unload(self) -> PreTrainedModel:
        """The base's model class holding the merged weights (task-specific heads are not part of it)."""
        if self.merged_tensors is None:
            raise RuntimeError("Nothing merged yet: call `fit(examples)` first.")
        spec = self.plan.base
        model = spec.cls.from_pretrained(spec.folder, dtype=self.dtype)
        with torch.no_grad():
            for name, tensor in self.merged_tensors.items():
                model.get_parameter(spec.param_names[name]).copy_(tensor)
        return model.eval()

    def save_pretrained(self, save_directory: str | None = None, *, overwrite: bool | None = None) -> str:
        """Write the merged model, tokenizer, heads, config, coefficients and model card; see `outputs.save_merge`."""
        from .outputs import save_merge

        save_directory = save_directory or self.config.output_dir
        if not save_directory:
            raise ValueError("No output folder: pass `save_directory` or set `config.output_dir`.")
        overwrite = self.config.overwrite_output_dir if overwrite is None else overwrite
        return str(save_merge(self, save_directory, overwrite=overwrite))

    def save_adapter(self, save_directory: str, *, rank: int | None = None, overwrite: bool = False) -> str:
        """Write one PEFT LoRA adapter equal to the merge (all sources LoRA); `rank` compresses it by SVD.

        See `lora.save_combined_adapter`; the per-module reconstruction error is in `supermerge_adapter.json`.
        """
        from .lora import save_combined_adapter

        return str(save_combined_adapter(self, save_directory, rank=rank, overwrite=overwrite))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Save the merge (as `save_pretrained` does) and upload it to a Hub model repo.

        Returns:
            `str`: The sha of the commit created.
        """
        token = token if token is not None else self._hub["token"]
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(str(Path(tmp) / repo_id.split("/")[-1]))
            message = commit_message or f"Upload {self.config.method} merge of {', '.join(self.config.tasks)}"
            return push_folder(folder, repo_id, private=private, token=token, revision=revision,
                               commit_message=message, endpoint=self._hub["endpoint"])


def _check_finite(losses: dict[str, float], step: int) -> None:
    bad = {t: v for t, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"Non-finite loss at step {step} for task(s) {bad}. Check the labels (e.g. out of range) and the "
            "inputs, or use dtype='float32'."
        )
