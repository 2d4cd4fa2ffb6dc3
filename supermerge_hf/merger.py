"""`SuperMerger`: resolve and check the sources, learn the coefficients with Accelerate, build the merged model."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from .coefficients import Coefficients, transform
from .config import SuperMergeConfig
from .data_free import merge_data_free
from .examples import Example, as_examples
from .learning import learn
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
    def needs_examples(self) -> bool:
        """Learned methods, and data-free ones with an `auto` hyperparameter, read examples."""
        return self.method.kind == "learned" or "auto" in self.config.method_kwargs.values()

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
        data = self._prepare_examples(examples or {}, require_labels=not entropy) if self.needs_examples else None
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
            learn(self, data, objective="entropy" if self.method.name in ENTROPY_METHODS else "supervised")
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

    @property
    def _kind(self) -> str:
        """The coefficient transform: AdaMerging uses the identity (projected to [0, 1]), SuperMerge the config's."""
        return "none" if self.method.name in ENTROPY_METHODS else self.config.transform

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
        self.merged_tensors = {n: t.cpu() for n, t in fm.dense_merge(values).items()}

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

    def push_adapter_to_hub(self, repo_id: str, *, rank: int | None = None, **kwargs) -> str:
        """Save the combined LoRA adapter (as `save_adapter` does) and upload it; see `push_to_hub` for kwargs."""
        message = f"Upload combined LoRA adapter of {', '.join(self.plan.tasks)}"
        return self._push(lambda folder: self.save_adapter(folder, rank=rank), repo_id, message, **kwargs)

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

        Args:
            repo_id (`str`): Target repo, created if missing.
            private (`bool`, *optional*): Visibility of a repo that gets created.
            token (`str` or `bool`, *optional*): Hub token with write access; never logged or written.
            revision (`str`, *optional*): Branch to commit to (created if missing).
            commit_message (`str`, *optional*): Commit message.

        Returns:
            `str`: The sha of the commit created.
        """
        message = f"Upload {self.config.method} merge of {', '.join(self.plan.tasks)}"
        return self._push(self.save_pretrained, repo_id, message, private=private, token=token, revision=revision,
                          commit_message=commit_message)

    def _push(self, save, repo_id: str, default_message: str, *, private: bool | None = None,
              token: str | bool | None = None, revision: str | None = None, commit_message: str | None = None) -> str:
        token = token if token is not None else self._hub["token"]
        with tempfile.TemporaryDirectory() as tmp:
            folder = save(str(Path(tmp) / repo_id.split("/")[-1]))
            return push_folder(folder, repo_id, private=private, token=token, revision=revision,
                               commit_message=commit_message or default_message, endpoint=self._hub["endpoint"])
