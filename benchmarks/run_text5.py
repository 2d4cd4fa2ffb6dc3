"""The text-5 benchmark, one entry point: build the tasks, fine-tune (cached), run every method, write results.

    python benchmarks/run_text5.py                         # the full table (see benchmarks/README.md)
    python benchmarks/run_text5.py --quick                 # smoke run: 2 tasks, 1 seed, few steps, 100 test
    python benchmarks/run_text5.py --methods ties supermerge --seeds 0

Protocol (issue 4). Each task's test split is never seen by a method. For seed s, each task's pool (512
examples) is shuffled with `random.Random(f"{task}/{s}")` and the first `--examples-per-task` (32) are the
labelled examples a method may use (so draws for 8, 32, 128 are nested). Each (method, seed) is one "cell":
run in its own subprocess, which merges, evaluates test accuracy per task, and writes
`results/cells/<method>-k<examples>-seed<s>.json` with its merge time (construction of the merger + `fit`)
and its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss` at the end of the process: the whole process,
data loading and test evaluation included). A cell whose file exists with the same settings is skipped.
Methods that do not read the labelled examples (`pretrained`, `average`, `individual`, `multitask`) run once
(the first seed; std 0). Then `results/text5.json`:

    {"methods": {NAME: {"per_task": {TASK: {"mean": a, "std": s}}, "mean": m, "normalized": n,
                        "merge_seconds": t, "peak_rss_mb": r}}, "protocol": {...}}

`std` is over seeds (sample std), `mean` is over tasks, `normalized` the mean over tasks of accuracy / the
`individual` accuracy, `merge_seconds` the mean over seeds, `peak_rss_mb` the max over seeds.

The methods, one function per name, are in `text5_methods.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from build_data import HERE, TEXT5, load_tasks
from multitask import finetune_multitask
from text5_methods import MEMORY_MODES, METHOD_ORDER, QUICK, QUICK_METHODS, RUNNERS, USES_EXAMPLES, Cell, Settings
from transformers import AutoTokenizer

import supermerge_hf
from supermerge_hf.demo.finetune import finetune_classifier, finetune_lora_classifier
from supermerge_hf.demo.tasks import TaskData, minilm_path, tokenize_examples

logger = logging.getLogger("run_text5")

# ---- cells --------------------------------------------------------------------------------------------------


def draw_labelled(task: TaskData, seed: int, k: int) -> list[dict]:
    """The first k examples of the task's pool shuffled with seed `"{task}/{seed}"` (nested over k)."""
    pool = list(task.pool)
    random.Random(f"{task.name}/{seed}").shuffle(pool)
    return pool[:k]


def draw_unlabelled(task: TaskData, seed: int, k: int, u: int | None = None) -> list[dict]:
    """The next `u` examples of the pool after `draw_labelled`'s k (None: all the rest), for the methods that read
    inputs without labels (their labels are dropped by `run_cell`; the test split is never part of it)."""
    pool = list(task.pool)
    random.Random(f"{task.name}/{seed}").shuffle(pool)
    return pool[k:] if u is None else pool[k: k + u]


def cell_name(method: str, seed: int, settings: Settings) -> str:
    unlabelled = "" if settings.unlabelled_per_task is None else f"-u{settings.unlabelled_per_task}"
    return f"{method}-k{settings.examples_per_task}{unlabelled}-seed{seed}"


def code_fingerprint() -> str:
    """sha256 (16 hex digits) of the package's Python sources: a cell computed with other code is stale."""
    package = Path(supermerge_hf.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _recipe(path: Path) -> bytes:
    """A fine-tune's recipe file without what differs between machines for the same fine-tune (its wall time and
    the base's absolute path): re-training it elsewhere with the same recipe keeps its cells."""
    recipe = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("train_seconds", "base_path")}
    return json.dumps(recipe, sort_keys=True).encode()


