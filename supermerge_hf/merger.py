"""`SuperMerger`, the façade: resolve and check the sources, learn or compute the merge, evaluate, save, push.
The only code that holds a `SuperMerger`; everything below it takes and returns values."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .checkpoint import check_not_an_input, check_output_dir
from .config import SourceConfig, SuperMergeConfig
from .data import make_splits, prepare_examples, without_class_labels
from .estimate import Estimate, estimate
from .export import (check_adapter_export, check_tokenizer, load_examples, load_result, save_combined_adapter,
                     save_merge)
from .functional import FunctionalMerge
from .blockdistill import merge_block_distill
from .gram import merge_with_statistics
from .heads import refit_heads, use_heads
from .hierarchy import fit_extension, fit_hierarchical, growth
from .hub import resolve
from .learning import (check_unlabelled, functional_merge, learn, merge_data_free, merge_with, one_hot,
                       warn_without_unlabelled)
from .methods import get_method
from .plan import build_plan, load_source, saved_dtype
from .publish import PushMixin
from .results import Coefficients, MergeResult, check_finite
from .sources import ModelSpec
from .start import check_start, preprocesses, resolve_start

logger = logging.getLogger(__name__)


class SuperMerger(PushMixin):
    """Merge fine-tunes of one base with the method of `config` (SuperMerge by default).

    Construction resolves the base and sources (local folders or Hub ids, with `token`, `cache_dir`,
    `endpoint`; the token is never logged or written) and checks that they fit, from configs and headers only;
    `fit` does the heavy work, with `accelerator` (default: the GPU if there is one, else the CPU).

    Example:
        ```python
        merger = SuperMerger(config)
        merger.fit({"sst2": sst2_examples, "rte": rte_examples})
        metrics = merger.evaluate(test_examples)  # per task: loss, accuracy
        merger.save_pretrained("merged")
        ```
    """

    def __init__(self, config: SuperMergeConfig, *, accelerator: Accelerator | None = None,
                 token: str | bool | None = None, cache_dir: str | None = None, endpoint: str | None = None) -> None:
        self.config, self.accelerator = config, accelerator
        self.method = get_method(config.method)
        check_start(config)
        self._hub = {"token": token, "endpoint": endpoint}
        hub = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint, "allow_pickle": config.allow_pickle}
        self.resolved_base = resolve(config.base, revision=config.base_revision, **hub)
        self.resolved_sources = [resolve(s.path, revision=s.revision, **hub) for s in config.sources]
        base = ModelSpec.from_folder(self.resolved_base.path, allow_pickle=config.allow_pickle)
        sources = [load_source(r.path, base, base_name=config.base, allow_pickle=config.allow_pickle)
                   for r in self.resolved_sources]
        self.plan = build_plan(base, sources, config.tasks, config.granularity,
                               tokenizer_source=config.tokenizer_source)
        check_tokenizer(self.plan, config)
        self.config = resolve_start(config, self.plan)  # `start: auto` made concrete (start.py)
        self.result: MergeResult | None = None
        self._origin, self._kept, self._grow = None, {}, None  # from_pretrained: (resolved, folder); add_source
        logger.info("Merging %d sources: %d shared tensors in %d groups; task-specific tensors: %s",
                    self.plan.num_sources, len(self.plan.merged), len(self.plan.groups),
                    {t: n for t, n in self.plan.task_specific.items() if n})

    @property
    def dtype(self) -> torch.dtype:
        """The dtype learning runs in (`config.compute_dtype`); the saved one is `saved_dtype(plan, config.dtype)`."""
        return self.config.compute_dtype

    @property
    def needs_examples(self) -> bool:
        """Learned and statistics methods, and data-free ones with an `auto` hyperparameter, read examples."""
        return self.method.kind != "data_free" or "auto" in self.config.method_kwargs.values()

    def _field(self, name: str, default: Any = None) -> Any:
        return default if self.result is None else getattr(self.result, name)

    coefficients = property(lambda self: self._field("coefficients"), doc="The coefficients of the selected step.")
    last_coefficients = property(lambda self: self._field("last_coefficients"), doc="Those of the last step.")
    history = property(lambda self: self._field("history", []), doc="Per evaluated step: train / hold-out loss.")
    selected_step = property(lambda self: self._field("selected_step"), doc="The step kept by hold-out selection.")
    metrics = property(lambda self: self._field("metrics", {}), doc="Per task: its fine-tune vs the merge.")
    chosen = property(lambda self: self._field("chosen", {}), doc="Hyperparameters picked by `auto`.")
    grid_scores = property(lambda self: self._field("grid_scores", {}), doc="`auto`: the score of each candidate.")
    merged_tensors = property(lambda self: self._field("merged"), doc="The merged tensors, by canonical name.")
    levels = property(lambda self: self._field("levels", []), doc="Hierarchical: each level's coefficients.")

    def _prepare(self, examples: Mapping[str, Any], *, require_labels: bool, limit: int | None,
                 tasks: list[str] | None = None) -> dict[str, list]:
        return prepare_examples(examples, self.plan.tasks if tasks is None else tasks, self.plan.label_counts(),
                                require_labels=require_labels, limit=limit)

    def _done(self) -> MergeResult:
        if self.result is None:
            raise RuntimeError("Nothing merged yet: call `fit(examples)` first.")
        return self.result

    def _check_output(self, folder: str | Path) -> None:
        deployed = [self._grow["origin"]] if self._grow else []  # add_source: the merge it extends
        check_not_an_input(folder, [r.path for r in [self.resolved_base, *self.resolved_sources]] + deployed)

    def fit(self, examples: Mapping[str, Any] | None = None, *, unlabelled: Mapping[str, Any] | None = None,
            resume: bool = False) -> SuperMerger:
        """Learn the coefficients (learned methods) or compute the merge (data-free methods; statistics methods,
        `regmean` and `regmean_plusplus`, from the Gram matrices of each task's inputs, labels unread: `gram.py`).

        Args:
            examples (`dict[str, Any]`): Per task name, a `datasets.Dataset`, a list of dicts of model inputs
                (with `labels` for supervised methods and `auto`) or a `DataLoader`; the first
                `config.examples_per_task` are used.
            unlabelled (`dict[str, Any]`, *optional*): Per task name (any subset), more inputs in the same forms,
                without labels (class labels given are ignored; a generative example's token labels only mark its
                answer, which entropy and distillation average over), all used: what `supermerge` with `objective:
                distill` or `both` (and its `refit_heads`) and `adamerging` learn from, beside the labelled
                examples' own inputs (the hold-out's excepted). Never the test split.
            resume (`bool`): Continue from the state saved every `config.checkpoint_every` steps by a run that was
                stopped (a fresh start when there is none).

        Raises:
            `ValueError` (bad examples), `FileExistsError` (`output_dir` holds files), `FloatingPointError`.
        """
        config, method, plan = self.config, self.method, self.plan
        if config.output_dir:
            self._check_output(config.output_dir)
            check_output_dir(config.output_dir, overwrite=config.overwrite_output_dir)
        if unlabelled is not None:
            check_unlabelled(method, config.method_kwargs)
        extra = None if unlabelled is None else self._prepare(
            unlabelled, require_labels=False, limit=None, tasks=[t for t in plan.tasks if t in unlabelled])
        if not any((extra or {}).values()):
            warn_without_unlabelled(method, config.method_kwargs)
        data = None
        if self.needs_examples:
            statistics = method.kind == "statistics"  # a task's inputs may all be `unlabelled` ones
            labels, given = method.objective != "entropy" and not statistics, self._kept | dict(examples or {})
            data = self._prepare(given, require_labels=labels, limit=config.examples_per_task,
                                 tasks=[t for t in plan.tasks if t in given] if statistics else None)
            if not labels:  # unsupervised methods never see a label, even one that was given
                data = {t: [without_class_labels(ex) for ex in exs] for t, exs in data.items()}
        resolved = {"config": config, "plan": plan, "base": self.resolved_base, "sources": self.resolved_sources}
        if method.kind == "statistics":
            self.accelerator = self.accelerator or Accelerator(cpu=not torch.cuda.is_available())
            inputs = {t: [*data.get(t, []), *(extra or {}).get(t, [])] for t in plan.tasks}
            merge = merge_block_distill if method.statistics == "block_distill" else merge_with_statistics
            merged, chosen, grid = merge(plan, config, method, inputs, device=self.accelerator.device), {}, {}
        elif method.kind == "data_free":
            fm = functional_merge(plan, config, method)
            merged, chosen, grid = merge_data_free(fm, method, config.method_kwargs, seed=config.seed, examples=data)
        if method.kind != "learned":
            merged = {n: t.to(self.dtype).cpu() for n, t in merged.items()}
            check_finite(merged, f"The {method.name} merge")
            self.result = MergeResult(**resolved, merged=merged, chosen=chosen, grid_scores=grid)
            return self
        self.accelerator = self.accelerator or Accelerator(cpu=not torch.cuda.is_available())
        splits, generator = make_splits(data, config.holdout_fraction, config.seed, unlabelled=extra)
        grow = self._grow or {}
        if config.hierarchical:
            result, levels = fit_hierarchical(plan, config, method, splits, accelerator=self.accelerator)
        elif "levels" in grow:  # add_source(cheap=True): the deployed merge as one source
            result, levels = fit_extension(plan, config, method, splits, grow["deployed"], grow["levels"],
                                           accelerator=self.accelerator)
        else:
            result, levels = learn(plan, config, method, splits, generator, accelerator=self.accelerator,
                                   resume=resume, init=grow.get("init")), []
        heads, metrics = refit_heads(plan, config, result.merged, splits, result.metrics,
                                     device=self.accelerator.device) if config.method_kwargs.get("refit_heads") \
            else ({}, result.metrics)  # each task's head refit on the merged body
        self.result = MergeResult(**resolved, merged=result.merged, coefficients=result.coefficients,
                                  last_coefficients=result.last_coefficients, history=result.history,
                                  selected_step=result.selected_step, metrics=metrics, chosen=result.chosen,
                                  levels=levels, extends=grow.get("extends"), heads=heads,
                                  examples=data if config.save_examples else None)
        return self

    def add_source(self, task: str, path: str, *, revision: str | None = None, cheap: bool = False,
                   **overrides: Any) -> SuperMerger:
        """A merger of this deployed merge (`from_pretrained`) plus task `task`'s fine-tune (`path`: a folder or Hub
        id at `revision`) to `fit` on every task's examples (the old tasks' may be left out where the merge kept
        them: `save_examples`). It learns from this merge's coefficients, the new row starting at
        `init_coefficient`; `cheap=True` merges this merge as one source (its task vector) with the new fine-tune
        instead: two rows to learn. `overrides`: config fields to change (e.g. `output_dir`); `steps` defaults to
        twice the step this merge selected (at most its `steps`; all of them over TIES / TSV-M components, which
        the new source changes): learning that starts from the deployed merge needs no longer than the first run."""
        if self._origin is None or self.coefficients is None:
            raise ValueError("`add_source` extends a saved learned merge: load it with "
                             "`SuperMerger.from_pretrained(merged_dir)` first (a data-free merge has nothing learned).")
        if task in self.config.tasks:
            raise ValueError(f"Task {task!r} is already merged ({self.config.tasks}): give the new one another name.")
        if self.levels and not cheap:
            raise ValueError("This merge is hierarchical: add a task with cheap=True (one more level).")
        sources = [*self.config.sources, SourceConfig(task, str(path), revision)]
        if self.selected_step is not None and not preprocesses(self.method, self.config):
            overrides.setdefault("steps", min(self.config.steps, max(2 * self.selected_step, self.config.eval_every)))
        config = dataclasses.replace(self.config, **overrides, sources=sources, hierarchical=None, merge_info={})
        new = SuperMerger(config, accelerator=self.accelerator, **self._hub)
        new._kept, new._grow = self._kept, growth(self.result, *self._origin, new.plan, cheap=cheap)
        return new

    def apply_coefficients(self, coefficients: Coefficients) -> SuperMerger:
        """Merge with a coefficient table (e.g. `Coefficients.load("merged/coefficients.json")`), its rows and
        groups matched by name; `ValueError` for another merge's table, transform, or out-of-range values."""
        table, merged = merge_with(self.plan, self.config, self.method, coefficients)
        self.result = MergeResult(self.config, self.plan, self.resolved_base, self.resolved_sources, merged,
                                  coefficients=table)
        return self

    def evaluate(self, examples: Mapping[str, Any], *, finetunes: bool = False,
                 batch_size: int = 32) -> dict[str, dict[str, float]]:
        """Per task: mean loss, prediction entropy and (classification) accuracy of the merge, each task with its
        own head, on `examples` (per task, in any form `fit` takes; all are used). With `finetunes=True`: of each
        task's own fine-tune instead (no `fit` needed)."""
        if self.result is None and not finetunes:
            raise RuntimeError("Nothing merged yet: call `fit(examples)` first, or pass `finetunes=True`.")
        data = self._prepare(examples, require_labels=False, limit=None,
                             tasks=[t for t in self.plan.tasks if t in examples])
        device = self.accelerator.device if self.accelerator else "cuda" if torch.cuda.is_available() else "cpu"
        fm = FunctionalMerge(self.plan, dtype=self.dtype, device=device, streaming=True)  # reads sources on demand
        if not finetunes:
            use_heads(fm, self.result.heads)  # `refit_heads`: the heads refit on the merged body
        merged = None if finetunes else {n: t.to(fm.device) for n, t in self.result.merged.items()}
        out = {}
        for task in tqdm(list(data), desc="Evaluating", leave=False):
            c = one_hot(self.plan, task, fm.device) if finetunes else None
            out[task] = fm.evaluate(task, data[task], c=c, params=merged, batch_size=batch_size)
        return out

    def estimate_memory(self, *, group_size: int | None = None) -> list[Estimate]:
        """Expected peak memory of flat, hierarchical and streaming learning, from the headers alone."""
        size = group_size or (self.config.hierarchical.group_size if self.config.hierarchical else 2)
        return estimate(self.plan, dtype=self.dtype, group_size=size, on_device=torch.cuda.is_available())

    def merge_and_unload(self) -> PreTrainedModel:
        """The base's model class holding the merged weights (task-specific heads are not part of it)."""
        self._done()
        return self.plan.base.build(self.result.merged, saved_dtype(self.plan, self.config.dtype))

    def save_pretrained(self, save_directory: str | Path | None = None, *, overwrite: bool | None = None,
                        push_to_hub: bool = False, repo_id: str | None = None, **push_kwargs) -> str:
        """Write the merged model, tokenizer, heads, config, coefficients and model card (`export.save_merge`);
        with `push_to_hub`, write it for the Hub repo `repo_id` (default: the folder's name) and upload that
        folder (`push_kwargs`: `private`, `token`, `revision`, `commit_message`, as `push_to_hub` takes)."""
        result, save_directory = self._done(), save_directory or self.config.output_dir
        if not save_directory:
            raise ValueError("No output folder: pass `save_directory` or set `config.output_dir`.")
        overwrite = self.config.overwrite_output_dir if overwrite is None else overwrite
        self._check_output(save_directory)
        repo_id = (repo_id or Path(save_directory).name) if push_to_hub else None

        def write() -> None:
            out = save_merge(result, save_directory, overwrite=overwrite, repo_id=repo_id)
            if push_to_hub:
                self._upload(out, repo_id, **push_kwargs)

        self._on_main(write)
        return str(save_directory)

    def save_adapter(self, save_directory: str | Path, *, rank: int | None = None, overwrite: bool = False,
                     repo_id: str | None = None) -> str:
        """Write one PEFT adapter equal to the merge (flat, no preprocessing): all sources LoRA, a LoRA adapter
        (`rank` compresses it by SVD, per-module errors in `supermerge_adapter.json`); all IA³, an IA³ adapter
        (`ia3_export`); `repo_id`: written for that Hub repo (no local paths). See `export.save_combined_adapter`."""
        result = self._done()
        check_adapter_export(self.plan, self.config, self.method)
        self._check_output(save_directory)
        self._on_main(lambda: save_combined_adapter(result, save_directory, rank=rank, overwrite=overwrite,
                                                    repo_id=repo_id))
        return str(save_directory)

    @classmethod
    def from_pretrained(cls, merged_dir: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                        accelerator: Accelerator | None = None) -> SuperMerger:
        """Reload a merge written by `save_pretrained` (a folder or Hub repo id) from its config and coefficients
        (every level's if hierarchical; the `auto` choices if data-free); its sources must still resolve."""
        origin = resolve(merged_dir, revision=revision, token=token)
        folder = origin.path
        config = SuperMergeConfig.from_pretrained(folder).pinned()
        config.check_published(str(merged_dir))
        info = config.merge_info  # `auto` -> what was chosen; reloading writes nothing
        config = dataclasses.replace(config, method_kwargs=config.method_kwargs | info.get("chosen", {}),
                                     output_dir=None, merge_info={})
        merger = cls(config, token=token, accelerator=accelerator)
        merger.result = load_result(folder, info, merger.method, config=config, plan=merger.plan,
                                    base=merger.resolved_base, sources=merger.resolved_sources)
        if merger.result is None:  # data-free: computed again, with the saved `auto` choices
            merger.fit()
        merger._origin, merger._kept = (origin, folder), load_examples(folder)
        return merger
