"""Teachers for output distillation (method.md section 9): each task's fine-tune, on that task's inputs.

A task's teacher is its own source alone (base + its task vector, with its head), run once over the task's inputs
and streamed from disk tensor by tensor: one fine-tune at a time is ever in memory, and learning keeps only the
logits, which `objectives.distillation_loss` compares with the merge's. Those are C numbers per example for a
classifier, but T x vocabulary for a language model: there, the inputs given bound the cache's size.
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
    (on the CPU; per token, cut to the example's length, the answer's in an encoder-decoder). In place, so that a
    hierarchical merge, whose levels share these examples, computes them once. The teacher is
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
            batch, _ = answer_batch(chunk, fm.models[task], fm.pad_id)  # as the merge will read them
            logits = output_logits(fm.forward(task, params, batch, c))  # (B, C) / (B, T, V)
            for ex, row in zip(chunk, logits):
                decoded = ex["labels"] if "decoder_input_ids" in batch else None  # the decoder's length
                length = len(ex.get("input_ids", ex.get("inputs_embeds", row)) if decoded is None else decoded)
                ex[TEACHER] = (row[:length] if logits.dim() == 3 else row).cpu()
        del fm, params
        release_memory()
