"""Generative tasks (method.md section 8): prompt/completion, chat, plain-text and seq2seq records tokenised into
model inputs whose `labels` keep the answer tokens only (-100 on prompt, system text and padding), and the answer
positions that the objectives without labels (entropy, distillation) average over. Their metrics: `scoring.py`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .data import ASIDE, Example, collate, read_rows

logger = logging.getLogger(__name__)

Format = Literal["auto", "prompt_completion", "messages", "text", "seq2seq"]
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "seq2seq": ("source", "target"),
           "text": ("text",)}  # the fields of each form; `auto` takes the first a record has (`choices` may answer)
IGNORE = -100
CHOICE_FIELDS = (f"{ASIDE}input_ids", f"{ASIDE}attention_mask", f"{ASIDE}labels")  # (C, L) each
CHOICE_INDEX = f"{ASIDE}index"  # the right choice's index, `label` in the record
ANSWER_MASK = "answer_mask"  # `answer_batch`: the positions averaged over; popped before the model


def _has(record: Mapping[str, Any], name: str) -> bool:
    first, *rest = (record.get(k) is not None for k in FORMATS[name])  # a Dataset fills missing fields with None
    return first and (all(rest) or record.get("choices") is not None)


def _format(record: Mapping[str, Any], format: Format) -> str:
    name = next((f for f in FORMATS if _has(record, f)), None) if format == "auto" else format
    if name not in FORMATS or not _has(record, name):
        raise ValueError(f"A {format} record needs the fields {FORMATS.get(name, sorted(FORMATS))}, got "
                         f"{sorted(record)}: name yours with `fields={{standard name: your field}}` (a recipe's `data` "
                         "entry takes `fields`).")
    return name


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """An answer ends with EOS (when the tokenizer has one), so greedy exact match means: says it, then stops."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids


def _answer(tokenizer, text: str) -> list[int]:
    return _with_eos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def _sequence(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    """A decoder-only example: prompt then answer, only the answer labelled."""
    return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [IGNORE] * len(prompt) + answer}


def _chat(tokenizer, messages: list[Mapping[str, str]]) -> dict[str, list[int]]:
    """The conversation rendered with the tokenizer's chat template, the assistant turns (to their end-of-turn text)
    labelled: each turn's characters are those the template adds from the generation prompt to the turn's end."""
    if getattr(tokenizer, "chat_template", None) is None or not tokenizer.is_fast:
        raise ValueError("`messages` records are rendered with the base tokenizer's chat template, by a fast tokenizer "
                         "(character offsets); this tokenizer has no template or is slow: set `tokenizer.chat_template`"
                         " or give prompt/completion records.")

    def render(turns: list, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)

    text, spans = render(messages, False), []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = render(messages[:k], True), render(messages[: k + 1], False)
            if not (end.startswith(start) and text.startswith(end)):
                raise ValueError("The chat template does not render a conversation as its turns one after another "
                                 "(a turn's rendering changes with what follows), so its assistant tokens cannot be "
                                 "found: give prompt/completion records rendered by your own code.")
            spans.append((len(start), len(end)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template writes BOS
    ids = encoded["input_ids"]
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, encoded["offset_mapping"])]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _tokenize(record: Mapping[str, Any], tokenizer, name: str, encoder_decoder: bool,
              answer: str | None) -> dict[str, list[int]]:
    """One record (its answer replaced by `answer` when given: a choice) as lists of ids."""
    if name == "messages":
        return _chat(tokenizer, record["messages"])
    if name == "text":
        ids = _with_eos(tokenizer, tokenizer(record["text"])["input_ids"])
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    prompt, target = (record["prompt"], "completion") if name == "prompt_completion" else (record["source"], "target")
    answer = record[target] if answer is None else answer
    if encoder_decoder:  # the prompt to the encoder, the answer as the decoder's labels
        ids = tokenizer(prompt)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": _with_eos(tokenizer, tokenizer(text_target=answer)["input_ids"])}
    return _sequence(tokenizer(prompt)["input_ids"], _answer(tokenizer, answer))


def _cut(example: dict[str, list[int]], max_length: int | None) -> tuple[Example, bool]:
    cut = max_length is not None and any(len(v) > max_length for v in example.values())
    return {k: torch.tensor(v[:max_length]) for k, v in example.items()}, cut


def tokenize_record(record: Mapping[str, Any], tokenizer, *, format: Format = "auto",
                    max_length: int | None = None, encoder_decoder: bool = False) -> tuple[Example, bool]:
    """One record as model inputs (see `tokenize_examples`), and whether `max_length` cut it."""
    name = _format(record, format)
    choices = record.get("choices")
    if choices is None:
        return _cut(_tokenize(record, tokenizer, name, encoder_decoder, None), max_length)
    label = record.get("label")
    if name not in ("prompt_completion", "seq2seq") or not isinstance(choices, list) or \
            not str(label).isdigit() or not int(label) < len(choices):
        raise ValueError(f"A record with `choices` needs a prompt (or source), a non-empty list of choices and "
                         f"`label`, the index of the right one; got choices {choices!r}, label {label!r}.")
    options = [_cut(_tokenize(record, tokenizer, name, encoder_decoder, str(c)), max_length) for c in choices]
    batch = collate([ex for ex, _ in options], tokenizer.pad_token_id or 0)  # (C, L) each, padded within the record
    example = options[int(label)][0] | {f"{ASIDE}{k}": batch[k] for k in ("input_ids", "attention_mask", "labels")}
    return example | {CHOICE_INDEX: torch.tensor(int(label))}, any(cut for _, cut in options)


