"""Task examples: accepted forms (datasets.Dataset, list of dicts, DataLoader, JSONL/CSV files), splits, batching."""

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

Example = dict[str, torch.Tensor]

PAD_VALUES = {"attention_mask": 0, "labels": -100}  # padding value per model input; anything else pads with 0
ASIDE = "choice_"  # fields so named ride with their example but are no model input (rank classification's choices)


def _to_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float, bool)) or (isinstance(value, list) and value and not isinstance(value[0], str)):
        return torch.tensor(value)
    return None  # strings and other raw fields are not model inputs


def as_examples(task: str, data: Any, *, limit: int | None = None, require_labels: bool = True) -> list[Example]:
    """Turn one task's examples (a `datasets.Dataset`, a list of dicts or a `DataLoader` of dict batches) into a list
    of `{input name: tensor}` dicts: model inputs, plus `labels`. Raw text fields are dropped: tokenise first.

    Raises:
        `ValueError`: No examples, or (with `require_labels`) an example without `labels`.
        `TypeError`: An unsupported container.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        batches = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in data]
        examples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        examples = []
        for row in data:
            if not isinstance(row, Mapping):
                raise TypeError(f"Examples of task {task!r} must be dicts of model inputs, got {type(row).__name__}.")
            examples.append({k: t for k, v in row.items() if (t := _to_tensor(v)) is not None})
    else:
        raise TypeError(f"Examples of task {task!r} must be a datasets.Dataset, a list of dicts or a DataLoader, "
                        f"got {type(data).__name__}.")
    examples = examples[:limit] if limit else examples
    if not examples:
        raise ValueError(f"Task {task!r} has no examples: give at least one {'labelled ' * require_labels}example "
                         "per task.")
    if require_labels and any("labels" not in ex for ex in examples):
        raise ValueError(f"Task {task!r} has examples without `labels`: the supervised loss needs a `labels` field in "
                         "every example (rename your label column to `labels`).")
    if any("input_ids" not in ex and "inputs_embeds" not in ex and "pixel_values" not in ex for ex in examples):
        raise ValueError(f"Task {task!r} has examples without model inputs (e.g. `input_ids`): tokenise them first "
                         "(`read_examples`; `tokenize_examples` for prompt/completion, chat, text or seq2seq records).")
    return examples


def check_labels(task: str, examples: list[Example], num_labels: int) -> None:
    """`ValueError` for a class label outside [0, num_labels) (-100, which the loss ignores, is allowed)."""
    labels = torch.cat([ex["labels"].flatten() for ex in examples if "labels" in ex] or [torch.zeros(0)])
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= num_labels))]
    if len(bad):
        raise ValueError(f"Task {task!r} has labels {sorted(set(bad.tolist()))[:5]} outside 0..{num_labels - 1}, the "
                         "classes of its fine-tune: fix the labels or their label2id mapping.")


class Split(NamedTuple):
    """One task's examples: `train` and `holdout` (labelled: the supervised loss, the step selection) and
    `unlabelled` (inputs only, class labels dropped: the train inputs, then the unlabelled inputs given; what the
    objectives without labels learn from; the hold-out never enters it)."""

    train: list[Example]
    holdout: list[Example]
    unlabelled: list[Example]



def prepare_examples(examples: Mapping[str, Any], tasks: list[str], label_counts: Mapping[str, int | None], *,
                     require_labels: bool, limit: int | None) -> dict[str, list[Example]]:
    """Per task of `tasks`, its examples (`as_examples`); `TypeError` for examples not given per task, `ValueError`
    for a task not in `label_counts` (the merge's tasks) or a class label out of its fine-tune's range."""
    if not isinstance(examples, Mapping):
        raise TypeError(f"Examples are given per task name, as a dict; got {type(examples).__name__}.")
    unknown = sorted(set(examples) - set(label_counts))
    if unknown:
        raise ValueError(f"Examples given for unknown task(s) {unknown}; the tasks are {list(label_counts)}.")
    data = {task: as_examples(task, examples.get(task, []), limit=limit, require_labels=require_labels)
            for task in tasks}
    for task, exs in data.items():  # class labels checked against the fine-tune's classes, before any weight
        if label_counts[task] is not None:
            check_labels(task, exs, label_counts[task])
    return data

def make_splits(data: Mapping[str, list[Example]], fraction: float, seed: int, *,
                unlabelled: Mapping[str, list[Example]] | None = None) -> tuple[dict[str, Split], torch.Generator]:
    """One seeded `Split` per task, made once in task order (every hierarchical level uses the same), and the
    generator that then draws the batches; holdout is empty when too few examples or `fraction` is 0."""
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for task, examples in data.items():
        n_holdout = int(round(fraction * len(examples)))
        train, holdout = examples, []
        if 0 < n_holdout < len(examples):
            order = torch.randperm(len(examples), generator=generator).tolist()
            train, holdout = [examples[i] for i in order[n_holdout:]], [examples[i] for i in order[:n_holdout]]
        inputs = [without_class_labels(ex) for ex in [*train, *(unlabelled or {}).get(task, [])]]
        splits[task] = Split(train, holdout, inputs)
    return splits, generator


def without_class_labels(example: Example) -> Example:
    """A new dict of the example as objectives without labels read it: a class label dropped; token labels kept,
    which only mark a generative task's answer (a seq2seq target: the decoder's input) and never reach the model
    as labels (`generative.answer_batch`)."""
    labels = example.get("labels")
    return dict(example) if labels is not None and labels.dim() >= 1 else \
        {k: v for k, v in example.items() if k != "labels"}


def collate(examples: list[Example], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack examples into a batch, right-padding sequences (`input_ids` with the pad id, `labels` with -100); adds
    an `attention_mask` to examples that have none, so results do not depend on the padding."""
    if any("input_ids" in ex and "attention_mask" not in ex for ex in examples):
        examples = [ex if "attention_mask" in ex else ex | {"attention_mask": torch.ones_like(ex["input_ids"])}
                    for ex in examples]
    examples = [{k: v for k, v in ex.items() if not k.startswith(ASIDE)} for ex in examples]
    if any(ex.keys() != examples[0].keys() for ex in examples):
        raise ValueError(f"Examples of one task must have the same fields; got {sorted(examples[0])} and "
                         f"{sorted(next(ex for ex in examples if ex.keys() != examples[0].keys()))}: give every "
                         "example (labelled and unlabelled) the same model inputs.")
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if values[0].dim() == 0 or all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
            continue
        pad = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        length = max(v.shape[0] for v in values)
        batch[key] = torch.full((len(values), length, *values[0].shape[1:]), pad, dtype=values[0].dtype)  # (B, T, ...)
        for i, v in enumerate(values):
            batch[key][i, : v.shape[0]] = v
    return batch


