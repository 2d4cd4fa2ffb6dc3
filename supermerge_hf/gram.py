"""Merges that read statistics of each task's inputs (`MergeMethod.statistics`): RegMean and RegMean++ (method.md
section 10), on every merged tensor that is the weight of one nn.Linear of the task models (or of a GPT-2 Conv1D,
whose weight is stored transposed, `(in, out)`).

A layer's G_i is the mean of x xᵀ over every input row x the layer sees while fine-tune i runs on task i's inputs
(the mean, as fusion-bench: a task with longer inputs weighs no more). `gram` (RegMean): every fine-tune whole, one
pass each. `gram_sequential` (RegMean++, as fusion-bench's `regmean_plusplus`): block by block (`plan.block_name`)
in the base's parameter order, which is the order the blocks run in; block b's G_i is taken with every block
before b already merged and fine-tune i's own from b on, so the inputs flow through the merged model so far.
Every other tensor (biases, norms, embeddings, a weight tied to a second module, a layer no input reached) takes
the mean of the fine-tunes, the method's merge without Gram matrices.

A batch holds examples of equal shapes only, so no padding enters a Gram matrix (fusion-bench's hooks count the
rows of padded positions too). The base and the fine-tunes are read from disk when needed (streaming): memory holds
one fine-tune's tensors, the merged ones, and the Gram matrices of the current step for every task.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .config import SuperMergeConfig
from .data import ASIDE, Example, collate
from .functional import EVAL_BATCH, FunctionalMerge
from .methods import MergeMethod
from .plan import MergePlan, block_name

logger = logging.getLogger(__name__)

Layers = dict[str, tuple[nn.Module, bool]]  # merged tensor -> (its module, stored (in, out): Conv1D)


def check_inputs(plan: MergePlan, method: MergeMethod, inputs: Mapping[str, list[Example]]) -> None:
    """`ValueError` (before any weight is read) for a task without inputs: its Gram matrices would be empty."""
    missing = [t for t in plan.tasks if not inputs.get(t)]
    if missing:
        raise ValueError(f"{method.name!r} merges each linear layer from the Gram matrices of its inputs on every "
                         f"task, and task(s) {missing} have no inputs: pass examples (their labels are not read) or "
                         "`unlabelled` inputs for every task.")


def linear_layers(fm: FunctionalMerge, task: str, names: list[str]) -> Layers:
    """The tensors of `names` that are the weight of exactly one nn.Linear / Conv1D of the task's model."""
    model, params = fm.models[task], fm.plan.task_specs[task].param_names
    users = Counter(id(m.weight) for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    layers = {}
    for name in names:
        param = params.get(name, "")
        module = model.get_submodule(param.rpartition(".")[0]) if param.endswith(".weight") else None
        if isinstance(module, (nn.Linear, Conv1D)) and users[id(module.weight)] == 1:  # tied: the mean
            layers[name] = (module, isinstance(module, Conv1D))
    return layers


def same_shape_batches(examples: list[Example], batch_size: int, *, keep_labels: bool) -> Iterator[list[Example]]:
    """Batches of at most `batch_size` examples whose model inputs have equal shapes: collated without padding.
    Labels are dropped (never read) unless `keep_labels` (an encoder-decoder's decoder runs on them)."""
    groups: dict[tuple, list[Example]] = {}
    for ex in examples:
        ex = ex if keep_labels else {k: v for k, v in ex.items() if k != "labels"}
        key = tuple(sorted((k, tuple(v.shape)) for k, v in ex.items() if not k.startswith(ASIDE)))
        groups.setdefault(key, []).append(ex)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i: i + batch_size]


