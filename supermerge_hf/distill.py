"""Teachers for output distillation (method.md section 9): each task's fine-tune, on that task's inputs.

A task's teacher is its own source alone (base + its task vector, with its head), run once over the task's inputs
and streamed from disk tensor by tensor: one fine-tune at a time is ever in memory, and learning keeps only the
logits, which `objectives.answer_distillation` compares with the merge's. Those are C numbers per example for a
classifier, and (answer tokens) x vocabulary for a language model: only the positions distillation averages over.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .data import Example
from .functional import EVAL_BATCH, FunctionalMerge, release_memory
from .generative import answer_batch
from .objectives import TEACHER, output_logits
from .plan import MergePlan, build_plan


@torch.no_grad()
def attach_teachers(plan: MergePlan, inputs: Mapping[str, list[Example]], *, dtype: torch.dtype,
                    device: torch.device | str = "cpu", batch_size: int = EVAL_BATCH) -> None:
    """Store on each example of `inputs[task]` that has none yet its fine-tune's logits, under `teacher_logits`
    (on the CPU; of a token model, those of its answer positions only `(A, V)`, as `answer_batch` marks them). In
    place, so that a hierarchical merge, whose levels share these examples, computes them once. The teacher is
    `plan.task_specs[task]`, the task's own source, in every level."""
    for task, examples in inputs.items():
        todo = [ex for ex in examples if TEACHER not in ex]
        if not todo:
            continue
        alone = build_plan(plan.base, [plan.task_specs[task]], [task], "tensor", merged=plan.merged)
        fm = FunctionalMerge(alone, dtype=dtype, device=device, streaming=True)
        c = torch.ones(1, len(alone.groups), device=device)  # (1, G): base + 1 * its task vector = the fine-tune
        params = fm.params(c)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            batch, mask = answer_batch(chunk, fm.models[task], fm.pad_id)  # as the merge will read them
            logits = output_logits(fm.forward(task, params, batch, c))  # (B, C) / (B, T, V)
            for k, (ex, row) in enumerate(zip(chunk, logits)):
                if logits.dim() == 3 and mask is not None:  # the answer positions only: (A, V)
                    row = row[mask[k].to(row.device).bool()]
                elif logits.dim() == 3:  # no answer mask: every position of the example
                    row = row[: len(ex.get("input_ids", ex.get("inputs_embeds", row)))]
                ex[TEACHER] = row.cpu()
        del fm, params
        release_memory()
