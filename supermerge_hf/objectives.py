"""The merged model as a function of the coefficients, its losses, and the exact gradient of the coefficients."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from transformers.pytorch_utils import Conv1D

from .examples import Example, collate
from .deltas import DeltaStack, LowRankDelta, StreamedDelta, load_task_vectors
from .memory import MergeBuffers
from .task_vectors import MergePlan, ModelSpec, load_task_specific

EVAL_BATCH = 32
Objective = Literal["supervised", "entropy"]


class Merged(dict):
    """Merged tensors `name -> tensor` for `FunctionalMerge.forward`.

    With `lowrank_c` set (the coefficients `(S, G)`), the LoRA-targeted layers hold only their base weight plus
    any dense part, and each layer adds sum_i c_i s_i B_i (A_i x) to its output during the forward (method.md
    section 5): no dense delta of those layers is formed. A plain mapping (e.g. a saved merge) is used as is.
    """

    lowrank_c: torch.Tensor | None = None


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


def skeleton(spec: ModelSpec, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The task's architecture with real buffers and parameter-free (meta): run it with `functional_call`.

    Built on the meta device, so no parameter memory is ever allocated; only the buffers (position ids, rotary
    frequencies) are materialised and initialised by the model's own `initialize_weights`.
    """
    with torch.device("meta"):
        model = spec.cls(spec.config)
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    model.initialize_weights()  # fills the buffers; on meta parameters it is a no-op
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype=dtype).eval()  # eval: dropout off while learning


