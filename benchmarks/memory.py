"""Peak host memory of coefficient learning: flat vs hierarchical (group size 2) vs streaming, K = 2, 4, 8.

A random BERT-large body (~335M parameters) is the base; the "fine-tunes" are `BertForSequenceClassification`
models built from it plus seeded small perturbations (2 labels). Memory does not depend on what the weights
are, so random models stand in for real fine-tunes. Every run is a separate Python process that builds a
`SuperMerger`, learns for 2 steps on tiny random examples and reports its own peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`), next to `SuperMerger.estimate_memory`'s prediction for that mode.

    python benchmarks/memory.py                       # all modes, K = 2 4 8 -> results/memory.json
    python benchmarks/memory.py --modes streaming --ks 8 --trace   # RSS per phase of one run, no JSON
    python benchmarks/memory.py --cleanup             # also delete the ~12 GB of checkpoints afterwards

Checkpoints go to `cache/memory/` (gitignored) and are reused across runs. Before each run the parent waits
until the machine has enough available memory for the run's estimate (the machine may be shared) and skips
the run if it never does. It is a benchmark, not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / "cache" / "memory"
RESULTS = HERE / "results" / "memory.json"
MODES = ("flat", "hierarchical", "streaming")
GROUP_SIZE = 2
# the setting results/memory.json was measured with (the package default then): the paper's SuperMerge
PAPER = {"granularity": "tensor", "method_kwargs": {"objective": "labels", "start": "constant", "refit_heads": 0}}
MODEL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)  # --tiny smoke run
NOISE = 1e-3  # std of a fine-tune's perturbation, relative to nothing: memory does not care
SEQ_LEN, EXAMPLES, STEPS, BATCH = 16, 4, 2, 2
TARGETS = {"streaming_over_model": 2.0, "hierarchical_over_flat": 0.5, "estimate_error": 0.20}


def rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def model_numel(folder: Path) -> int:
    """Parameters of the model in `folder`, from its safetensors header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f}
    return int(info["MemAvailable"]) / 1024


