"""Where SuperMerge's learning starts (`method_kwargs.start`): the coefficients of step 0 and the vectors they weight.

- `auto` (default): `tsv_m` for a flat, non-streaming merge of full fine-tunes (the best start on text-5:
  benchmarks/RESULTS.md), else `constant`: LoRA / IA³ sources keep their exact combined adapter and one-hot
  coefficients that give each fine-tune; hierarchical and streaming merges learn over task vectors.
  `resolve_start` makes it concrete once the sources are read; the saved config holds the start that ran.
- `constant`: c = `init_coefficient` everywhere, over the task vectors (method.md section 2).
- `task_arithmetic`: c = the λ of the task-arithmetic grid with the lowest training loss (the former
  `init_from_task_arithmetic: true`).
- `ties`, `tsv_m`: learning weights each source's component of that data-free merge instead of its task vector
  (TIES: trimmed to its top `density` of the whole task vector as in the TIES paper, entries of the elected sign,
  divided by how many sources agree there, `sparsify.ties_components`; TSV-M: its block of U S Vᵀ on matrices,
  `spectral.tsv_components`, and 1/S of its task vector elsewhere, where TSV-M takes the mean), so that
  Σ_i component_i is the merge at λ = 1 (method.md section 10). The components are scaled by λ / init_coefficient:
  step 0, c = `init_coefficient`, IS the merge with λ (`start_lam`, or `auto`: picked on the labelled examples
  from `LAMBDA_GRID` as `merge_data_free` does), while c starts where tanh is steep (TIES picks λ = 0.9 to 1.0 on
  text-5; tanh never reaches 1). A saved merge is rebuilt from its sources with the saved λ, like AdaMerging++.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping

import torch

from .config import SuperMergeConfig
from .data import Example
from .functional import FunctionalMerge
from .methods import LAMBDA_GRID, MergeMethod
from .plan import MergePlan
from .sources import AdapterSpec
from .sparsify import magnitude_thresholds, ties_components
from .spectral import tsv_components
from .task_vectors import load_task_vectors

logger = logging.getLogger(__name__)

PREPROCESSED = ("ties", "tsv_m")  # the starts whose learning weights merge components, not task vectors


def start_of(config: SuperMergeConfig) -> str:
    return config.method_kwargs.get("start", "constant")


def preprocesses(method: MergeMethod, config: SuperMergeConfig) -> bool:
    """Whether learning weights other vectors than the task vectors (AdaMerging++'s trimmed ones, a TIES or TSV-M
    start): then no adapter or mergekit recipe redoes the merge, and one-hot coefficients are no fine-tune."""
    return method.preprocess is not None or start_of(config) in PREPROCESSED


def resolve_start(config: SuperMergeConfig, plan: MergePlan) -> SuperMergeConfig:
    """`config` with `start: auto` made concrete for `plan`'s sources (the module docstring says which)."""
    if start_of(config) != "auto":
        return config
    adapters = [t for t, s in zip(plan.tasks, plan.sources) if isinstance(s, AdapterSpec)]
    if adapters:
        start, why = "constant", f"adapter sources {adapters}"
    elif config.hierarchical or config.streaming or config.init_coefficient <= 0:
        start, why = "constant", "a hierarchical or streaming merge, or init_coefficient <= 0"
    else:
        start, why = "tsv_m", "a flat merge of full fine-tunes"
    logger.info("start: auto -> %s (%s)", start, why)
    return dataclasses.replace(config, method_kwargs=dict(config.method_kwargs, start=start))


def check_start(config: SuperMergeConfig) -> None:
    """`ValueError`, before any work, for a TIES / TSV-M start that cannot run as asked."""
    start = start_of(config)
    if start in PREPROCESSED and (config.init_coefficient <= 0 or config.hierarchical or config.streaming):
        raise ValueError(f"`start: {start}` learns c from init_coefficient over the {start} merge's components "
                         f"(all held in memory) scaled by λ / init_coefficient: it needs init_coefficient > 0 (got "
                         f"{config.init_coefficient}) and a flat merge that does not stream (got hierarchical="
                         f"{config.hierarchical}, streaming={config.streaming}). Change those, or use start: "
                         "constant or task_arithmetic.")


def check_lam_known(config: SuperMergeConfig) -> None:
    """`ValueError` for coefficients applied over TIES / TSV-M components whose λ is still `auto` (only `fit` picks
    it; `SuperMerger.from_pretrained` restores the saved one)."""
    if start_of(config) in PREPROCESSED and config.method_kwargs.get("start_lam") == "auto":
        raise ValueError(f"These coefficients weight the {start_of(config)} merge's components at the λ that `fit` "
                         "picked (`start_lam: auto`), unknown here. Load the saved merge with "
                         "`SuperMerger.from_pretrained(merged_dir)`, or set `method_kwargs.start_lam` to its "
                         "`merge_info.chosen` value.")


