"""ProDistill (method.md section 9; Xu et al., ICML 2025): element-wise coefficients, one tensor of each
parameter's shape per source, learned one transformer block at a time by feature distillation.

Block b (in the order the blocks run) is merged as W = W_base + Σ_i c_i ⊙ τ_i with c_i starting at
`init_coefficient`. Fed the merged model's own input to block b on task i's inputs (blocks before b already
merged), it should reproduce fine-tune i's output of block b on its own activations: Adam on the mean squared
error over real tokens (padding masked), summed over tasks, for `block_steps` full-batch steps at `lr`, keeping
the step of lowest loss. Per block, its inputs through the merged blocks and each fine-tune's output are
captured once (a hook stops the model at that block), so a step runs that block alone. Tensors outside numbered
blocks (embeddings, final norms) take the mean of the fine-tunes. The result is one dense merge; the element-wise
coefficients (S x the blocks' parameters; their count and float32 size are logged) are not kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from .config import SuperMergeConfig
from .data import Example, collate
from .functional import FunctionalMerge
from .gram import check_inputs, finetune_weights, merge_steps
from .methods import MergeMethod
from .plan import MergePlan, block_name

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook once the block of interest has run: the rest of the model is not needed."""


def block_path(plan: MergePlan, task: str, names: list[str]) -> str:
    """The path of the block holding `names` in the task's model (a classifier names its body `bert.*`)."""
    name = names[0]
    param = plan.task_specs[task].param_names[name]
    return param[: len(param) - len(name) + len(block_name(name))]


@torch.no_grad()
def capture(fm: FunctionalMerge, task: str, weights: Mapping[str, torch.Tensor], batches: list[dict],
            path: str, *, output: bool) -> list:
    """Per batch, what block `path` of the task's model receives, `(args, kwargs)`, or (`output`) its hidden states,
    with the model running on `weights`; the forward stops there."""
    found = []

    def inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:  # a KV cache would grow at every call
        found.append((args, {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}))
        raise _Stop

    def outputs(module: nn.Module, args: tuple, out) -> None:
        found.append((out[0] if isinstance(out, tuple) else out).detach())
        raise _Stop

    module = fm.models[task].get_submodule(path)
    handle = module.register_forward_hook(outputs) if output else \
        module.register_forward_pre_hook(inputs, with_kwargs=True)
    try:
        for batch in batches:
            try:
                fm.forward(task, weights, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return found


def real_positions(batch: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """`(B, T)` 1 where a block output `out` `(B, T, H)` is a real token (the batch's padding mask when it has the
    output's length, e.g. not a decoder block of an encoder-decoder), else everywhere."""
    mask = batch.get("attention_mask")
    return mask.to(out.dtype) if mask is not None and mask.shape == out.shape[:2] else out.new_ones(out.shape[:2])


def learn_block(fm: FunctionalMerge, names: list[str], io: Mapping[str, tuple[str, list, list]],
                kwargs: Mapping[str, float], init: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """The merged tensors `names` of one block and its distillation loss at the start and at the kept step. `io`:
    per task, (the block's path, its captured inputs, the fine-tune's block outputs)."""
    plan = fm.plan
    deltas = {n: fm.deltas[n].dense().clone() for n in names}  # (S, *shape); streamed reads reuse one buffer
    base = {n: fm.base_tensor(n).clone() for n in names}
    c = {n: nn.Parameter(torch.full_like(d, init)) for n, d in deltas.items()}  # element-wise, one per source
    optimizer = torch.optim.Adam(c.values(), lr=kwargs["lr"])
    best, first, kept = float("inf"), None, {}
    for _ in range(kwargs["block_steps"] + 1):
        merged = {n: base[n] + (c[n] * deltas[n]).sum(0) for n in names}
        loss = torch.zeros((), device=fm.device)
        for task, (path, inputs, targets) in io.items():
            local = {plan.task_specs[task].param_names[n][len(path) + 1:]: t for n, t in merged.items()}
            local |= {k[len(path) + 1:]: v for k, v in fm.heads[task].items() if k.startswith(path + ".")}
            block = fm.models[task].get_submodule(path)
            for (args, kw), (target, mask) in zip(inputs, targets):
                out = torch.func.functional_call(block, local, args, kw)
                error = ((out[0] if isinstance(out, tuple) else out) - target) ** 2  # (B, T, H)
                loss = loss + (error * mask[..., None]).sum() / (mask.sum() * error.shape[-1]) / len(inputs)
        value = float(loss.detach())
        first = value if first is None else first
        if value < best:
            best, kept = value, {n: t.detach().clone() for n, t in merged.items()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return kept, first, best


def merge_block_distill(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod,
                        inputs: Mapping[str, list[Example]], *,
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The merged tensors of `prodistill` from each task's `inputs` (the first `max_inputs`; labels unread)."""
    check_inputs(plan, method, inputs)
    kwargs = config.method_kwargs
    fm = FunctionalMerge(plan, dtype=config.compute_dtype, device=device, streaming=True)
    keep_labels = {t: fm.models[t].config.is_encoder_decoder for t in plan.tasks}
    batches = {t: [collate([ex if keep_labels[t] else {k: v for k, v in ex.items() if k != "labels"}
                            for ex in inputs[t][i: i + 32]], fm.pad_id)
                   for i in range(0, min(len(inputs[t]), kwargs["max_inputs"]), 32)] for t in plan.tasks}
    steps = merge_steps(plan.merged, sequential=True)
    blocks = [names for names in steps if block_name(names[0]).rpartition(".")[2].isdigit()]
    merged = {n: fm.base_tensor(n) + method.merge(fm.deltas[n].dense()).to(fm.dtype)
              for names in steps if names not in blocks for n in names}  # outside numbered blocks: the mean
    numbers = 0
    for names in tqdm(blocks, desc="prodistill: blocks"):
        io = {}
        for task in plan.tasks:
            path = block_path(plan, task, names)
            row = plan.task_rows[task]
            teacher = [(out, real_positions(batch, out)) for out, batch in zip(
                capture(fm, task, finetune_weights(fm, row, {}), batches[task], path, output=True), batches[task])]
            student = capture(fm, task, finetune_weights(fm, row, merged), batches[task], path, output=False)
            io[task] = (path, student, teacher)
        tensors, first, best = learn_block(fm, names, io, kwargs, config.init_coefficient)
        merged |= tensors
        numbers += plan.num_sources * sum(t.numel() for t in tensors.values())
        logger.info("prodistill: %s, feature MSE %.4g -> %.4g", block_name(names[0]), first, best)
    logger.info("prodistill: %d element-wise coefficients learned (%.1f MB in float32), not kept", numbers,
                numbers * 4 / 2**20)
    return merged