# ---------------------------------------------------------------------------------------------- checkpoints
def build_models(workdir: Path, num_sources: int, model: dict = MODEL) -> tuple[Path, list[Path]]:
    """The base and `num_sources` perturbed classifiers, each written once and reused; one model in memory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    base = workdir / "base"
    if not (base / "model.safetensors").is_file():
        print(f"Writing the random base to {base}", flush=True)
        torch.manual_seed(0)
        body = BertModel(BertConfig(**model))
        body.save_pretrained(base)
        del body
        gc.collect()
    sources = []
    for i in range(num_sources):
        folder = workdir / f"finetune{i}"
        sources.append(folder)
        if (folder / "model.safetensors").is_file():
            continue
        print(f"Writing fine-tune {i} to {folder}", flush=True)
        torch.manual_seed(1000 + i)  # the classifier head's initialisation
        finetune = BertForSequenceClassification.from_pretrained(base, num_labels=2)
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for param in finetune.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * NOISE)
        finetune.save_pretrained(folder)
        del finetune
        gc.collect()
    return base, sources


# ---------------------------------------------------------------------------------------------- one run (child)
def examples(num_sources: int, vocab: int) -> dict[str, list[dict]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        f"task{i}": [{"input_ids": torch.randint(1000, vocab, (SEQ_LEN,), generator=generator),
                      "labels": torch.tensor(j % 2)} for j in range(EXAMPLES)]
        for i in range(num_sources)
    }


class Tracer:
    """RSS sampled every 10 ms, attributed to the public `SuperMerger` call running (only with --trace)."""

    PHASES = {"__init__": "SuperMerger(config)", "fit": "fit", "evaluate": "evaluate",
              "merge_and_unload": "merge_and_unload"}  # fmt: skip

    def __init__(self) -> None:
        from supermerge_hf import SuperMerger

        self.stack: list[str] = ["(outside)"]
        self.peaks: dict[str, float] = {}
        self.events: list[tuple[float, str, str, float]] = []
        self.start = time.perf_counter()
        for attr, label in self.PHASES.items():
            setattr(SuperMerger, attr, self._wrap(getattr(SuperMerger, attr), label))
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _wrap(self, fn, label):
        tracer = self

        def wrapped(*args, **kwargs):
            tracer.stack.append(label)
            tracer.events.append((time.perf_counter() - tracer.start, "enter", label, rss_mb()))
            try:
                return fn(*args, **kwargs)
            finally:
                tracer.events.append((time.perf_counter() - tracer.start, "exit", label, rss_mb()))
                tracer.stack.pop()

        wrapped.__wrapped__ = fn
        return wrapped

    def _sample(self) -> None:
        while not self._stop.is_set():
            value, phase = rss_mb(), self.stack[-1]
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), value)
            time.sleep(0.01)

    def report(self) -> dict:
        self._stop.set()
        return {"peak_rss_mb_by_phase": {k: round(v) for k, v in sorted(self.peaks.items(), key=lambda kv: -kv[1])},
                "events": [(round(t, 2), kind, label, round(mb)) for t, kind, label, mb in self.events]}


def child(spec: dict) -> dict:
    """One learning run in this (fresh) process; returns its record."""
    start_rss = rss_mb()
    import accelerate  # noqa: F401  (part of the process baseline: import_rss_mb)
    import torch
    import transformers  # noqa: F401

    from supermerge_hf import SuperMergeConfig, SuperMerger

    import_rss = rss_mb()
    if spec.get("rss_limit_mb"):
        threading.Thread(target=_watchdog, args=(spec["rss_limit_mb"],), daemon=True).start()
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    tracer = Tracer() if spec.get("trace") else None
    mode, k = spec["mode"], spec["num_sources"]
    config = SuperMergeConfig(
        base=spec["base"],
        sources=[{"task": f"task{i}", "path": p} for i, p in enumerate(spec["sources"][:k])],
        steps=STEPS, batch_size=BATCH, examples_per_task=EXAMPLES, holdout_fraction=0.0,
        streaming=mode == "streaming",
        hierarchical={"group_size": GROUP_SIZE} if mode == "hierarchical" else None, **PAPER,
    )
    t0 = time.perf_counter()
    merger = SuperMerger(config)
    estimates = {e.mode: e for e in merger.estimate_memory(group_size=GROUP_SIZE)}
    numel = model_numel(Path(spec["base"]))
    data = examples(k, vocab_size(Path(spec["base"])))
    merger.fit(data)
    seconds = time.perf_counter() - t0
    record = {
        "mode": mode,
        "num_sources": k,
        "model_mb": round(numel * 4 / 2**20, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "estimated_mb": round(estimates[mode].host_mb, 1),
        "seconds": round(seconds, 1),
        "estimated_copies": round(estimates[mode].copies, 2),
        "startup_rss_mb": round(start_rss, 1),
        "import_rss_mb": round(import_rss, 1),  # python + torch + transformers + accelerate + supermerge_hf
        "parameters": numel,
    }
    if tracer is not None:
        record["trace"] = tracer.report()
    return record


def _watchdog(limit_mb: float) -> None:
    """Stop this run before it takes more than `limit_mb` of a shared machine's memory."""
    while True:
        if rss_mb() > limit_mb:
            print(json.dumps({"aborted": f"RSS passed --rss-limit {limit_mb:.0f} MB"}), flush=True)
            os._exit(3)
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- parent
def run_child(spec: dict, wait_s: float) -> dict | None:
    """Run one measurement in a fresh interpreter, after waiting for enough free memory."""
    need = min(spec["estimate_mb"] * 1.1, spec.get("rss_limit_mb") or math.inf) + 500  # the watchdog caps it
    deadline = time.time() + wait_s
    while available_mb() < need:
        if time.time() > deadline:
            print(f"  skipped: needs ~{need:.0f} MB, {available_mb():.0f} MB available", flush=True)
            return None
        time.sleep(15)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if spec.get("mmap_threshold"):  # glibc: tensors above it are mmapped, so memory freed goes back at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode == 3 and '"aborted"' in proc.stdout:
        print(f"  aborted: RSS passed --rss-limit {spec['rss_limit_mb']:.0f} MB", flush=True)
        return {"aborted": True}
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n", flush=True)
        raise RuntimeError(f"Run {spec['mode']} K={spec['num_sources']} failed with exit code {proc.returncode}.")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_estimate(base: Path, sources: list[Path], mode: str, k: int, *, copies: bool = False) -> float:
    """The estimate for one run (host MB, or model copies), from headers only."""
    from supermerge_hf import SuperMergeConfig, SuperMerger

    config = SuperMergeConfig(base=str(base), sources=[{"task": f"task{i}", "path": str(p)}
                                                       for i, p in enumerate(sources[:k])])
    found = next(e for e in SuperMerger(config).estimate_memory(group_size=GROUP_SIZE) if e.mode == mode)
    return found.copies if copies else found.host_mb


def reestimate(args: argparse.Namespace, base: Path, sources: list[Path]) -> None:
    """Recompute the estimate columns of the results (headers only, no run) after the estimate changed."""
    result = json.loads(args.output.read_text())
    for row in result["scaling"]:
        row["estimated_mb"] = round(plan_estimate(base, sources, row["mode"], row["num_sources"]), 1)
        row["estimated_copies"] = round(plan_estimate(base, sources, row["mode"], row["num_sources"], copies=True), 2)
        row.pop("process_mb_in_estimate", None)  # no longer recorded: the estimate does not expose its parts
    result["targets"] = targets(result["scaling"], result.get("skipped", []))
    result["estimates_recomputed"] = "by `python benchmarks/memory.py --reestimate` (headers only) after the runs"
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["scaling"]))
    print(json.dumps(result["targets"], indent=1))