class BatchSampler:
    """Endless seeded stream of global batches of one task: reshuffled each epoch, wrapping around."""

    def __init__(self, num_examples: int, batch_size: int, generator: torch.Generator) -> None:
        self.num_examples, self.batch_size, self.generator = num_examples, batch_size, generator
        self.order: list[int] = []

    def next(self) -> list[int]:
        out = []
        while len(out) < min(self.batch_size, self.num_examples):
            if not self.order:
                self.order = torch.randperm(self.num_examples, generator=self.generator).tolist()
            out.append(self.order.pop(0))
        return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `.jsonl` or `.csv` file (CSV values are strings); `ValueError` for another suffix."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"Unsupported examples file {str(path)!r}: use .jsonl or .csv.")


def read_examples(path: str | Path, tokenizer, *, text_field: str = "text", label_field: str | None = "label",
                  text_pair_field: str | None = None, label2id: Mapping[str, int] | None = None,
                  max_length: int = 128) -> list[Example]:
    """Read labelled text from a JSONL or CSV file and tokenise it with `tokenizer`.

    Args:
        path (`str` or `Path`): A `.jsonl` or `.csv` file.
        tokenizer: The tokenizer of the base model.
        text_field (`str`, defaults to `"text"`): The field holding the text.
        label_field (`str`, defaults to `"label"`): The field holding the label: an integer or a label name;
            `None` reads unlabelled inputs (for `SuperMerger.fit(..., unlabelled=)`).
        text_pair_field (`str`, *optional*): The field holding a second text (e.g. the hypothesis of NLI).
        label2id (`Mapping[str, int]`, *optional*): Label names to ids, e.g. the fine-tune's `config.label2id`.
        max_length (`int`, defaults to 128): Longer texts are truncated.

    Returns:
        `list[dict[str, torch.Tensor]]`: the tokenised examples, with `labels` unless `label_field` is `None`.

    Raises:
        `ValueError`: Unknown file type, a missing field, or a label name not in `label2id`.
    """
    path, examples = Path(path), []
    rows = read_rows(path)
    for i, row in enumerate(rows):
        for field_name in (text_field, label_field, text_pair_field):
            if field_name and field_name not in row:
                raise ValueError(f"{path}:{i + 1} has no field {field_name!r} (fields: {sorted(row)}): name the "
                                 "right one with text_field= / label_field= (a recipe's `data:` entry takes the same).")
        label = row[label_field] if label_field else None
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in (label2id or {}):
                raise ValueError(f"{path}:{i + 1}: label {label!r} is not one of {sorted(label2id or {})}.")
            label = label2id[label]
        pair = row[text_pair_field] if text_pair_field else None
        encoded = {k: torch.tensor(v) for k, v in tokenizer(row[text_field], pair, truncation=True,
                                                            max_length=max_length).items()}
        examples.append(encoded if label is None else encoded | {"labels": torch.tensor(int(label))})
    return examples
