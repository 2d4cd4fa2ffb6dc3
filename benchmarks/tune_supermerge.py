"""Tune SuperMerge's defaults on validation data (never the test split) and print what each knob does.

For each seed, 32 labelled examples per task are drawn from the task's validation pool (as the benchmark
does); the remaining pool examples (up to --val-size) score the merge. Each variant changes one knob of the
baseline setting. Results go to benchmarks/results/tuning.json.

    python benchmarks/tune_supermerge.py --tasks bbc tweets --finetunes ~/.cache/supermerge_hf/demo/minilm-{task}
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

from build_data import load_tasks
from transformers import AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.demo.tasks import minilm_path, tokenize_examples

BASELINE = {"learning_rate": 0.05, "steps": 100, "batch_size": 8, "holdout_fraction": 0.25,
            "loss_combination": "sum", "init_coefficient": 0.3}
VARIANTS = {
    "baseline": {},
    "lr=0.01": {"learning_rate": 0.01},
    "lr=0.2": {"learning_rate": 0.2},
    "steps=200": {"steps": 200},
    "steps=50": {"steps": 50},
    "no hold-out": {"holdout_fraction": 0.0},
    "normalized loss": {"loss_combination": "normalized"},
    "init from TA": {"init_from_task_arithmetic": True},
    "batch=16": {"batch_size": 16},
    "l2=0.01": {"l2_to_init": 0.01},
    "block": {"granularity": "block"},
    "transform none": {"transform": "none"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["bbc", "tweets"])
    parser.add_argument("--finetunes", default=str(Path.home() / ".cache/supermerge_hf/demo/minilm-{task}"),
                        help="Fine-tune folder pattern with {task}.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--output", default="benchmarks/results/tuning.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_tasks(args.tasks, check=False)
    results = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
    for seed in args.seeds:
        rng = random.Random(seed)
        labelled, val = {}, {}
        for t in args.tasks:
            order = rng.sample(range(len(data[t].pool)), len(data[t].pool))
            labelled[t] = tokenize_examples(tokenizer, [data[t].pool[i] for i in order[:32]])
            val[t] = tokenize_examples(tokenizer, [data[t].pool[i] for i in order[32 : 32 + args.val_size]])
        for name in args.variants:
            key = f"{'+'.join(args.tasks)}|{name}|seed{seed}"
            if key in results:
                continue
            config = SuperMergeConfig(
                base=str(minilm_path()),
                sources=[{"task": t, "path": args.finetunes.format(task=t)} for t in args.tasks],
                seed=seed, **(BASELINE | VARIANTS[name]),
            )
            start = time.perf_counter()
            merger = SuperMerger(config)
            merger.fit(labelled)
            seconds = time.perf_counter() - start
            acc = {t: m["accuracy"] for t, m in merger.evaluate(val).items()}
            results[key] = {"val_accuracy": acc, "mean": sum(acc.values()) / len(acc), "seconds": seconds,
                            "selected_step": merger.selected_step}
            print(f"{name:<18} mean {results[key]['mean']:.4f}  {acc}  step {merger.selected_step}  {seconds:.0f}s",
                  flush=True)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