def targets(rows: list[dict], skipped: list[dict]) -> dict:
    """The issue's three ratios; a flat run stopped at --rss-limit gives an upper bound on hierarchical / flat."""
    by = {(r["mode"], r["num_sources"]): r for r in rows}
    out = {}
    kmax = max(r["num_sources"] for r in rows + skipped)
    stream, flat, hier = (by.get((m, kmax)) for m in ("streaming", "flat", "hierarchical"))
    if stream:
        ratio = stream["peak_rss_mb"] / stream["model_mb"]
        out["streaming_peak_over_one_model"] = {"num_sources": kmax, "value": round(ratio, 3),
                                                "target": f"<= {TARGETS['streaming_over_model']}",
                                                "met": ratio <= TARGETS["streaming_over_model"]}
    flat_floor = next((s["peak_rss_at_least_mb"] for s in skipped
                       if (s["mode"], s["num_sources"]) == ("flat", kmax) and "peak_rss_at_least_mb" in s), None)
    if hier and (flat or flat_floor):
        ratio = hier["peak_rss_mb"] / (flat["peak_rss_mb"] if flat else flat_floor)
        entry = {"num_sources": kmax, "group_size": GROUP_SIZE, "value": round(ratio, 3),
                 "target": f"<= {TARGETS['hierarchical_over_flat']}", "met": ratio <= TARGETS["hierarchical_over_flat"]}
        if not flat:  # flat was stopped at the limit: its peak is at least that, the ratio at most this
            entry = {"num_sources": kmax, "group_size": GROUP_SIZE, "value_at_most": round(ratio, 3),
                     "flat_peak_at_least_mb": flat_floor, "target": entry["target"],
                     "met": True if ratio <= TARGETS["hierarchical_over_flat"] else "unknown"}
        out["hierarchical_peak_over_flat_peak"] = entry
    errors = [abs(r["estimated_mb"] - r["peak_rss_mb"]) / r["peak_rss_mb"] for r in rows]
    worst = max(range(len(rows)), key=errors.__getitem__)
    out["max_estimate_error"] = {"value": round(errors[worst], 3),
                                 "at": f"{rows[worst]['mode']} K={rows[worst]['num_sources']}",
                                 "target": f"<= {TARGETS['estimate_error']}",
                                 "met": errors[worst] <= TARGETS["estimate_error"]}
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'mode':<13}{'K':>3}{'model MB':>10}{'peak RSS MB':>13}{'estimate MB':>13}{'error':>8}{'seconds':>9}"]
    for r in rows:
        err = (r["estimated_mb"] - r["peak_rss_mb"]) / r["peak_rss_mb"]
        lines.append(f"{r['mode']:<13}{r['num_sources']:>3}{r['model_mb']:>10.0f}{r['peak_rss_mb']:>13.0f}"
                     f"{r['estimated_mb']:>13.0f}{err:>+8.1%}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="Where the checkpoints are kept.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--trace", action="store_true", help="Print RSS per phase of each run; write no JSON.")
    parser.add_argument("--tiny", action="store_true", help="Smoke run on a tiny model (cache/memory-tiny); no JSON.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's).")
    parser.add_argument("--wait", type=float, default=600, help="Seconds to wait for free memory before skipping.")
    parser.add_argument("--rss-limit", type=float, default=16384,
                        help="MB: stop a run whose RSS passes this (shared machines); it is listed as skipped.")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="Bytes: run each child with MALLOC_MMAP_THRESHOLD_ set (glibc allocator diagnostic).")
    parser.add_argument("--fresh", action="store_true", help="Start the results file anew (default: replace "
                        "only the rows of the modes and K run now).")
    parser.add_argument("--resume", action="store_true", help="Skip the runs already in the results file.")
    parser.add_argument("--cleanup", action="store_true", help="Delete the checkpoints at the end.")
    parser.add_argument("--reestimate", action="store_true", help="Only recompute the estimates of the results "
                        "file from the checkpoints' headers (after a change of the library's memory estimate).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny and args.workdir == DEFAULT_WORKDIR:
        args.workdir = DEFAULT_WORKDIR.with_name("memory-tiny")
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    # the checkpoints are written by a child too, so that this parent stays small during the measurements
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import memory; "
                    f"memory.build_models(memory.Path({str(args.workdir)!r}), {max(args.ks)}, "
                    f"memory.{'TINY' if args.tiny else 'MODEL'})"], check=True)
    base = args.workdir / "base"
    sources = [args.workdir / f"finetune{i}" for i in range(max(args.ks))]
    if args.reestimate:
        reestimate(args, base, sources)
        return 0
    rows, skipped = [], []
    done = set()
    if args.resume and args.output.is_file():  # the runs already in the results (e.g. after an interruption)
        section = json.loads(args.output.read_text())
        section = section.get("allocator_diagnostic", {}) if args.mmap_threshold else section
        done = {(r["mode"], r["num_sources"]) for r in section.get("scaling", []) + section.get("skipped", [])}
    try:
        for k in args.ks:
            for mode in args.modes:
                if (mode, k) in done:
                    continue
                print(f"Run: {mode}, K={k}", flush=True)
                spec = {"mode": mode, "num_sources": k, "base": str(base), "sources": [str(s) for s in sources],
                        "trace": args.trace, "threads": args.threads, "rss_limit_mb": args.rss_limit,
                        "mmap_threshold": args.mmap_threshold}
                spec["estimate_mb"] = _estimate_in_child(spec)
                record = run_child(spec, args.wait)
                if record is None or record.get("aborted"):
                    skip = {"mode": mode, "num_sources": k, "estimated_mb": round(spec["estimate_mb"], 1),
                            "reason": "not enough free memory on the (shared) machine"}
                    if record:
                        skip.update(reason="stopped: RSS passed --rss-limit", peak_rss_at_least_mb=args.rss_limit)
                    skipped.append(skip)
                    if not (args.trace or args.tiny):
                        save(args, rows, skipped)
                    continue
                trace = record.pop("trace", None)
                rows.append(record)
                print(table([record]).splitlines()[1], flush=True)
                if not (args.trace or args.tiny):
                    save(args, rows, skipped)
                if trace:
                    print(json.dumps(trace["peak_rss_mb_by_phase"], indent=1))
                    for event in trace["events"]:
                        print("   ", *event)
    finally:
        if args.cleanup:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if not rows:
        return 1
    print("\n" + table(rows))
    print(json.dumps(targets(rows, skipped), indent=1))
    if not (args.trace or args.tiny):
        print(f"Written to {args.output}")
    return 0


