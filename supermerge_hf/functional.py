"""The merged model as a function of the coefficients: forward, evaluation and the exact gradient of c."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .data import Example, collate
from .deltas import DeltaStack, LowRankDelta, Scratch, StreamedDelta
from .generative import AnswerMetrics, rank_accuracy
from .objectives import TEACHER, distillation_loss, entropy
from .plan import MergePlan, load_task_specific
from .sources import ModelSpec, Source

EVAL_BATCH = 32


def load_task_vectors(plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str, streaming: bool = False,
                      preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> tuple[dict[str, torch.Tensor] | None, dict[str, DeltaStack], Scratch | None]:
    """Base tensors and the task vectors of every merged tensor, read one tensor at a time; with `streaming` the
    base (`None`) and full fine-tunes are re-read into a `Scratch` when needed. `preprocess` maps each stack."""
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
            for tensor in (part.A, part.B) if isinstance(part, LowRankDelta) else [part]:
                if isinstance(tensor, torch.Tensor):
                    _finite(tensor, source, name)
        if not streaming:
            base[name] = theta_p
        parts = [p.to(device=device, dtype=dtype) if isinstance(p, (torch.Tensor, LowRankDelta)) else p for p in parts]
        deltas[name] = DeltaStack(theta_p.shape, parts, dtype=dtype)
    if preprocess is not None:
        deltas = {n: DeltaStack.from_dense(preprocess(d.dense())) for n, d in deltas.items()}
    return base, deltas, scratch


def _finite(tensor: torch.Tensor, source: Source, name: str) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{source.folder} holds NaN or Inf in {name!r}: nothing can be merged from it. Fix "
                                 "or re-save that checkpoint, or leave the source out.")
    return tensor


class LowRankLayer:
    """The LoRA factors of one weight, all sources side by side: y += ((x A^T) * (c s per rank)) B^T."""

    def __init__(self, parts: list[tuple[int, LowRankDelta]], group: int) -> None:
        self.group = group
        self.A = torch.cat([p.A for _, p in parts])  # (R, in), R = sum of the ranks
        self.B = torch.cat([p.B for _, p in parts], dim=1)  # (out, R)
        self.source = torch.tensor([i for i, p in parts for _ in range(p.A.shape[0])], device=self.A.device)  # (R,)
        self.scale = torch.tensor([p.scale for _, p in parts for _ in range(p.A.shape[0])], device=self.A.device)

    def __call__(self, module: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The summed low-rank update of the layer's output for input `x`; differentiable in `c` `(S, G)`."""
        weight = (c[self.source, self.group] * self.scale).to(self.A.dtype)  # (R,)
        hidden = F.embedding(x, self.A.T) if isinstance(module, nn.Embedding) else x @ self.A.T  # (..., R)
        return (hidden * weight) @ self.B.T  # (..., out)


def skeleton(spec: Source, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The task's architecture with real buffers and meta parameters, for `functional_call`."""
    with torch.device("meta"):
        model = spec.cls(spec.config)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    model.initialize_weights()  # fills the buffers (position ids, rotary frequencies); no-op on meta parameters
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype=dtype).eval()  # eval: dropout off while learning