def cell_settings(method: str, settings: Settings) -> dict:
    """The settings a cell's result depends on, with a fingerprint of each fine-tune (its recipe file)."""
    folders = [settings.finetune_dir(t) / "finetune.json" for t in settings.tasks]
    if method == "multitask":
        folders.append(settings.multitask_dir / "multitask.json")
    fingerprint = hashlib.sha256(b"".join(_recipe(p) for p in folders if p.is_file())).hexdigest()[:16]
    keep = {k: v for k, v in dataclasses.asdict(settings).items()
            if k != "seeds" and not (k == "unlabelled_per_task" and v is None)}  # cells from before the sweep
    return keep | {"method": method, "finetunes": fingerprint}


def run_cell(method: str, seed: int, settings: Settings, tasks: dict[str, TaskData]) -> dict:
    """Run one method for one seed in this process and return the cell record."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    test_text = {t: tasks[t].test[: settings.test_size] for t in settings.tasks}
    cell = Cell(
        settings=settings,
        seed=seed,
        base=minilm_path(),
        finetunes={t: settings.finetune_dir(t) for t in settings.tasks},
        labelled={t: tokenize_examples(tokenizer, draw_labelled(tasks[t], seed, settings.examples_per_task))
                  for t in settings.tasks},  # fmt: skip
        test={t: tokenize_examples(tokenizer, test_text[t]) for t in settings.tasks},
        test_text=test_text,
        unlabelled={t: [{k: v for k, v in ex.items() if k != "labels"} for ex in tokenize_examples(tokenizer, rest)]
                    for t in settings.tasks if (rest := draw_unlabelled(tasks[t], seed, settings.examples_per_task,
                                                                        settings.unlabelled_per_task))},
    )  # --unlabelled-per-task 0: no entry, the methods read the labelled inputs only
    outcome = RUNNERS[method](cell)
    return {
        "method": method,
        "seed": seed,
        "per_task": outcome.per_task,
        "test_examples": {t: len(v) for t, v in cell.test.items()},
        "merge_seconds": round(outcome.merge_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "settings": cell_settings(method, settings),
        "details": outcome.details,
    }


def cell_command(method: str, seed: int, settings: Settings) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", method, "--seed", str(seed),
               "--tasks", *settings.tasks, "--examples-per-task", str(settings.examples_per_task),
               "--finetune-steps", str(settings.finetune_steps)]  # fmt: skip
    if settings.test_size is not None:
        command += ["--test-size", str(settings.test_size)]
    if settings.learn_steps is not None:
        command += ["--learn-steps", str(settings.learn_steps)]
    if settings.unlabelled_per_task is not None:
        command += ["--unlabelled-per-task", str(settings.unlabelled_per_task)]
    command += ["--lora"] if settings.lora else []
    command += ["--code", settings.code]  # the parent's fingerprint, so every cell of a run carries the same
    return command + (["--quick"] if settings.quick else [])


def prepare_models(settings: Settings, tasks: dict[str, TaskData], methods: list[str]) -> None:
    """The individual fine-tunes (cached; benchmarks/finetune_all.py) and, if asked, the multitask one."""
    base = minilm_path()
    finetune = finetune_lora_classifier if settings.lora else finetune_classifier
    for name in settings.tasks:
        start = time.perf_counter()
        finetune(base, tasks[name], settings.finetune_dir(name), steps=settings.finetune_steps)
        logger.info("fine-tune %s ready (%.0f s)", name, time.perf_counter() - start)
    if "multitask" in methods:
        finetune_multitask(base, {t: tasks[t] for t in settings.tasks}, settings.multitask_dir,
                           steps_per_task=settings.finetune_steps)  # fmt: skip


def method_seeds(method: str, settings: Settings) -> list[int]:
    return settings.seeds if USES_EXAMPLES[method] else settings.seeds[:1]


def cached_cell(method: str, seed: int, settings: Settings) -> dict | None:
    """The cell's record if its file exists and was computed with these settings."""
    path = settings.results / "cells" / f"{cell_name(method, seed, settings)}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    expected, found = cell_settings(method, settings), record["settings"]
    if not settings.code:  # --ignore-code-changes
        expected, found = ({k: v for k, v in d.items() if k != "code"} for d in (expected, found))
    return record if found == expected else None


