"""Hierarchical SuperMerge (method.md section 4): merge groups of similar sources, then the group results.

Each level holds at most `group_size` task vectors plus the base. A group's result is written as a checkpoint
of the base's architecture and becomes a source of the next level that carries all of its group's tasks (each
task keeps its own architecture and head). With `group_size` >= the number of sources it is the flat merge.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .deltas import LowRankDelta
from .memory import release_memory
from .task_vectors import ModelSpec, build_plan

if TYPE_CHECKING:
    from .examples import Example
    from .merger import SuperMerger

logger = logging.getLogger(__name__)


@dataclass
class Unit:
    """A source of one level: an original fine-tune, or a group result carrying several tasks."""

    name: str
    spec: Any  # ModelSpec or LoraSpec
    tasks: list[str]


SIMILARITY_CHUNK = 2**20  # elements per float64 product: (K, chunk) at a time, not (K, n)


def cosine_similarity(base: ModelSpec, specs: list, names: list[str]) -> torch.Tensor:
    """Cosine similarity `(K, K)` of the flattened task vectors, accumulated one tensor (and chunk) at a time."""
    gram = torch.zeros(len(specs), len(specs), dtype=torch.float64)
    for name in names:
        theta = base.read_tensor(name).float()
        parts = [s.delta(name, theta) for s in specs]
        rows = [torch.zeros(theta.numel()) if p is None else
                (p.dense() if isinstance(p, LowRankDelta) else p).flatten().float() for p in parts]
        for start in range(0, theta.numel(), SIMILARITY_CHUNK):
            chunk = torch.stack([r[start : start + SIMILARITY_CHUNK] for r in rows]).double()  # (K, chunk)
            gram += chunk @ chunk.T
    norms = gram.diag().sqrt().clamp(min=1e-30)
    return gram / torch.outer(norms, norms)


def partition(similarity: torch.Tensor, group_size: int) -> list[list[int]]:
    """Average-linkage agglomerative grouping of the most similar units, no group larger than `group_size`."""
    groups = [[i] for i in range(similarity.shape[0])]
    while True:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if len(groups[a]) + len(groups[b]) > group_size:
                    continue
                score = float(similarity[groups[a]][:, groups[b]].mean())
                if best is None or score > best[0]:
                    best = (score, a, b)
        if best is None:
            return groups
        _, a, b = best
        groups[a] = groups[a] + groups.pop(b)


def group_units(units: list[Unit], level: int, merger: SuperMerger) -> list[list[int]]:
    """The groups of one level, by similarity, as the user gave them (first level), or at random."""
    options = merger.config.hierarchical
    size, grouping = options["group_size"], options.get("grouping", "similarity")
    if len(units) <= size:
        return [list(range(len(units)))]
    if grouping == "explicit" and level == 0:
        index = {u.name: i for i, u in enumerate(units)}
        return [[index[t] for t in group] for group in options["groups"]]
    if grouping == "random":
        order = list(range(len(units)))
        random.Random(merger.config.seed + level).shuffle(order)
        return [order[i : i + size] for i in range(0, len(order), size)]
    similarity = cosine_similarity(merger.plan.base, [u.spec for u in units], merger.plan.merged)
    logger.info("Level %d: cosine similarity of %s:\n%s", level, [u.name for u in units], similarity)
    return partition(similarity, size)


def fit_hierarchical(merger: SuperMerger, data: dict[str, list[Example]]) -> None:
    """Run the levels one after another; the last level's merge becomes `merger`'s result."""
    from .merger import SuperMerger

    plan, config = merger.plan, dataclasses.replace(merger.config, hierarchical=None)
    units = [Unit(t, s, [t]) for t, s in zip(plan.tasks, plan.sources)]
    merger.levels = []
    with tempfile.TemporaryDirectory(prefix="supermerge-levels-") as workdir:
        for level in range(len(units)):
            groups = group_units(units, level, merger)
            last = len(groups) == 1
            logger.info("Level %d: groups %s", level, [[units[i].name for i in g] for g in groups])
            next_units = []
            for g, members in enumerate([[units[i] for i in idx] for idx in groups]):
                if len(members) == 1 and not last:
                    next_units.append(members[0])
                    continue
                tasks = [t for u in members for t in u.tasks]
                sub_plan = build_plan(
                    plan.base, [u.spec for u in members], tasks, config.granularity,
                    source_names=[u.name for u in members],
                    task_specs={t: plan.task_specs[t] for t in tasks},
                    task_source={t: i for i, u in enumerate(members) for t in u.tasks},
                )
                sub = SuperMerger.from_plan(config, sub_plan, accelerator=merger.accelerator)
                sub.fit_examples({t: data[t] for t in tasks})
                merger.levels.append({"level": level, "group": [u.name for u in members],
                                      "selected_step": sub.selected_step, "coefficients": sub.coefficients.to_dict()})
                if last:
                    merger.adopt(sub)
                    return
                folder = Path(workdir) / f"level{level}-group{g}"
                sub._functional = None  # drop this group's task vectors before building its checkpoint
                release_memory()  # else glibc keeps them, and the checkpoint and the next group come on top
                sub.merge_and_unload().save_pretrained(folder)
                next_units.append(Unit("(" + "+".join(u.name for u in members) + ")", ModelSpec.from_folder(folder),
                                       tasks))
                del sub  # its memory goes back to the OS when the next group's `learn` starts
            units = next_units
