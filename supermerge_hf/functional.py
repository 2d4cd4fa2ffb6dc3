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
from .deltas import DeltaStack, LowRankDelta, ScaleDelta
from .generative import answer_batch
from .scoring import AnswerMetrics, rank_accuracy
from .objectives import TEACHER, answer_distillation, entropy, output_logits
from .plan import MergePlan, load_task_specific
from .ia3 import hook_scale_layers
from .sources import Source
from .task_vectors import load_task_vectors

EVAL_BATCH = 32


class LowRankLayer:
    """The LoRA factors of one weight, all sources side by side: y += ((x A^T) * (c s per rank)) B^T. With one
    coefficient per row of the stored weight (`group` a slice), c scales the output features (`(out, in)`
    weights) or, for transposed `(in, out)` ones (Conv1D), the input features, source by source. With one per
    singular direction (`directions`: factors from `LowRankDelta.singular`, rank k of source i is its direction k),
    c scales each rank."""

    def __init__(self, parts: list[tuple[int, LowRankDelta]], group: int | slice, directions: bool = False) -> None:
        self.group, self.transpose = group, parts[0][1].transpose
        self.A = torch.cat([p.A for _, p in parts])  # (R, in), R = sum of the ranks
        self.B = torch.cat([p.B for _, p in parts], dim=1)  # (out, R)
        self.source = torch.tensor([i for i, p in parts for _ in range(p.A.shape[0])], device=self.A.device)  # (R,)
        self.scale = torch.tensor([p.scale for _, p in parts for _ in range(p.A.shape[0])], device=self.A.device)
        ends = torch.cumsum(torch.tensor([p.A.shape[0] for _, p in parts]), 0).tolist()
        self.spans = [(i, end - p.A.shape[0], end) for (i, p), end in zip(parts, ends)]  # (source, first, end rank)
        self.columns = torch.tensor([group.start + k for _, p in parts for k in range(p.A.shape[0])],
                                    device=self.A.device) if directions else None  # (R,): each rank's group

    def __call__(self, module: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The summed low-rank update of the layer's output for input `x`; differentiable in `c` `(S, G)`."""
        if isinstance(self.group, slice) and self.columns is None:  # per row: sum_i c_i * (s_i B_i A_i x)
            out = 0.0  # c_i on the outputs (transposed: on the inputs)
            for i, lo, hi in self.spans:
                ci = c[i, self.group].to(self.A.dtype)  # (rows,)
                y = ((x * ci if self.transpose else x) @ self.A[lo:hi].T * self.scale[lo]) @ self.B[:, lo:hi].T
                out = out + (y if self.transpose else y * ci)  # (..., out)
            return out
        column = self.group if self.columns is None else self.columns  # per singular direction: one per rank
        weight = (c[self.source, column] * self.scale).to(self.A.dtype)  # (R,)
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

    Holds the base and the task vectors (dense: ~S + 1 model copies; LoRA: factors; IA³: vectors; streaming:
    neither), one parameter-free skeleton and the head of each task. LoRA layers are never densified while
    learning: a forward hook adds sum_i c_i s_i B_i (A_i x); nor are IA³ ones: a hook scales the layer's input or
    output by l(c) = 1 + sum_i c_i (l_i - 1) (`ia3.hook_scale_layers`).
    """

    def __init__(self, plan: MergePlan, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                 preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None, streaming: bool = False) -> None:
        self.plan, self.device, self.dtype, self.streaming = plan, device, dtype, streaming
        self.base, self.deltas, self.scratch = load_task_vectors(plan, dtype=dtype, device=device,
                                                                 streaming=streaming, preprocess=preprocess)
        self.models = {t: skeleton(s, device, dtype) for t, s in plan.task_specs.items()}
        self.heads = {t: load_task_specific(plan, t, dtype=dtype, device=device) for t in plan.task_specs}
        self.pad_id = getattr(plan.base.config, "pad_token_id", None) or 0
        self._adapter_c: torch.Tensor | None = None  # the coefficients, only during a forward
        self._buffers: dict[str, torch.Tensor] = {}  # merged tensors reused by every no-grad merge
        self.lowrank = self._hook_lowrank_layers()
        self.scaled = hook_scale_layers(self.deltas, plan.group_index,
                                        lambda n: [self._owner(t, n) for t in self.models], lambda: self._adapter_c)
        # what `params` forms densely: every task vector but the LoRA and IA³ ones the hooks apply
        hooked = {n: LowRankDelta for n in self.lowrank} | {n: ScaleDelta for h in self.scaled.values()
                                                           for n in h.names}
        self.dense_deltas = {n: DeltaStack(d.shape, [None if isinstance(p, hooked[n]) else p for p in d.parts],
                                           dtype=dtype) if n in hooked else d for n, d in self.deltas.items()}

    def _hook_lowrank_layers(self) -> dict[str, LowRankLayer]:
        """Hook each LoRA-targeted layer of every skeleton (a tied weight stays dense: a hook misses the other use)."""
        layers = {}
        for name in self.plan.merged:
            parts = [(i, p) for i, p in enumerate(self.deltas[name].parts) if isinstance(p, LowRankDelta)]
            modules = [self._owner(task, name) for task in self.models] if parts else [None]
            directions = self.plan.directions(name)
            per_row_embedding = isinstance(self.plan.group_index[name], slice) and not directions and \
                any(isinstance(m, nn.Embedding) for m in modules)  # rows are token ids there: merged densely
            if all(m is not None for m in modules) and not per_row_embedding:
                layers[name] = layer = LowRankLayer(parts, self.plan.group_index[name], directions)
                for module in modules:
                    module.register_forward_hook(
                        lambda m, args, out, layer=layer: out if self._adapter_c is None
                        else out + layer(m, args[0], self._adapter_c))
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
        LoRA and IA³ layers keep the base weight (`forward(..., c)` applies them) unless `dense`: then every tensor
        is formed, in fresh tensors the caller owns."""
        out = {}
        for name, stack in (self.deltas if dense else self.dense_deltas).items():
            if stack.is_zero and self.base is not None:
                out[name] = self.base[name]
                continue
            if name not in self._buffers:
                self._buffers[name] = torch.empty(stack.shape, dtype=self.dtype, device=self.device)
            out[name] = stack.merge(self.base_tensor(name), c[:, self.plan.group_index[name]].detach(),
                                    out=self._buffers[name], directions=self.plan.directions(name))
        if dense:
            self._buffers = {}  # handed over to the caller: the next merge allocates anew
        return out

    def forward(self, task: str, params: Mapping[str, torch.Tensor], batch: list[Example] | dict,
                c: torch.Tensor | None = None):
        """The task's model output on a batch, with `params`, its head and (params from `params(c)`) LoRA's update."""
        names = self.plan.task_specs[task].param_names
        weights = {names[n]: params[n] for n in self.plan.merged if n in names} | self.heads[task]
        inputs = collate(batch, self.pad_id) if isinstance(batch, list) else batch
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # a KV cache
        self._adapter_c = c if self.lowrank or self.scaled else None
        try:
            return torch.func.functional_call(self.models[task], weights, (), inputs)
        finally:
            self._adapter_c = None

    @torch.no_grad()
    def evaluate(self, task: str, examples: list[Example], *, c: torch.Tensor | None = None,
                 params: Mapping[str, torch.Tensor] | None = None, batch_size: int = EVAL_BATCH) -> dict[str, float]:
        """Mean loss, entropy and (classification) accuracy of coefficients `c` or complete tensors `params`; of a
        generative task, the loss and entropy per answer token, greedy `exact_match` and rank-classification
        `accuracy` over the examples with choices (`generative.py`)."""
        params = self.params(c) if params is None else params
        model = self.models[task]
        answers = AnswerMetrics(shift=not model.config.is_encoder_decoder) if model.can_generate() else None
        totals, n = {"loss": 0.0, "entropy": 0.0, "correct": 0.0}, len(examples)
        classification = True
        for i in range(0, n, batch_size):
            size = len(examples[i: i + batch_size])
            inputs, mask = answer_batch(examples[i: i + batch_size], model, self.pad_id, labels=True)  # mask (B, T)
            out = self.forward(task, params, inputs, c)
            logits = output_logits(out)  # (B, C) or (B, T, V)
            totals["entropy"] += float(entropy(logits, mask)) * size
            if "labels" in inputs:
                labels = inputs["labels"].to(logits.device)
                totals["loss"] += float(out.loss) * size
                if answers is not None:
                    answers.add(logits, labels)
                classification = classification and logits.dim() == 2 and labels.dim() == 1
                if classification:
                    totals["correct"] += float((logits.argmax(-1) == labels).sum())
        metrics = {"entropy": totals["entropy"] / n}
        if "labels" in examples[0]:
            metrics["loss"] = totals["loss"] / n
            if classification:
                metrics["accuracy"] = totals["correct"] / n
            if answers is not None:
                ranked = rank_accuracy(examples, lambda batch: self.forward(task, params, batch, c),
                                       shift=answers.shift, pad_id=self.pad_id, batch_size=batch_size)
                metrics |= answers.result() | ({} if ranked is None else {"accuracy": ranked})
        return metrics

    def coefficient_grad(self, c: torch.Tensor, batches: Mapping[str, list[Example]], scale: Mapping[str, float],
                         objective: str = "supervised", *, temperature: float = 1.0,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(dL/dc (S, G), {task: loss})` of L = sum_t scale[t] * loss_t, one backward per task through the merged
        model only: each merged tensor's gradient is folded into dL/dc[i, g] = sum_{j in g} <dL/dtheta_m[j],
        tau_ij> (method.md section 3) as backward produces it, then freed; LoRA, IA³ layers get theirs by autograd
        through c. `objective`: the model's loss, or (labels unread) `entropy` or `distill` (the KL from the logits
        each example carries in `teacher_logits` at `temperature`) over answer tokens. Empty batches are skipped."""
        merged = self.params(c.detach())
        leaves = [n for n in merged if not self.dense_deltas[n].is_zero]  # all-zero task vectors: dL/dc = 0
        for name in leaves:
            merged[name].requires_grad_()
        c_adapter = c.detach().clone().requires_grad_() if self.lowrank or self.scaled else None
        grad_c = torch.zeros(self.plan.num_sources, len(self.plan.groups), device=self.device)  # (S, G) float32
        hooks = [merged[n].register_post_accumulate_grad_hook(self._fold_grad(n, grad_c)) for n in leaves]
        inputs = [merged[n] for n in leaves] + ([c_adapter] if c_adapter is not None else [])
        losses = {}
        try:
            for task, batch in batches.items():
                if not batch:
                    continue
                if objective in ("entropy", "distill"):
                    batch, mask = answer_batch(batch, self.models[task], self.pad_id)  # mask (B, T)
                    teacher = batch.pop(TEACHER, None)
                    logits = output_logits(self.forward(task, merged, batch, c_adapter))  # (B, C) or (B, T, V)
                    loss = entropy(logits, mask) if objective == "entropy" else \
                        answer_distillation(logits, teacher, temperature, mask)
                else:
                    loss = self.forward(task, merged, batch, c_adapter).loss
                if inputs:
                    torch.autograd.backward(scale[task] * loss, inputs=inputs)
                losses[task] = loss.detach()
        finally:
            for hook in hooks:
                hook.remove()
            for name in leaves:
                merged[name].requires_grad_(False)
        if c_adapter is not None and c_adapter.grad is not None:
            grad_c += c_adapter.grad.float()
        return grad_c, losses

    def _fold_grad(self, name: str, grad_c: torch.Tensor):
        group, stack = self.plan.group_index[name], self.dense_deltas[name]
        directions = group.stop - group.start if self.plan.directions(name) else 0  # `singular`: one per direction
        per_row = isinstance(group, slice) and not directions  # `row`: one coefficient per row of the tensor

        def hook(tensor: torch.Tensor) -> None:  # (S,), (S, R) or (S, k): s_ik u_ik^T grad v_ik
            grad_c[:, group] += stack.inner(tensor.grad, per_row=per_row, directions=directions).to(grad_c.device)
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