def run_cells(settings: Settings, methods: list[str], *, in_process: bool, tasks: dict[str, TaskData]) -> list[dict]:
    cells_dir = settings.results / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for m in methods for s in method_seeds(m, settings)]
    records = []
    for index, (method, seed) in enumerate(todo, 1):
        path = cells_dir / f"{cell_name(method, seed, settings)}.json"
        label = f"[{index}/{len(todo)}] {method} seed {seed}"
        if (record := cached_cell(method, seed, settings)) is not None:
            logger.info("%s: cached (%s)", label, path.name)
            records.append(record)
            continue
        if path.is_file():
            logger.warning("%s: %s was computed with other settings; recomputing.", label, path.name)
        start = time.perf_counter()
        if in_process:
            record = run_cell(method, seed, settings, tasks)
            record["peak_rss_note"] = "in-process: the whole run's high-water mark so far, not this cell's"
        else:
            subprocess.run(cell_command(method, seed, settings), check=True)
            record = json.loads(Path(str(path) + ".tmp").read_text())
        path.write_text(json.dumps(record, indent=1) + "\n")
        Path(str(path) + ".tmp").unlink(missing_ok=True)
        accuracy = " ".join(f"{t} {a:.3f}" for t, a in record["per_task"].items())
        logger.info("%s: %s | merge %.1f s, peak RSS %.0f MB, cell %.0f s", label, accuracy,
                    record["merge_seconds"], record["peak_rss_mb"], time.perf_counter() - start)  # fmt: skip
        records.append(record)
    return records


# ---- the table ----------------------------------------------------------------------------------------------


def aggregate(records: list[dict], settings: Settings, methods: list[str]) -> dict:
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    table = {}
    for method, cells in by_method.items():
        per_task = {}
        for task in settings.tasks:
            values = [c["per_task"][task] for c in cells]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            per_task[task] = {"mean": round(statistics.fmean(values), 4), "std": round(std, 4)}
        table[method] = {
            "per_task": per_task,
            "mean": round(statistics.fmean(v["mean"] for v in per_task.values()), 4),
            "normalized": None,
            "merge_seconds": round(statistics.fmean(c["merge_seconds"] for c in cells), 2),
            "peak_rss_mb": max(c["peak_rss_mb"] for c in cells),
        }
    if "individual" in table:
        reference = table["individual"]["per_task"]
        for row in table.values():
            ratios = [row["per_task"][t]["mean"] / reference[t]["mean"] if reference[t]["mean"] else math.inf
                      for t in settings.tasks]  # an individual accuracy of 0 (a smoke run): no normalisation
            row["normalized"] = round(statistics.fmean(ratios), 4) if all(map(math.isfinite, ratios)) else None
    return table