class FunctionalMerge:
    """theta_m(c) = theta_p + sum_i c_i * tau_i, run per task with that task's architecture and head.

    Holds the base and the task vectors (dense: ~S + 1 model copies; LoRA: factors; streaming: neither), one
    parameter-free skeleton and the head of each task. LoRA layers are never densified while learning: a forward
    hook adds sum_i c_i s_i B_i (A_i x).
    """

    def __init__(self, plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, streaming: bool = False) -> None:
        self.plan, self.device, self.dtype, self.streaming = plan, device, dtype, streaming
        self.base, self.deltas, self.scratch = load_task_vectors(plan, dtype=dtype, device=device,
                                                                 streaming=streaming, preprocess=preprocess)
        self.models = {t: skeleton(s, device, dtype) for t, s in plan.task_specs.items()}
        self.heads = {t: load_task_specific(plan, t, dtype=dtype, device=device) for t in plan.task_specs}
        self.pad_id = getattr(plan.base.config, "pad_token_id", None) or 0
        self._lowrank_c: torch.Tensor | None = None  # the coefficients, only during a forward
        self._buffers: dict[str, torch.Tensor] = {}  # merged tensors reused by every no-grad merge
        self.lowrank = self._hook_lowrank_layers()
        # what `params` forms densely: every task vector but the LoRA ones the hooks apply
        self.dense_deltas = {n: DeltaStack(d.shape, [None if isinstance(p, LowRankDelta) else p for p in d.parts],
                                           dtype=dtype) if n in self.lowrank else d for n, d in self.deltas.items()}

    def _hook_lowrank_layers(self) -> dict[str, LowRankLayer]:
        """Hook each LoRA-targeted layer of every skeleton (a tied weight stays dense: a hook misses the other use)."""
        layers = {}
        for name in self.plan.merged:
            parts = [(i, p) for i, p in enumerate(self.deltas[name].parts) if isinstance(p, LowRankDelta)]
            row_groups = isinstance(self.plan.group_index[name], slice)  # per-row c: merged densely instead
            modules = [self._owner(task, name) for task in self.models] if parts and not row_groups else [None]
            if all(m is not None for m in modules):
                layers[name] = layer = LowRankLayer(parts, self.plan.group_index[name])
                for module in modules:
                    module.register_forward_hook(
                        lambda m, args, out, layer=layer: out if self._lowrank_c is None
                        else out + layer(m, args[0], self._lowrank_c))
        return layers

    def _owner(self, task: str, name: str) -> nn.Module | None:
        """The one Linear / Conv1D / Embedding whose `weight` is tensor `name` in the task's skeleton."""
        param = self.plan.task_specs[task].param_names.get(name)
        if param is None or not param.endswith(".weight"):
            return None
        model = self.models[task]
        module = model.get_submodule(param.rsplit(".", 1)[0]) if "." in param else model
        users = [m for m in model.modules() if getattr(m, "weight", None) is module.weight]
        return module if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) and len(users) == 1 else None

    def base_tensor(self, name: str) -> torch.Tensor:
        if self.base is not None:
            return self.base[name]
        return self.scratch.read(self.plan.base, name, self.plan.base.shapes[name], 0)

    def params(self, c: torch.Tensor, *, dense: bool = False) -> dict[str, torch.Tensor]:
        """Merged tensors for coefficients `c` `(S, G)`, written into reused tensors (overwritten by the next call).
        LoRA layers keep the base weight (`forward(..., c)` adds their update) unless `dense`: then every tensor
        is formed, in fresh tensors the caller owns."""
        out = {}
        for name, stack in (self.deltas if dense else self.dense_deltas).items():
            if stack.is_zero and self.base is not None:
                out[name] = self.base[name]
                continue
            if name not in self._buffers:
                self._buffers[name] = torch.empty(stack.shape, dtype=self.dtype, device=self.device)
            out[name] = stack.merge(self.base_tensor(name), c[:, self.plan.group_index[name]].detach(),
                                    out=self._buffers[name])
        if dense:
            self._buffers = {}  # handed over to the caller: the next merge allocates anew
        return out

    def forward(self, task: str, params: Mapping[str, torch.Tensor], batch: list[Example] | dict,
                c: torch.Tensor | None = None):
        """The task's model output on a batch, with `params`, its head and (params from `params(c)`) LoRA's update."""
        names = self.plan.task_specs[task].param_names
        weights = {names[n]: params[n] for n in self.plan.merged if n in names} | self.heads[task]
        inputs = collate(batch, self.pad_id) if isinstance(batch, list) else batch
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        self._lowrank_c = c if self.lowrank else None
        try:
            return torch.func.functional_call(self.models[task], weights, (), inputs)
        finally:
            self._lowrank_c = None

    @torch.no_grad()
    def evaluate(self, task: str, examples: list[Example], *, c: torch.Tensor | None = None,
                 params: Mapping[str, torch.Tensor] | None = None, batch_size: int = EVAL_BATCH) -> dict[str, float]:
        """Mean loss, entropy and (classification) accuracy of coefficients `c` or complete tensors `params`; of a
        generative task, the loss per answer token, greedy `exact_match` and rank-classification `accuracy` over the
        examples with choices (`generative.py`)."""
        params = self.params(c) if params is None else params
        model = self.models[task]
        answers = AnswerMetrics(shift=not model.config.is_encoder_decoder) if model.can_generate() else None
        totals, n = {"loss": 0.0, "entropy": 0.0, "correct": 0.0}, len(examples)
        classification = True
        for i in range(0, n, batch_size):
            size = len(examples[i: i + batch_size])
            inputs = collate(examples[i: i + batch_size], self.pad_id)
            out = self.forward(task, params, inputs, c)
            totals["entropy"] += float(entropy(out.logits, inputs.get("attention_mask"))) * size
            if "labels" in inputs:
                labels = inputs["labels"].to(out.logits.device)
                totals["loss"] += float(out.loss) * size
                if answers is not None:
                    answers.add(out.logits, labels)
                classification = classification and out.logits.dim() == 2 and labels.dim() == 1
                if classification:
                    totals["correct"] += float((out.logits.argmax(-1) == labels).sum())
        metrics = {"entropy": totals["entropy"] / n}
        if "labels" in examples[0]:
            metrics["loss"] = totals["loss"] / n
            if classification:
                metrics["accuracy"] = totals["correct"] / n
            if answers is not None:
                ranked = rank_accuracy(examples, lambda batch: self.forward(task, params, batch, c).logits,
                                       shift=answers.shift, pad_id=self.pad_id, batch_size=batch_size)
                metrics |= answers.result() | ({} if ranked is None else {"accuracy": ranked})
        return metrics

    def coefficient_grad(self, c: torch.Tensor, batches: Mapping[str, list[Example]], scale: Mapping[str, float],
                         objective: str = "supervised", *, temperature: float = 1.0,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(dL/dc (S, G), {task: loss})` of L = sum_t scale[t] * loss_t, one backward per task through the merged
        model only: each merged tensor's gradient is folded into dL/dc[i, g] = sum_{j in g} <dL/dtheta_m[j],
        tau_ij> (method.md section 3) as backward produces it, then freed; LoRA layers get theirs by autograd
        through c. `objective`: the model's loss, or (labels unread) `entropy` over real tokens or `distill`, the
        KL from the logits each example carries in `teacher_logits` at `temperature`. Empty batches are skipped."""
        merged = self.params(c.detach())
        leaves = [n for n in merged if not self.dense_deltas[n].is_zero]  # all-zero task vectors: dL/dc = 0
        for name in leaves:
            merged[name].requires_grad_()
        c_lowrank = c.detach().clone().requires_grad_() if self.lowrank else None
        grad_c = torch.zeros(self.plan.num_sources, len(self.plan.groups), device=self.device)  # (S, G) float32
        hooks = [merged[n].register_post_accumulate_grad_hook(self._fold_grad(n, grad_c)) for n in leaves]
        inputs = [merged[n] for n in leaves] + ([c_lowrank] if c_lowrank is not None else [])
        losses = {}
        try:
            for task, batch in batches.items():
                if not batch:
                    continue
                if objective in ("entropy", "distill"):
                    batch = collate([{k: v for k, v in ex.items() if k != "labels"} for ex in batch], self.pad_id)
                    teacher, mask = batch.pop(TEACHER, None), batch.get("attention_mask")
                    logits = self.forward(task, merged, batch, c_lowrank).logits  # (B, C) or (B, T, V)
                    loss = entropy(logits, mask) if objective == "entropy" else \
                        distillation_loss(logits, teacher.to(logits.device), temperature, mask)
                else:
                    loss = self.forward(task, merged, batch, c_lowrank).loss
                if inputs:
                    torch.autograd.backward(scale[task] * loss, inputs=inputs)
                losses[task] = loss.detach()
        finally:
            for hook in hooks:
                hook.remove()
            for name in leaves:
                merged[name].requires_grad_(False)
        if c_lowrank is not None and c_lowrank.grad is not None:
            grad_c += c_lowrank.grad.float()
        return grad_c, losses

    def _fold_grad(self, name: str, grad_c: torch.Tensor):
        group, stack = self.plan.group_index[name], self.dense_deltas[name]
        per_row = isinstance(group, slice)  # `row` granularity: one coefficient per row of the tensor

        def hook(tensor: torch.Tensor) -> None:
            grad_c[:, group] += stack.inner(tensor.grad, per_row=per_row).to(grad_c.device)  # (S,) or (S, R)
            tensor.grad = None

        return hook


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps freed blocks below its mmap threshold, so
    a finished hierarchical group would stay in the process under the next one)."""
    gc.collect()
    if _malloc_trim() is not None:
        _malloc_trim()(0)