class FunctionalMerge:
    """theta_m(c) = theta_p + sum_i c_i * tau_i, run per task with that task's architecture and head.

    Holds the base tensors and the task vectors (dense: about S + 1 model copies; LoRA: their factors), one parameter-free
    skeleton per task, and each task's own tensors. Nothing here is a module parameter: only the coefficients
    are learned, elsewhere.
    """

    def __init__(
        self,
        plan: MergePlan,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        delta_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        streaming: bool = False,
    ) -> None:
        self.plan, self.device, self.streaming = plan, device, streaming
        self.base, self.deltas = load_task_vectors(plan, dtype=dtype, device=device, streaming=streaming)
        self.buffers = MergeBuffers(plan, dtype=dtype, device=device, base=None if streaming else self.base)
        if delta_transform is not None:  # e.g. TIES trimming for AdaMerging++
            self.deltas = {n: DeltaStack.from_dense(delta_transform(d.dense())) for n, d in self.deltas.items()}
        self.models = {t: skeleton(s, device, dtype) for t, s in plan.task_specs.items()}
        self.heads = {t: load_task_specific(plan, t, dtype=dtype, device=device) for t in plan.tasks}
        self.pad_id = plan.base.config.pad_token_id or 0
        self._lowrank_c: torch.Tensor | None = None  # set during a forward of a `Merged` with LoRA layers
        self.lowrank = self._hook_lowrank_layers()
        # what merged_params forms densely: every task vector, except the LoRA ones the hooks apply
        self.dense_deltas = {n: DeltaStack(d.shape, [None if n in self.lowrank and isinstance(p, LowRankDelta) else p
                                                     for p in d.parts]) if n in self.lowrank else d
                             for n, d in self.deltas.items()}  # fmt: skip

    def _hook_lowrank_layers(self) -> dict[str, LowRankLayer]:
        """A forward hook on each LoRA-targeted Linear / Conv1D / Embedding of every task's skeleton.

        A weight tied to another module (e.g. GPT-2's embedding and LM head) stays dense: the hook would miss
        the other use.
        """
        layers = {}
        for name in self.plan.merged:
            parts = [(i, p) for i, p in enumerate(self.deltas[name].parts) if isinstance(p, LowRankDelta)]
            modules = [self._owner(task, name) for task in self.plan.tasks] if parts else [None]
            if all(m is not None for m in modules):
                layers[name] = LowRankLayer(parts, self.plan.group_index[name])
                for module in modules:
                    module.register_forward_hook(self._lowrank_hook(layers[name]))
        return layers

    def _owner(self, task: str, name: str) -> nn.Module | None:
        """The one Linear / Conv1D / Embedding whose `weight` is tensor `name` in the task's skeleton, if any."""
        param = self.plan.task_specs[task].param_names.get(name)
        if param is None or not param.endswith(".weight"):
            return None
        model = self.models[task]
        module = model.get_submodule(param.rsplit(".", 1)[0]) if "." in param else model
        users = [m for m in model.modules() if getattr(m, "weight", None) is module.weight]
        return module if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) and len(users) == 1 else None

    def _lowrank_hook(self, layer: LowRankLayer):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            c = self._lowrank_c
            return None if c is None else output + layer(module, args[0], c)

        return hook

    def merged_params(self, c: torch.Tensor) -> Merged:
        """Merged tensors for coefficients `c` `(S, G)` (already transformed); differentiable in `c`.

        LoRA-targeted layers keep the base weight here and get their low-rank update in the forward. With `c`
        not requiring grad the merge is written into reused tensors (`memory.MergeBuffers`), overwritten by the
        next call: use the result before merging again.
        """
        if not c.requires_grad:
            merged = Merged(self.buffers.merge(self.dense_deltas, c))
        else:
            merged = self._merge(self.dense_deltas, c)
        merged.lowrank_c = c if self.lowrank else None
        return merged

    def dense_merge(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every merged tensor formed densely (LoRA layers included): what is saved as the merged model.

        Written into learning's merged tensors, which the caller then owns: one merged model at a time.
        """
        merged = self.buffers.merge(self.deltas, c.detach())
        self.buffers.hand_over()
        return merged

    def _merge(self, deltas: dict[str, DeltaStack], c: torch.Tensor) -> Merged:
        merged = Merged()
        for name, stack in deltas.items():
            coeffs = c[:, self.plan.group_index[name]]  # (S,)
            if stack.is_zero:
                merged[name] = self.base[name]
            elif self.streaming:  # one tensor at a time: the base and each fine-tune read, combined, freed
                merged[name] = streamed_merge(stack, self.base[name], coeffs)
            else:
                merged[name] = self.base[name] + stack.combine(coeffs)
        return merged

    def forward(self, task: str, merged: Mapping[str, torch.Tensor], batch: list[Example]):
        """The task's model output on a batch, with the merged body and the task's own head."""
        names = self.plan.task_specs[task].param_names
        params = {names[n]: merged[n] for n in self.plan.merged if n in names} | self.heads[task]
        inputs = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
        self._lowrank_c = getattr(merged, "lowrank_c", None)
        try:
            return torch.func.functional_call(self.models[task], params, (), inputs)
        finally:
            self._lowrank_c = None

    @torch.no_grad()
    def evaluate(self, merged: Mapping[str, torch.Tensor], task: str, examples: list[Example]) -> dict[str, float]:
        """Mean loss, prediction entropy and (for classification) accuracy of merged tensors on examples."""
        totals = {"loss": 0.0, "entropy": 0.0, "correct": 0.0}
        classification = True
        for i in range(0, len(examples), EVAL_BATCH):
            batch = examples[i : i + EVAL_BATCH]
            out = self.forward(task, merged, batch)
            totals["entropy"] += float(entropy(out.logits)) * len(batch)
            if "labels" in batch[0]:
                totals["loss"] += float(out.loss) * len(batch)
                labels = torch.stack([ex["labels"] for ex in batch]).to(out.logits.device)  # (B,)
                classification = classification and out.logits.dim() == 2 and labels.dim() == 1
                if classification:
                    totals["correct"] += float((out.logits.argmax(-1) == labels).sum())
        n = len(examples)
        metrics = {"entropy": totals["entropy"] / n}
        if "labels" in examples[0]:
            metrics["loss"] = totals["loss"] / n
            if classification:
                metrics["accuracy"] = totals["correct"] / n
        return metrics

    def mean_loss(self, c: torch.Tensor, task: str, examples: list[Example]) -> float:
        """Mean supervised loss of the merge with coefficients `c` `(S, G)`."""
        with torch.no_grad():
            return self.evaluate(self.merged_params(c), task, examples)["loss"]

    @torch.no_grad()
    def predictions(self, c: torch.Tensor, task: str, examples: list[Example], desc: str | None = None) -> torch.Tensor:
        """Arg-max class of each example (sequence classification), `(N,)`; a progress bar when `desc` is given."""
        merged = self.merged_params(c)
        starts = tqdm(range(0, len(examples), EVAL_BATCH), desc=desc, disable=desc is None, leave=False)
        chunks = [self.forward(task, merged, examples[i : i + EVAL_BATCH]).logits.argmax(-1) for i in starts]
        return torch.cat(chunks).cpu()

    def coefficient_grad(
        self,
        c: torch.Tensor,
        batches: Mapping[str, list[Example]],
        scale: Mapping[str, float],
        objective: Objective = "supervised",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """dL/dc `(S, G)` of L = sum_t scale[t] * loss_t, by one backward through the merged model only.

        The graph never runs through the S task vectors: one backward per task gives dL/dtheta_m tensor by tensor,
        and each is folded into dL/dc[i, g] = sum_{j in g} <dL/dtheta_m[j], tau_ij> (method.md section 3) as it arrives;
        LoRA-targeted layers get their part by autograd through c in their low-rank forward. `objective` is the model's
        own loss (`supervised`, needs `labels`) or the mean prediction entropy (`entropy`, AdaMerging).

        Returns:
            `(grad_c, losses)` with each task's loss (detached).
        """
        with torch.no_grad():
            merged = self.merged_params(c.detach())
        # tensors whose (dense) task vectors are all zero contribute exactly 0 to dL/dc through the chain rule
        leaves = [n for n in merged if not self.dense_deltas[n].is_zero]
        for name in leaves:
            merged[name].requires_grad_()
        c_lowrank = merged.lowrank_c = c.detach().clone().requires_grad_() if self.lowrank else None
        device = next(iter(merged.values())).device
        grad_c = torch.zeros(self.plan.num_sources, len(self.plan.groups), device=device)  # (S, G) float32
        # one backward per task, and each merged tensor's gradient folded into dL/dc as soon as backward has it,
        # then freed: neither the gradients of the whole model nor two tasks' activations are held at once
        hooks = [merged[n].register_post_accumulate_grad_hook(self._fold_grad(n, grad_c)) for n in leaves]
        inputs = [merged[n] for n in leaves] + ([c_lowrank] if c_lowrank is not None else [])
        losses = {}
        try:
            for task, batch in batches.items():
                if objective == "entropy":
                    batch = [{k: v for k, v in ex.items() if k != "labels"} for ex in batch]  # never read a label
                    loss = entropy(self.forward(task, merged, batch).logits)
                else:
                    loss = self.forward(task, merged, batch).loss
                if inputs:  # else every task vector is zero: dL/dc = 0
                    torch.autograd.backward(scale[task] * loss, inputs=inputs)
                losses[task] = loss.detach()
        finally:
            for hook in hooks:
                hook.remove()
            for name in leaves:
                merged[name].requires_grad_(False)
        if c_lowrank is not None and c_lowrank.grad is not None:  # the LoRA layers' part, by autograd through c
            grad_c += c_lowrank.grad.float()
        return grad_c, losses

    def _fold_grad(self, name: str, grad_c: torch.Tensor):
        """Hook: grad_c[i, g] += <dL/dtheta_m[name], tau_i[name]> (method.md section 3), then drop the gradient."""
        group, stack = self.plan.group_index[name], self.dense_deltas[name]

        def hook(tensor: torch.Tensor) -> None:
            inner = self.buffers.inner(name, stack, tensor.grad)  # (S,)
            grad_c[:, group] += inner.to(grad_c.device)
            tensor.grad = None

        return hook


def streamed_merge(stack: DeltaStack, base: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """base + sum_i c_i tau_i for one tensor, reading each streamed fine-tune in turn; differentiable in `coeffs`
    only when they require grad (otherwise accumulated in place, holding three tensors of this shape at most)."""
    total = None
    for ci, part in zip(coeffs, stack.parts):
        if part is None:
            continue
        delta = part.dense(base) if isinstance(part, StreamedDelta) else part.dense() if isinstance(
            part, LowRankDelta) else part
        if coeffs.requires_grad or total is None:
            total = ci * delta if total is None else total + ci * delta
        else:
            total.add_(delta, alpha=float(ci))
    return base + total if coeffs.requires_grad else total.add_(base)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted distributions, over every position but the class axis."""
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (..., C)
    return -(log_p.exp() * log_p).sum(-1).mean()