def format_table(table: dict, tasks: list[str]) -> str:
    width = max(len(m) for m in table)
    head = f"{'method':<{width}}  " + "  ".join(f"{t:>13}" for t in tasks) + "     mean   norm   merge s   RSS MB"
    lines = [head, "-" * len(head)]
    for method, row in table.items():
        cells = "  ".join(f"{row['per_task'][t]['mean']:.3f}±{row['per_task'][t]['std']:.3f}".rjust(13) for t in tasks)
        norm = f"{row['normalized']:.3f}" if row["normalized"] is not None else "  -  "
        lines.append(f"{method:<{width}}  {cells}  {row['mean']:7.3f}  {norm:>5}  {row['merge_seconds']:8.1f}  "
                     f"{row['peak_rss_mb']:7.0f}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, methods {QUICK_METHODS}")
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER + MEMORY_MODES,
                        help=f"default: {' '.join(METHOD_ORDER)} (quick: the working ones); also {MEMORY_MODES}")
    parser.add_argument("--output", default="text5.json", help="results file name under results/ (default "
                        "text5.json; e.g. text5_k8.json for the examples sweep)")
    parser.add_argument("--tasks", nargs="+", choices=TEXT5)
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--examples-per-task", type=int, default=32)
    parser.add_argument("--unlabelled-per-task", type=int, help="inputs without labels per task beyond the "
                        "labelled ones (default: the rest of the 512-example pool)")
    parser.add_argument("--test-size", type=int, help="evaluate on the first N test examples of each task")
    parser.add_argument("--finetune-steps", type=int, help="steps of each individual fine-tune (default 300)")
    parser.add_argument("--learn-steps", type=int, help="steps of the learned methods (default: the package's)")
    parser.add_argument("--lora", action="store_true", help="the LoRA variant: LoRA fine-tunes (r=8) as sources; "
                        "results under results/lora/")
    parser.add_argument("--in-process", action="store_true", help="run cells here, not in subprocesses")
    parser.add_argument("--ignore-code-changes", action="store_true",
                        help="reuse cells computed with other supermerge_hf sources (default: recompute them)")
    parser.add_argument("--code", help=argparse.SUPPRESS)  # a subprocess's fingerprint, given by the parent
    parser.add_argument("--cell", choices=METHOD_ORDER + MEMORY_MODES, help=argparse.SUPPRESS)  # a subprocess's one cell
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"tasks": TEXT5, "seeds": [0, 1, 2]}
    settings = Settings(
        tasks=args.tasks or defaults["tasks"],
        seeds=args.seeds if args.seeds is not None else defaults["seeds"],
        examples_per_task=args.examples_per_task,
        unlabelled_per_task=args.unlabelled_per_task,
        test_size=args.test_size or defaults.get("test_size"),
        finetune_steps=args.finetune_steps or defaults.get("finetune_steps", 300),
        learn_steps=args.learn_steps or defaults.get("learn_steps"),
        quick=args.quick,
        lora=args.lora,
        code="" if args.ignore_code_changes else args.code if args.code is not None else code_fingerprint(),
    )
    return args, settings


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    if args.cell:  # a subprocess started by run_cells: one cell, written next to its final place
        tasks = load_tasks(settings.tasks, check=False)
        record = run_cell(args.cell, args.seed, settings, tasks)
        path = settings.results / "cells" / f"{cell_name(args.cell, args.seed, settings)}.json.tmp"
        path.write_text(json.dumps(record, indent=1) + "\n")
        return

    order = METHOD_ORDER + MEMORY_MODES
    methods = args.methods or (QUICK_METHODS if args.quick else METHOD_ORDER)
    methods = [m for m in order if m in methods]
    start = time.perf_counter()
    logger.info("text-5 run: %s; methods %s", settings, methods)
    tasks = load_tasks(settings.tasks)  # warns loudly when the splits drifted from data_manifest.json
    prepare_models(settings, tasks, methods)
    logger.info("models ready after %.0f s", time.perf_counter() - start)
    run_cells(settings, methods, in_process=args.in_process, tasks=tasks)
    # The table holds every method whose cells are all there with these settings, run now or before.
    shown = METHOD_ORDER + [m for m in MEMORY_MODES if m in methods]
    complete = {m: [cached_cell(m, s, settings) for s in method_seeds(m, settings)] for m in shown}
    complete = {m: cells for m, cells in complete.items() if all(cells)}
    missing = [m for m in shown if m not in complete]
    if missing:
        logger.warning("Not in the table (cells missing for these settings): %s", missing)
    records = [record for cells in complete.values() for record in cells]
    table = aggregate(records, settings, list(complete))
    protocol = {
        "settings": dataclasses.asdict(settings),
        "test_examples": records[0]["test_examples"] if records else {},
        "labelled_draw": "pool shuffled with random.Random(f'{task}/{seed}'), first examples_per_task",
        "seed_independent": [m for m in complete if not USES_EXAMPLES[m]],
        "merge_seconds": "SuperMerger construction + fit (loading included), mean over seeds; multitask: its "
                         "training time; pretrained, individual: 0",
        "peak_rss_mb": "getrusage(RUSAGE_SELF).ru_maxrss of the cell's own process, max over seeds",
        "wall_seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    out = settings.results / args.output
    out.write_text(json.dumps({"methods": table, "protocol": protocol}, indent=2) + "\n")
    print(f"\nTest accuracy, mean ± std over seeds {settings.seeds} ({settings.examples_per_task} labelled examples "
          f"per task; test examples {protocol['test_examples']})\n")  # fmt: skip
    print(format_table(table, settings.tasks))
    print(f"\nWrote {out.relative_to(HERE.parent)} in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("supermerge_hf").setLevel(logging.WARNING)
    main()
