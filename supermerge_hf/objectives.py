"""The merged model as a function of the coefficients, its losses, and the exact gradient of the coefficients."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .coefficients import coefficient_grad
from .examples import Example, collate
from .task_vectors import DeltaStack, MergePlan, ModelSpec, load_task_specific, load_task_vectors

EVAL_BATCH = 32
Objective = Literal["supervised", "entropy"]


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
        self.plan, self.device = plan, device
        self.base, self.deltas = load_task_vectors(plan, dtype=dtype, device=device, streaming=streaming)
        if delta_transform is not None:  # e.g. TIES trimming for AdaMerging++
            self.deltas = {n: DeltaStack.from_dense(delta_transform(d.dense())) for n, d in self.deltas.items()}
        self.models = {t: skeleton(s, device, dtype) for t, s in plan.task_specs.items()}
        self.heads = {t: load_task_specific(plan, t, dtype=dtype, device=device) for t in plan.tasks}
        self.pad_id = plan.base.config.pad_token_id or 0

    def merged_params(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """Merged tensors for coefficients `c` `(S, G)` (already transformed); differentiable in `c`."""
        return {n: self.base[n] if self.deltas[n].is_zero else self.base[n] + self.deltas[n].combine(c[:, self.plan.group_index[n]])
                for n in self.plan.merged}

    def forward(self, task: str, merged: Mapping[str, torch.Tensor], batch: list[Example]):
        """The task's model output on a batch, with the merged body and the task's own head."""
        names = self.plan.task_specs[task].param_names
        params = {names[n]: merged[n] for n in self.plan.merged if n in names} | self.heads[task]
        inputs = {k: v.to(self.device) for k, v in collate(batch, self.pad_id).items()}
        return torch.func.functional_call(self.models[task], params, (), inputs)

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

        The graph never runs through the S task vectors: autograd gives dL/dtheta_m, then
        dL/dc[i, g] = sum_{j in g} <dL/dtheta_m[j], tau_ij> (method.md section 3). `objective` is the model's
        own loss (`supervised`, needs `labels`) or the mean prediction entropy (`entropy`, AdaMerging).

        Returns:
            `(grad_c, losses)` with each task's loss (detached).
        """
        with torch.no_grad():
            merged = self.merged_params(c.detach())
        # tensors whose task vectors are all zero contribute exactly 0 to dL/dc: no gradient needed for them
        merged = {n: t if self.deltas[n].is_zero else t.requires_grad_() for n, t in merged.items()}
        losses = {}
        for task, batch in batches.items():
            if objective == "entropy":
                batch = [{k: v for k, v in ex.items() if k != "labels"} for ex in batch]  # never read a label
                losses[task] = entropy(self.forward(task, merged, batch).logits)
            else:
                losses[task] = self.forward(task, merged, batch).loss
        total = sum(scale[t] * loss for t, loss in losses.items())
        leaves = [n for n in merged if merged[n].requires_grad]
        grads = torch.autograd.grad(total, [merged[n] for n in leaves])
        grad_c = coefficient_grad(dict(zip(leaves, grads)), self.deltas, self.plan.group_index, len(self.plan.groups))
        return grad_c, {t: v.detach() for t, v in losses.items()}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted distributions, over every position but the class axis."""
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (..., C)
    return -(log_p.exp() * log_p).sum(-1).mean()