def tokenize_examples(records: Iterable[Mapping[str, Any]], tokenizer, *, format: Format = "auto",
                      fields: Mapping[str, str] | None = None, max_length: int | None = None,
                      encoder_decoder: bool = False, task: str | None = None) -> list[Example]:
    """Tokenise the records of a generative task into model inputs whose `labels` are the answer tokens.

    Forms (`format="auto"` takes each record's from its fields): `{"prompt", "completion"}`; `{"messages": [{"role",
    "content"}, ...]}`, rendered with `tokenizer.chat_template`, the assistant turns labelled; `{"text"}` (every
    token labelled: plain language modelling); `{"source", "target"}` (seq2seq: with `encoder_decoder` the source
    goes to the encoder and the target is the decoder's labels, else they are prompt and completion). Answers end
    with the tokenizer's EOS, if it has one. A prompt (or source) record may give `choices` and `label` (the index
    of the right one) instead of its answer: its inputs are then the right choice's, and every choice rides along
    for rank classification (`evaluate` reports its `accuracy`). Examples differ in length: batches are padded.

    Args:
        records (`Iterable[Mapping]`): A list of dicts, a `datasets.Dataset`, or rows read from JSONL/CSV.
        tokenizer: The base model's tokenizer.
        format (`str`, defaults to `"auto"`): One of `auto`, `prompt_completion`, `messages`, `text`, `seq2seq`.
        fields (`Mapping[str, str]`, *optional*): Standard field name to the records' one, e.g. `{"prompt": "question",
            "completion": "answer"}`.
        max_length (`int`, *optional*): Longer examples are cut to their first `max_length` tokens (seq2seq: source
            and target each); how many were cut is logged.
        encoder_decoder (`bool`): The model is an encoder-decoder (T5), for `{"source", "target"}` records.
        task (`str`, *optional*): The task's name, for the log.

    Returns:
        `list[dict[str, torch.Tensor]]`: `input_ids`, `attention_mask`, `labels` (-100 off the answer) per record,
        plus `choice_*` fields for records with choices.

    Raises:
        `ValueError`: A record without the fields of its form, a chat template that cannot be used, bad `choices`.

    Example:
        ```python
        examples = tokenize_examples([{"prompt": "2 + 2 =", "completion": " 4"}], tokenizer)
        ```
    """
    examples, cut = [], 0
    for record in records:
        record = {**record, **{std: record[own] for std, own in (fields or {}).items() if own in record}}
        for key in ("messages", "choices"):  # CSV cells hold them as JSON text
            if isinstance(record.get(key), str) and record[key].lstrip().startswith("["):
                record[key] = json.loads(record[key])
        example, was_cut = tokenize_record(record, tokenizer, format=format, max_length=max_length,
                                           encoder_decoder=encoder_decoder)
        examples.append(example)
        cut += was_cut
    if cut:
        logger.warning("%d of %d examples%s were longer than max_length=%d tokens and were cut to it (their end "
                       "dropped, answer tokens included).", cut, len(examples), f" of task {task!r}" * bool(task),
                       max_length)
    return examples


def read_generative(path: str | Path, tokenizer, **options: Any) -> list[Example]:
    """The records of a JSONL or CSV file (an empty CSV cell: no value), tokenised by `tokenize_examples(records,
    tokenizer, **options)`."""
    rows = read_rows(path)
    if Path(path).suffix == ".csv":
        rows = [{k: None if v == "" else v for k, v in row.items()} for row in rows]
    return tokenize_examples(rows, tokenizer, **options)


def _mark_answer(example: Example, *, shift: bool) -> Example:
    """The example with `answer_mask` `(T,)`: the positions of its logits that predict an answer token (token
    labels != -100; `shift`: one position earlier, decoder-only models), else its real tokens (attention mask)."""
    labels = example.get("labels")
    if labels is not None and labels.dim() >= 1:
        answer = labels != IGNORE  # (T,)
        mask = torch.cat([answer[1:], answer.new_zeros(1)]) if shift else answer
    elif "input_ids" in example:
        mask = example.get("attention_mask", torch.ones_like(example["input_ids"])) != 0
    else:
        return example
    return example | {ANSWER_MASK: mask.long()}


def answer_batch(examples: list[Example], model, pad_id: int = 0, *, labels: bool = False,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The batch of `examples` for `model`, and its answer mask `(B, T)`: the positions of the logits that predict
    an answer token (token labels != -100), else the real tokens; what entropy and distillation average over, never
    prompt, system text or padding. Unless `labels`, no label reaches the model: an encoder-decoder's decoder reads
    the answer as the model does from its labels (teacher forcing), other models get none. `ValueError` for an
    encoder-decoder example without a target."""
    encoder_decoder = model.config.is_encoder_decoder
    marked = [_mark_answer(ex, shift=model.can_generate() and not encoder_decoder) for ex in examples]
    if encoder_decoder and any(ex.get("labels") is None or ex["labels"].dim() == 0 for ex in marked):
        raise ValueError("An encoder-decoder's decoder reads the answer: every example needs its target as token "
                         "`labels` (`tokenize_examples(..., encoder_decoder=True)` of source/target records).")
    keep = labels or encoder_decoder
    batch = collate([ex if keep else {k: v for k, v in ex.items() if k != "labels"} for ex in marked], pad_id)
    if encoder_decoder and not labels:
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch.pop("labels"))
    return batch, batch.pop(ANSWER_MASK, None)
