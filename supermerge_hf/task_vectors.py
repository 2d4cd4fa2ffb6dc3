"""The task vectors of a plan's merged tensors, read one tensor at a time and checked finite: dense (full
fine-tunes, stacked), low-rank (LoRA), scales of the base (IA³; they hold the base tensor they scale, also when
streaming) or streamed from disk."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .deltas import DeltaStack, LowRankDelta, ScaleDelta, Scratch, StreamedDelta
from .plan import MergePlan
from .sources import ModelSpec, Source


def load_task_vectors(plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str, streaming: bool = False,
                      preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> tuple[dict[str, torch.Tensor] | None, dict[str, DeltaStack], Scratch | None]:
    """Base tensors and the task vectors of every merged tensor, read one tensor at a time; with `streaming` the
    base (`None`) and full fine-tunes are re-read into a `Scratch` when needed. `preprocess` maps each stack. Matrices
    with one coefficient per singular direction (`granularity: singular`) get their task vectors' SVDs, here."""
    shapes = plan.base.shapes
    scratch = Scratch(max(torch.Size(shapes[n]).numel() for n in plan.merged), dtype=dtype, device=device) \
        if streaming else None
    base, deltas = ({} if not streaming else None), {}
    all_full = all(type(s) is ModelSpec for s in plan.sources)
    for name in plan.merged:
        theta_p = _finite(plan.base.read_tensor(name), plan.base, name).to(device=device, dtype=dtype)  # (*shape)
        if streaming:
            for source in plan.sources:  # each full fine-tune read once here, to refuse NaN/Inf before learning
                if isinstance(source, ModelSpec):
                    _finite(source.read_tensor(name), source, name)
            parts = [StreamedDelta(s, plan.base, name, shapes[name], scratch) if isinstance(s, ModelSpec)
                     else s.delta(name, theta_p) for s in plan.sources]
        elif all_full:  # each fine-tune read straight into its row of one (S, *shape) stack, base subtracted
            stacked = torch.empty((len(plan.sources), *theta_p.shape), dtype=dtype, device=device)
            for row, source in zip(stacked, plan.sources):
                _finite(source.read_tensor(name, out=row), source, name).sub_(theta_p)
            base[name], deltas[name] = theta_p, DeltaStack.from_dense(stacked)
            continue
        else:
            parts = [s.delta(name, theta_p) for s in plan.sources]
        for source, part in zip(plan.sources, parts):
            for tensor in (part.A, part.B) if isinstance(part, LowRankDelta) else \
                    [part.vector] if isinstance(part, ScaleDelta) else [part]:
                if isinstance(tensor, torch.Tensor):
                    _finite(tensor, source, name)
        if not streaming:
            base[name] = theta_p
        parts = [p.to(device=device, dtype=dtype) if isinstance(p, (torch.Tensor, LowRankDelta, ScaleDelta)) else p
                 for p in parts]
        deltas[name] = DeltaStack(theta_p.shape, parts, dtype=dtype)
    if preprocess is not None:
        deltas = {n: DeltaStack.from_dense(preprocess(d.dense())) for n, d in deltas.items()}
    for name in [n for n in deltas if plan.directions(n)]:  # `singular`: factorised once, one matrix at a time
        deltas[name] = deltas[name].singular()
    return base, deltas, scratch


def _finite(tensor: torch.Tensor, source: Source, name: str) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{source.folder} holds NaN or Inf in {name!r}: nothing can be merged from it. Fix "
                                 "or re-save that checkpoint, or leave the source out.")
    return tensor
