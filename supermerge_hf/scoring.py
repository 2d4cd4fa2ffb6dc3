"""The metrics of generative tasks' answer tokens (method.md section 8): mean loss per answer token, greedy exact
match, and rank classification over answer choices (T0), each reading a model's logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .data import Example, collate
from .generative import CHOICE_FIELDS, CHOICE_INDEX, IGNORE


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per label position: the answer token's log-probability (0 off the answer), the answer mask, and whether the
    greedy (argmax) prediction is that token (True off the answer). `shift`: position t predicts token t + 1
    (decoder-only models); encoder-decoder logits align with their labels. `logits` `(B, T, V)`, `labels` `(B, T)`."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T - 1, V), (B, T - 1)
    mask = labels != IGNORE  # (B, T)
    log_p = -F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T)
    return log_p * mask, mask, (logits.argmax(-1) == labels) | ~mask


class AnswerMetrics:
    """Totals over batches of the answer-token metrics: `loss`, the mean cross-entropy per answer token, and
    `exact_match`, the share of examples whose every answer token is the greedy prediction given the tokens before
    it (teacher forcing: exactly greedy decoding's first answer-length tokens, so with EOS ending the answer, the
    greedy answer is the answer)."""

    def __init__(self, *, shift: bool) -> None:
        self.shift, self.nll, self.tokens, self.exact, self.examples = shift, 0.0, 0, 0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.dim() != 3 or labels.dim() != 2:
            return
        log_p, mask, hit = answer_log_probs(logits, labels.to(logits.device), shift=self.shift)
        self.nll -= float(log_p.sum())
        self.tokens += int(mask.sum())
        self.exact += int((hit.all(-1) & mask.any(-1)).sum())
        self.examples += len(labels)

    def result(self) -> dict[str, float]:
        if not self.examples:
            return {}
        return {"loss": self.nll / max(self.tokens, 1), "exact_match": self.exact / self.examples}


def _choice_rows(example: Example) -> dict[str, torch.Tensor]:
    return dict(zip(("input_ids", "attention_mask", "labels"), (example[k] for k in CHOICE_FIELDS)))  # (C, L) each


def _shared_prompt(rows: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every choice of a decoder-only example shares and no logit scored depends on: the
    prompt but its last token (whose logits predict the first answer token); 0 when there is nothing to share."""
    answer = (rows["labels"] != IGNORE).int().argmax(-1)  # (C,) the first answer position of each choice
    shared = int(answer.min()) - 1
    same = (rows["input_ids"][:, :shared] == rows["input_ids"][:1, :shared]).all()
    real = bool(rows["attention_mask"][:, :shared].all())
    return shared if shared > 0 and bool(same) and real and len(rows["input_ids"]) > 1 else 0


def _score(out_logits: torch.Tensor, labels: torch.Tensor, shift: bool, reduce: str) -> torch.Tensor:
    log_p, mask, _ = answer_log_probs(out_logits, labels.to(out_logits.device), shift=shift)  # (B, T)
    return (log_p.sum(-1) / (mask.sum(-1).clamp(min=1) if reduce == "mean" else 1)).cpu()  # (B,)


class _NoSharedCache(Exception):
    """The model returns no key/value cache that can be repeated for the choices (e.g. a state-space model's)."""


def _score_shared(rows: dict[str, torch.Tensor], forward: Callable[[dict[str, Any]], Any], shared: int,
                  reduce: str) -> torch.Tensor:
    """The choices' scores `(C,)` of a decoder-only example whose first `shared` tokens all choices share, from
    those tokens' cache, repeated for the choices. `_NoSharedCache` if the model gives none that repeats."""
    out = forward({"input_ids": rows["input_ids"][:1, :shared], "attention_mask": rows["attention_mask"][:1, :shared],
                   "use_cache": True})
    name = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # transformers >= 5.24: cache
    cache, count = getattr(out, name, None), len(rows["input_ids"])
    try:
        cache.batch_repeat_interleave(count)
    except (AttributeError, NotImplementedError, TypeError) as error:  # no cache, or layers that cannot repeat
        raise _NoSharedCache from error
    mask = torch.cat([rows["attention_mask"].new_ones(count, shared), rows["attention_mask"][:, shared:]], dim=1)
    out = forward({"input_ids": rows["input_ids"][:, shared:], "attention_mask": mask, name: cache, "use_cache": True})
    return _score(out.logits, rows["labels"][:, shared:], True, reduce)


def rank_scores(examples: list[Example], forward: Callable[[dict[str, Any]], Any], *, shift: bool, pad_id: int = 0,
                batch_size: int = 32, reduce: Literal["sum", "mean"] = "sum") -> list[torch.Tensor]:
    """The score `(C,)` of each choice of each example that has choices: the summed (or mean) log-probability of
    its answer tokens given the prompt. `forward(batch)` runs the model (its output has `logits` `(B, T, V)`).

    A decoder-only model (`shift`) reads each prompt once: its key/value cache is repeated for the choices, which
    then run only their own tokens (C times fewer prompt tokens than one sequence per choice; the same scores up
    to float rounding). Encoder-decoders, and models whose forward returns no cache, run one sequence per choice,
    `batch_size` at a time."""
    ranked = [_choice_rows(ex) for ex in examples if CHOICE_INDEX in ex]
    scores: list[torch.Tensor | None] = []
    cached = shift  # until the model shows it gives no cache to repeat: then one sequence per choice for all
    for rows in ranked:
        shared = _shared_prompt(rows) if cached else 0
        try:
            scores.append(_score_shared(rows, forward, shared, reduce) if shared else None)
        except _NoSharedCache:
            cached = False
            scores.append(None)
    alone = [k for k, score in enumerate(scores) if score is None]
    flat = [dict(zip(("input_ids", "attention_mask", "labels"), row))
            for k in alone for row in zip(*(ranked[k][f] for f in ("input_ids", "attention_mask", "labels")))]
    batches = (collate(flat[i: i + batch_size], pad_id) for i in range(0, len(flat), batch_size))
    flat_scores = [_score(forward(batch).logits, batch["labels"], shift, reduce) for batch in batches]
    for k, score in zip(alone, torch.cat(flat_scores).split([len(ranked[k]["input_ids"]) for k in alone])
                        if flat else []):
        scores[k] = score
    return scores


def rank_accuracy(examples: list[Example], forward: Callable[[dict[str, Any]], Any], *, shift: bool,
                  pad_id: int = 0, batch_size: int = 32, reduce: Literal["sum", "mean"] = "sum") -> float | None:
    """Rank classification (T0): the share of the examples with choices whose best-scored choice (`rank_scores`;
    the first best on ties) is the right one; `None` if no example has choices."""
    ranked = [ex for ex in examples if CHOICE_INDEX in ex]
    if not ranked:
        return None
    scores = rank_scores(ranked, forward, shift=shift, pad_id=pad_id, batch_size=batch_size, reduce=reduce)
    return sum(int(int(s.argmax()) == int(ex[CHOICE_INDEX])) for s, ex in zip(scores, ranked)) / len(ranked)
