"""The losses that learn coefficients without labels, as pure functions of logits: the entropy of the merge's
predictions (AdaMerging) and output distillation from each task's fine-tune (method.md section 9)."""

from __future__ import annotations

import torch

TEACHER = "teacher_logits"  # the example field that holds its fine-tune's logits (`distill.attach_teachers`)


def _mean_over_real(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `(B,)` per-example or `(B, T)` per-token values, over real tokens only when `mask` `(B, T)` is given."""
    if mask is None or per_position.dim() != 2:
        return per_position.mean()
    mask = mask.to(per_position.device, per_position.dtype)  # (B, T)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def output_logits(output) -> torch.Tensor:
    """A model output's logits: `logits`, or a contrastive model's (CLIP) `logits_per_image` `(B images, B texts)`."""
    return output["logits"] if "logits" in output else output["logits_per_image"]


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of the predicted distributions; over real tokens only when `mask` `(B, T)` is given."""
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (..., C)
    return _mean_over_real(-(log_p.exp() * log_p).sum(-1), mask)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² KL(p_teacher^T || p^T), p^T = softmax(logits / T), averaged over examples (real tokens with `mask`).

    The T² keeps the gradient's size independent of T (Hinton et al., 2015). `logits` and `teacher` `(..., C)`."""
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)  # (..., C) the teacher
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., C) the merge
    return temperature**2 * _mean_over_real((log_p.exp() * (log_p - log_q)).sum(-1), mask)


def answer_distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """`distillation_loss` over the answer positions of token logits `(B, T, V)` (`mask` `(B, T)`), whose teacher
    holds only those: its answer positions' logits packed at the start of each row `(B, A, V)`, the rest padding
    (`distill.attach_teachers`). Other logits (a classifier's, or no mask) as `distillation_loss`."""
    if logits.dim() != 3 or mask is None:
        return distillation_loss(logits, teacher, temperature, mask)
    mask = mask.to(logits.device).bool()  # (B, T)
    counts = mask.sum(1, keepdim=True)  # (B, 1) answer positions per example
    if int(counts.max()) > teacher.shape[1]:
        raise ValueError(f"An example has {int(counts.max())} answer positions but its teacher logits only "
                         f"{teacher.shape[1]}: the teachers were computed on other inputs (`attach_teachers`).")
    if not mask.any():  # every answer cut off (max_length): nothing to match, as over an empty mask
        return logits.sum() * 0.0
    packed = torch.arange(teacher.shape[1], device=mask.device) < counts  # (B, A)
    return distillation_loss(logits[mask], teacher.to(logits.device)[packed], temperature)  # (N, V) each