@torch.no_grad()
def gram_matrices(fm: FunctionalMerge, task: str, weights: Mapping[str, torch.Tensor], examples: list[Example],
                  layers: Layers, *, batch_size: int = EVAL_BATCH) -> dict[str, torch.Tensor]:
    """G = Σ x xᵀ / N `(in, in)`, float32 or wider, of each layer of `layers` over the N rows x of its inputs while
    the task's model runs with the merged tensors `weights` on `examples`; a layer that saw none has no entry."""
    sums: dict[str, torch.Tensor] = {}
    rows: Counter[str] = Counter()

    def hook(name: str):
        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().flatten(0, -2)  # (N, in)
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            sums[name] = x.T @ x + sums[name] if name in sums else x.T @ x  # (in, in)
            rows[name] += x.shape[0]
        return add

    handles = [module.register_forward_hook(hook(name)) for name, (module, _) in layers.items()]
    keep_labels = fm.models[task].config.is_encoder_decoder
    try:
        for batch in same_shape_batches(examples, batch_size, keep_labels=keep_labels):
            fm.forward(task, weights, collate(batch, fm.pad_id))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / rows[name] for name, total in sums.items()}


def merge_steps(names: list[str], *, sequential: bool) -> list[list[str]]:
    """The merged tensors in the order they are decided: all at once, or (`sequential`) block by block."""
    if not sequential:
        return [list(names)]
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_name(name), []).append(name)
    return list(blocks.values())


def finetune_weights(fm: FunctionalMerge, row: int, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every merged tensor: its value in `merged` if already decided, else source `row`'s (base + its task vector)."""
    c = torch.zeros(fm.plan.num_sources, device=fm.device)  # (S,)
    c[row] = 1.0
    return {n: merged[n] if n in merged else fm.deltas[n].merge(fm.base_tensor(n), c) for n in fm.plan.merged}


def merge_with_statistics(plan: MergePlan, config: SuperMergeConfig, method: MergeMethod,
                          inputs: Mapping[str, list[Example]], *,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The merged tensors of a statistics method (`regmean`, `regmean_plusplus`) from each task's `inputs` (model
    inputs; labels are not read): each step's linear weights by `method.merge(deltas, grams=...)` on the Gram
    matrices of every task, in nn.Linear's `(out, in)` orientation, every other tensor by `method.merge(deltas)`.

    Raises:
        `ValueError`: A task without inputs; a singular Gram matrix (`regmean.regmean_merge`).
    """
    check_inputs(plan, method, inputs)
    fm = FunctionalMerge(plan, dtype=config.compute_dtype, device=device, streaming=True)
    steps = merge_steps(plan.merged, sequential=method.statistics == "gram_sequential")
    merged: dict[str, torch.Tensor] = {}
    for names in tqdm(steps, desc=f"{method.name}: Gram matrices", disable=len(steps) == 1):
        layers = {t: linear_layers(fm, t, names) for t in plan.tasks}
        grams: dict[str, dict[int, torch.Tensor]] = {}  # name -> source row -> (in, in)
        for task in plan.tasks if any(layers.values()) else []:
            row = plan.task_rows[task]
            weights = finetune_weights(fm, row, merged)
            for name, gram in gram_matrices(fm, task, weights, inputs[task], layers[task]).items():
                grams.setdefault(name, {})[row] = gram
            del weights
        linear = {n: transposed for t in plan.tasks for n, (_, transposed) in layers[t].items()}
        complete = {n for n, by_row in grams.items() if len(by_row) == plan.num_sources}
        if linear.keys() - complete:
            logger.info("%s: no input reached %s on every task: merged by the mean", method.name,
                        sorted(linear.keys() - complete))
        for name in names:
            deltas = fm.deltas[name].dense()  # (S, *shape)
            if name in complete:
                stacked = torch.stack([grams[name][row] for row in range(plan.num_sources)])  # (S, in, in)
                if linear[name]:  # Conv1D: (S, in, out) -> (S, out, in), and the merge back
                    deltas = deltas.transpose(1, 2)
                try:
                    delta = method.merge(deltas, grams=stacked, **config.method_kwargs)  # (out, in)
                except ValueError as err:
                    raise ValueError(f"{name!r}: {err}") from None
                delta = delta.T if linear[name] else delta  # (*shape)
            else:
                delta = method.merge(deltas, **config.method_kwargs)  # (*shape)
            merged[name] = fm.base_tensor(name) + delta.to(fm.dtype)
        logger.debug("%s: merged %s", method.name, names)
    return merged
