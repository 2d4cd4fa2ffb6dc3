"""Adding the fifth text-5 task to a deployed four-task SuperMerge (issue 16), three ways, 3 draws:

    python benchmarks/incremental.py               # writes results/incremental.json and prints the table
    python benchmarks/incremental.py --seeds 0     # one draw

- `scratch`: all five sources merged anew (`SuperMerger(config).fit`).
- `incremental`: `SuperMerger.from_pretrained(four_task_merge).add_source("austen", ...)`: learning starts from
  the saved coefficients, austen's row fresh (c = 0.3).
- `cheap`: `add_source(..., cheap=True)`: the four-task merge as one source (its task vector) beside austen's.

For seed s, every form sees the same 32 labelled examples per task (text-5's draw: the pool shuffled with
`"{task}/{s}"`), the old tasks' given again; the four-task merge is learned with the same draw and saved once
(cached in `cache/incremental/`; not timed: it is the deployed merge). Each task's test split (500 examples) is
for reporting only. `normalized` = mean over the five tasks of accuracy / the individual fine-tune's
(`results/cells/individual-k32-seed0.json`); `seconds` = construction (or `from_pretrained` + `add_source`) +
`fit`, loading included, on this machine (wall, and process CPU time, which other jobs on the machine disturb
less). Each (form, seed) is cached in `results/incremental/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import time
from pathlib import Path

from build_data import HERE, TEXT5, load_tasks
from run_text5 import draw_labelled
from finetune_all import FINETUNES
from transformers import AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.demo.tasks import minilm_path, tokenize_examples

logger = logging.getLogger("incremental")
OLD, NEW = TEXT5[:4], TEXT5[4]
FORMS = ["scratch", "incremental", "cheap"]
RESULTS = HERE / "results"


# the setting of results/incremental.json (labelled examples only): the paper's, as when it was measured
PAPER = {"granularity": "tensor", "method_kwargs": {"objective": "labels", "start": "constant", "refit_heads": 0}}


def config(tasks: list[str], seed: int, **extra) -> SuperMergeConfig:
    return SuperMergeConfig(base=str(minilm_path()), seed=seed, **PAPER | extra,
                            sources=[{"task": t, "path": str(FINETUNES / t)} for t in tasks])


def deployed(seed: int, labelled: dict[str, list[dict]]) -> Path:
    """The four-task merge of this draw, learned and saved once."""
    folder = HERE / "cache" / "incremental" / f"four-seed{seed}"
    if not (folder / "coefficients.json").is_file():
        SuperMerger(config(OLD, seed)).fit({t: labelled[t] for t in OLD}).save_pretrained(folder, overwrite=True)
    return folder


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(form: str, seed: int, labelled: dict, test: dict) -> dict:
    start, cpu = time.perf_counter(), cpu_seconds()
    if form == "scratch":
        merger = SuperMerger(config(TEXT5, seed))
    else:
        merger = SuperMerger.from_pretrained(deployed(seed, labelled)).add_source(
            NEW, str(FINETUNES / NEW), cheap=form == "cheap")
    merger.fit(labelled)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    accuracy = {t: m["accuracy"] for t, m in merger.evaluate(test).items()}
    return {"form": form, "seed": seed, "per_task": accuracy, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "selected_step": merger.selected_step, "rows": merger.coefficients.sources}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-size", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    tasks = load_tasks(TEXT5)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    test = {t: tokenize_examples(tokenizer, tasks[t].test[: args.test_size]) for t in TEXT5}
    individual = json.loads((RESULTS / "cells" / "individual-k32-seed0.json").read_text())["per_task"]
    cells = RESULTS / "incremental"
    cells.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        labelled = {t: tokenize_examples(tokenizer, draw_labelled(tasks[t], seed, 32)) for t in TEXT5}
        deployed(seed, labelled)
        for form in FORMS:
            path = cells / f"{form}-seed{seed}.json"
            if not path.is_file():
                path.write_text(json.dumps(run(form, seed, labelled, test), indent=1) + "\n")
            record = json.loads(path.read_text())
            record["normalized"] = statistics.mean(record["per_task"][t] / individual[t] for t in TEXT5)
            logger.info("%s seed %d: normalized %.3f, %.0f s", form, seed, record["normalized"], record["seconds"])
            records.append(record)
    table = {}
    for form in FORMS:
        rows = [r for r in records if r["form"] == form]
        table[form] = {"normalized": round(statistics.mean(r["normalized"] for r in rows), 4),
                       "normalized_std": round(statistics.stdev([r["normalized"] for r in rows]), 4)
                       if len(rows) > 1 else 0.0,
                       "seconds": round(statistics.mean(r["seconds"] for r in rows), 1),
                       "cpu_seconds": round(statistics.mean(r["cpu_seconds"] for r in rows), 1),
                       "per_task": {t: round(statistics.mean(r["per_task"][t] for r in rows), 4) for t in TEXT5},
                       "seeds": [r["seed"] for r in rows]}
    table["protocol"] = {"old_tasks": OLD, "new_task": NEW, "examples_per_task": 32, "test_size": args.test_size,
                         "normalized": "mean over the 5 tasks of accuracy / the individual fine-tune's",
                         "seconds": "wall seconds of construction (or from_pretrained + add_source) + fit, loading "
                                    "included", "cpu_seconds": "the same in process CPU time (user + system)"}
    (RESULTS / "incremental.json").write_text(json.dumps(table, indent=1) + "\n")
    print("| form | normalized | seconds | CPU seconds | " + " | ".join(TEXT5) + " |")
    print("|---|---|---|---|" + "---|" * len(TEXT5))
    for form in FORMS:
        row = table[form]
        print(f"| {form} | {row['normalized']:.3f} ± {row['normalized_std']:.3f} | {row['seconds']:.0f} | "
              f"{row['cpu_seconds']:.0f} | "
              + " | ".join(f"{row['per_task'][t]:.3f}" for t in TEXT5) + " |")


if __name__ == "__main__":
    main()
