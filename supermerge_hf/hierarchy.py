"""Hierarchical SuperMerge (method.md section 4): merge groups of similar sources, then the group results.

Each level holds at most `group_size` task vectors plus the base. A group's result is saved as a checkpoint and
becomes a source of the next level carrying the group's tasks (each keeps its head and hold-out split). Every
level's coefficients are returned, so `rebuild` can redo the merge from them alone.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import SuperMergeConfig
from .deltas import LowRankDelta, ScaleDelta
from .functional import release_memory
from .learning import Splits, functional_merge, learn
from .methods import MergeMethod
from .plan import MergePlan, build_plan
from .hub import ResolvedSource
from .results import Coefficients, LearnResult, MergeResult
from .sources import ModelSpec, Source

logger = logging.getLogger(__name__)

SIMILARITY_CHUNK = 2**20  # elements per float64 product: (K, chunk) at a time, not (K, n)


@dataclass
class Unit:
    """A source of one level: an original fine-tune, or a group result carrying several tasks."""

    name: str
    spec: Source
    tasks: list[str]
    original: bool = True


def cosine_similarity(base: ModelSpec, specs: list[Source], names: list[str]) -> torch.Tensor:
    """Cosine similarity `(K, K)` of the flattened task vectors, one tensor (and chunk) at a time."""
    gram = torch.zeros(len(specs), len(specs), dtype=torch.float64)
    for name in names:
        theta = base.read_tensor(name).float()
        rows = [torch.zeros(theta.numel()) if p is None
                else (p.dense() if isinstance(p, (LowRankDelta, ScaleDelta)) else p).flatten().float()
                for p in (s.delta(name, theta) for s in specs)]
        for start in range(0, theta.numel(), SIMILARITY_CHUNK):
            chunk = torch.stack([r[start: start + SIMILARITY_CHUNK] for r in rows]).double()  # (K, chunk)
            gram += chunk @ chunk.T
    norms = gram.diag().sqrt().clamp(min=1e-30)
    return gram / torch.outer(norms, norms)


def partition(similarity: torch.Tensor, group_size: int) -> list[list[int]]:
    """Average-linkage agglomerative grouping of the most similar units, no group larger than `group_size`."""
    groups = [[i] for i in range(similarity.shape[0])]
    while True:
        pairs = [(float(similarity[groups[a]][:, groups[b]].mean()), a, b) for a in range(len(groups))
                 for b in range(a + 1, len(groups)) if len(groups[a]) + len(groups[b]) <= group_size]
        if not pairs:
            return groups
        _, a, b = max(pairs, key=lambda p: p[0])  # the first of equals, as a strict > scan
        groups[a] = groups[a] + groups.pop(b)


def group_units(units: list[Unit], level: int, config: SuperMergeConfig, plan: MergePlan) -> list[list[int]]:
    """The groups of one level: by similarity, as the user gave them (first level), or at random."""
    size, grouping = config.hierarchical.group_size, config.hierarchical.grouping
    if len(units) <= size:
        return [list(range(len(units)))]
    if grouping == "explicit" and level == 0:
        index = {u.name: i for i, u in enumerate(units)}
        return [[index[t] for t in group] for group in config.hierarchical.groups]
    if grouping == "random":
        order = list(range(len(units)))
        random.Random(config.seed + level).shuffle(order)
        return [order[i: i + size] for i in range(0, len(order), size)]
    similarity = cosine_similarity(plan.base, [u.spec for u in units], plan.merged)
    logger.info("Level %d: cosine similarity of %s:\n%s", level, [u.name for u in units], similarity)
    return partition(similarity, size)


def _group_plan(plan: MergePlan, members: list[Unit]) -> MergePlan:
    """A level's plan over `members`: what the flat plan merges, each task with its own head."""
    tasks = [t for u in members for t in u.tasks]
    return build_plan(plan.base, [u.spec for u in members], tasks, plan.granularity,
                      source_names=[u.name for u in members], task_specs={t: plan.task_specs[t] for t in tasks},
                      task_rows={t: i for i, u in enumerate(members) for t in u.tasks}, merged=plan.merged)


def group_result_name(members: list[str]) -> str:
    """The name of a group's merged result as a source of the next level: `(a+b)`."""
    return "(" + "+".join(members) + ")"


def _next_unit(plan: MergePlan, members: list[Unit], merged: dict, folder: Path, dtype: torch.dtype) -> Unit:
    plan.base.build(merged, dtype).save_pretrained(folder)
    return Unit(group_result_name([u.name for u in members]), ModelSpec.from_folder(folder),
                [t for u in members for t in u.tasks], original=False)