def score(fm: FunctionalMerge, examples: Mapping[str, list[Example]], *, by: str = "accuracy",
          c: torch.Tensor | None = None, params: Mapping[str, torch.Tensor] | None = None) -> float:
    """Higher is better: the mean over tasks of accuracy (or of minus the loss), or minus the summed loss."""
    metrics = [fm.evaluate(t, ex, c=c, params=params) for t, ex in examples.items()]
    if by == "loss":
        return -sum(m["loss"] for m in metrics)
    return sum(m.get("accuracy", -m["loss"]) for m in metrics) / len(metrics)


def task_arithmetic_init(plan: MergePlan, config: SuperMergeConfig, fm: FunctionalMerge,
                         train: Mapping[str, list[Example]]) -> float:
    """The λ of the task-arithmetic grid with the lowest summed training loss, as initial coefficient."""
    shape = (plan.num_sources, len(plan.groups))
    scores = {lam: score(fm, train, by="loss", c=torch.full(shape, lam, device=fm.device)) for lam in LAMBDA_GRID}
    lam = max(scores, key=scores.get)
    logger.info("Task-arithmetic initialisation: scores %s, starting from c = %.1f", scores, lam)
    return min(lam, 0.95) if config.transform == "tanh" else lam


def initial_coefficient(plan: MergePlan, config: SuperMergeConfig, fm: FunctionalMerge,
                        train: Mapping[str, list[Example]]) -> float:
    """c at step 0: the task-arithmetic λ for `start: task_arithmetic`, else `init_coefficient`."""
    if start_of(config) == "task_arithmetic":
        return task_arithmetic_init(plan, config, fm, train)
    return config.init_coefficient


def tsv_m_components(deltas: torch.Tensor) -> torch.Tensor:
    """Each source's share of the `tsv_m` merge (λ = 1): [`spectral.tsv_components`] of a matrix `(S, m, n)`, 1/S
    of each task vector of any other tensor `(S, *shape)` (there TSV-M takes the mean)."""
    return tsv_components(deltas) if deltas.dim() == 3 else deltas / deltas.shape[0]


def _scaled(deltas: torch.Tensor, *, components: Callable[[torch.Tensor], torch.Tensor], scale: float) -> torch.Tensor:
    return components(deltas).mul_(scale)  # (S, *shape), a new tensor


def start_preprocess(plan: MergePlan, config: SuperMergeConfig, *,
                     device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the start's learning weights, per tensor `(S, *shape)` -> `(S, *shape)`: the TIES / TSV-M components
    scaled by λ / init_coefficient (λ = 1 while `start_lam` is `auto`, to pick it: `choose_start_lam`); `None` where
    learning weights the task vectors. TIES reads every task vector once first (streamed) for the whole-task
    trimming thresholds."""
    start, kwargs = start_of(config), config.method_kwargs
    if start not in PREPROCESSED:
        return None
    components = tsv_m_components
    if start == "ties":
        _, deltas, _ = load_task_vectors(plan, dtype=config.compute_dtype, device=device, streaming=True)
        threshold = magnitude_thresholds((d.dense() for d in deltas.values()), kwargs["density"])  # (S,)
        components = functools.partial(ties_components, threshold=threshold)
    lam = 1.0 if kwargs["start_lam"] == "auto" else kwargs["start_lam"]
    return functools.partial(_scaled, components=components, scale=lam / config.init_coefficient)


def choose_start_lam(fm: FunctionalMerge, config: SuperMergeConfig,
                     examples: Mapping[str, list[Example]]) -> dict[str, float]:
    """For a TIES / TSV-M start with `start_lam: auto`, `{"start_lam": λ}`: the λ of `LAMBDA_GRID` whose merge
    λ Σ_i component_i scores best on `examples` (`score`, as `merge_data_free`), `fm` holding the components at
    λ = 1 (`start_preprocess`); `{}` for any other start."""
    start = start_of(config)
    if start not in PREPROCESSED or config.method_kwargs["start_lam"] != "auto":
        return {}
    shape, init = (fm.plan.num_sources, len(fm.plan.groups)), config.init_coefficient
    scores = {lam: score(fm, examples, c=torch.full(shape, lam * init, device=fm.device)) for lam in LAMBDA_GRID}
    lam = max(scores, key=scores.get)  # the first best, as `merge_data_free`
    logger.info("start %s: grid scores %s; learning starts from the %s merge with λ = %s", start, scores, start, lam)
    return {"start_lam": lam}