def save(args: argparse.Namespace, rows: list[dict], skipped: list[dict]) -> None:
    """Write (after every run) this invocation's rows into the results, replacing rows of the same mode and K.

    Runs with the default allocator fill `scaling`; runs with --mmap-threshold fill `allocator_diagnostic`.
    """
    result = json.loads(args.output.read_text()) if args.output.is_file() and not args.fresh else {}
    section = result.setdefault("allocator_diagnostic", {}) if args.mmap_threshold else result
    done = {(r["mode"], r["num_sources"]) for r in rows + skipped}
    order = lambda r: (r["num_sources"], MODES.index(r["mode"]))  # noqa: E731
    section["scaling"] = sorted([r for r in section.get("scaling", []) if (r["mode"], r["num_sources"]) not in done]
                                + rows, key=order)
    section["skipped"] = sorted([r for r in section.get("skipped", []) if (r["mode"], r["num_sources"]) not in done]
                                + skipped, key=order)
    if section["scaling"]:
        section["targets"] = targets(section["scaling"], section["skipped"])
    if args.mmap_threshold:
        section["malloc_mmap_threshold"] = args.mmap_threshold
        section["note"] = ("The same runs with MALLOC_MMAP_THRESHOLD_ set, so that glibc hands freed tensors back "
                           "at once: the peak RSS is then what is live; the difference to `scaling` is freed memory "
                           "that the default allocator keeps.")
    result["setup"] = {
        "model": "BertModel(BertConfig(" + ", ".join(f"{k}={v}" for k, v in (TINY if args.tiny else MODEL).items())
                 + ")), random; sources: BertForSequenceClassification(num_labels=2), base + N(0, 1e-3) noise",
        "steps": STEPS, "batch_size": BATCH, "examples_per_task": EXAMPLES, "sequence_length": SEQ_LEN,
        "holdout_fraction": 0.0, "group_size": GROUP_SIZE, "device": "cpu",
        "allocator": "glibc malloc, default settings (`scaling`)",
        "rss_limit_mb": args.rss_limit,
        "peak_rss": "getrusage(RUSAGE_SELF).ru_maxrss at the end of a fresh process per run",
        "estimated_mb": "SuperMerger.estimate_memory(group_size=2) host_mb of the run's mode",
        "command": "python benchmarks/memory.py",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


def _estimate_in_child(spec: dict) -> float:
    """Headers-only estimate, computed in a short-lived process so that the parent imports no torch."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import memory; "
            f"print(memory.plan_estimate(memory.Path({spec['base']!r}), [memory.Path(p) for p in {spec['sources']!r}], "
            f"{spec['mode']!r}, {spec['num_sources']}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