def fit_hierarchical(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod, splits: Splits, *,
                     accelerator: Accelerator) -> tuple[LearnResult, list[dict[str, Any]]]:
    """Learn level by level: the last level's result (with each task's own fine-tune metrics) and per level and
    group `{"level", "group" (member names), "selected_step", "coefficients"}`."""
    flat, dtype = dataclasses.replace(config, hierarchical=None), config.compute_dtype
    units, levels, finetunes = [Unit(t, s, [t]) for t, s in zip(plan.tasks, plan.sources)], [], {}
    with tempfile.TemporaryDirectory(prefix="supermerge-levels-") as workdir:
        for level in range(len(units)):
            groups = [[units[i] for i in g] for g in group_units(units, level, config, plan)]
            logger.info("Level %d: groups %s", level, [[u.name for u in g] for g in groups])
            next_units = []
            for g, members in enumerate(groups):
                if len(members) == 1 and len(groups) > 1:
                    next_units.append(members[0])
                    continue
                sub = _group_plan(plan, members)
                result = learn(sub, flat, method, {t: splits[t] for t in sub.tasks},
                               torch.Generator().manual_seed(config.seed + level), accelerator=accelerator,
                               finetune_tasks=[u.tasks[0] for u in members if u.original])
                finetunes |= {t: m["finetune"] for t, m in result.metrics.items() if m["finetune"] is not None}
                levels.append({"level": level, "group": sub.source_names, "selected_step": result.selected_step,
                               "coefficients": result.coefficients})
                if len(groups) == 1:
                    metrics = {t: m | {"finetune": finetunes[t]} for t, m in result.metrics.items()}
                    return dataclasses.replace(result, metrics=metrics), levels
                next_units.append(_next_unit(plan, members, result.merged, Path(workdir) / f"{level}-{g}", dtype))
                del result
                release_memory()  # else glibc keeps this group's task vectors under the next group's
            units = next_units
    raise AssertionError("unreachable: the last level has one group")


def fit_extension(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod, splits: Splits,
                  deployed: dict[str, torch.Tensor], levels: list[dict[str, Any]], *,
                  accelerator: Accelerator) -> tuple[LearnResult, list[dict[str, Any]]]:
    """The cheap way to add the plan's last task to a deployed merge of the others: that merge (`deployed`, the
    tensors its `levels` rebuild; one level for a flat merge) as one source, its task vector, beside the new
    fine-tune: two rows to learn. Returns the result and the levels (the deployed ones, then this one)."""
    with tempfile.TemporaryDirectory(prefix="supermerge-deployed-") as workdir:  # held as `rebuild` holds it
        plan.base.build(deployed, config.compute_dtype).save_pretrained(workdir)
        members = [Unit(group_result_name(levels[-1]["group"]), ModelSpec.from_folder(workdir), plan.tasks[:-1],
                        original=False), Unit(plan.tasks[-1], plan.sources[-1], [plan.tasks[-1]])]
        sub = _group_plan(plan, members)
        result = learn(sub, dataclasses.replace(config, hierarchical=None), method, splits,
                       torch.Generator().manual_seed(config.seed), accelerator=accelerator,
                       finetune_tasks=sub.tasks[-1:])
    level = {"level": levels[-1]["level"] + 1, "group": sub.source_names, "selected_step": result.selected_step,
             "coefficients": result.coefficients}
    return result, [*levels, level]


def growth(old: MergeResult, origin: ResolvedSource, folder: Path, plan: MergePlan, *, cheap: bool) -> dict[str, Any]:
    """How learning starts when `plan` adds its last task to the deployed merge `old` (saved in `folder`, resolved
    as `origin`): `extends` (the lineage saved with the new merge), `origin` (that folder, never to be written),
    and `deployed` and `levels` (cheap: that merge as one source, see `fit_extension`) or `init` (c `(S, G)`: the
    old rows, the new one at `init_coefficient`)."""
    extends = {"merge": origin.repo_id or str(origin.path), "commit": origin.commit, "tasks": old.plan.tasks,
               "form": "cheap" if cheap else "incremental"}
    if cheap:
        levels = old.levels or [{"level": 0, "group": old.plan.source_names, "selected_step": old.selected_step,
                                 "coefficients": old.coefficients}]
        return {"extends": extends, "origin": folder, "deployed": old.merged, "levels": levels}
    rows = old.coefficients.aligned(old.plan.source_names, plan.groups)  # (S - 1, G)
    fresh = torch.full((1, len(plan.groups)), old.config.init_coefficient)
    return {"extends": extends, "origin": folder, "init": torch.cat([rows, fresh])}


def rebuild(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod,
            levels: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The merged tensors of a hierarchical merge, from the flat plan and every level's saved coefficients."""
    units, merged = {t: Unit(t, s, [t]) for t, s in zip(plan.tasks, plan.sources)}, {}
    with tempfile.TemporaryDirectory(prefix="supermerge-rebuild-") as workdir:
        for i, record in enumerate(levels):
            unknown = [name for name in record["group"] if name not in units]
            if unknown:
                raise ValueError(f"Level {record['level']} merges {unknown}, which no earlier level produced.")
            members = [units.pop(name) for name in record["group"]]
            sub, table = _group_plan(plan, members), record["coefficients"]
            table = Coefficients.from_dict(table) if isinstance(table, dict) else table
            merged = functional_merge(sub, config, method).params(table.aligned(sub.source_names, sub.groups),
                                                                  dense=True)
            if i + 1 < len(levels):
                unit = _next_unit(plan, members, merged, Path(workdir) / str(i), config.compute_dtype)
                units[unit.name] = unit
    return merged
