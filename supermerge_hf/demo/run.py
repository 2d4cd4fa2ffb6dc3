"""`supermerge demo`: real MiniLM fine-tunes of real offline tasks, merged from 32 labelled examples per task."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
from pathlib import Path

from transformers import AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger

from .finetune import finetune_classifier, finetune_lora_classifier
from .tasks import load_task, minilm_path, tokenize_examples

logger = logging.getLogger(__name__)


def format_table(rows: dict[str, dict[str, float]], tasks: list[str]) -> str:
    width = max(len(r) for r in rows)
    head = f"{'method':<{width}}  " + "  ".join(f"{t:>8}" for t in tasks) + f"  {'mean':>8}"
    lines = [head, "-" * len(head)]
    for name, acc in rows.items():
        cells = "  ".join(f"{acc[t]:>8.3f}" for t in tasks)
        lines.append(f"{name:<{width}}  {cells}  {sum(acc[t] for t in tasks) / len(tasks):>8.3f}")
    return "\n".join(lines)


def check_outputs(args: argparse.Namespace, *, adapter: bool) -> tuple[Path | None, Path | None]:
    """`OUTPUT/merged` and (`adapter`) `OUTPUT/adapter`, or `None` without `--output`; `FileExistsError` before
    minutes of fine-tuning, not after, if one already holds files and `--overwrite` is not given."""
    folders = (Path(args.output) / "merged" if args.output else None,
               Path(args.output) / "adapter" if args.output and adapter else None)
    for folder in folders:
        if folder is not None and folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
            raise FileExistsError(f"{str(folder)!r} already holds files: pass --overwrite or another --output.")
    return folders


def _accuracy(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {task: m["accuracy"] for task, m in metrics.items()}


def run_demo(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Fine-tune (cached), merge, evaluate, print the accuracy table; optionally save the merge."""
    start = time.perf_counter()
    cache = Path(args.cache_dir or Path.home() / ".cache" / "supermerge_hf" / "demo").expanduser()
    output, adapter = check_outputs(args, adapter=args.lora)
    base = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = {t: load_task(t) for t in args.tasks}
    # PEFT LoRA adapters (r=8, the classifier in modules_to_save) are merged in LoRA space
    finetune, prefix = (finetune_lora_classifier, "minilm-lora") if args.lora else (finetune_classifier, "minilm")
    finetunes = {t: finetune(base, data[t], cache / f"{prefix}-{t}") for t in args.tasks}
    logger.info("Fine-tunes ready after %.0f s: %s", time.perf_counter() - start, finetunes)

    rng = random.Random(args.seed)
    pools = {t: rng.sample(data[t].pool, len(data[t].pool)) for t in args.tasks}  # shuffled: labelled ones first
    labelled = {t: tokenize_examples(tokenizer, pools[t][: args.examples_per_task]) for t in args.tasks}
    # the rest of each pool without its labels: the inputs SuperMerge's default distils each fine-tune on
    unlabelled = {t: [{k: v for k, v in ex.items() if k != "labels"}
                      for ex in tokenize_examples(tokenizer, pools[t][args.examples_per_task:])]
                  for t in args.tasks if len(pools[t]) > args.examples_per_task}
    test = {t: tokenize_examples(tokenizer, data[t].test[: args.test_size]) for t in args.tasks}
    config = SuperMergeConfig(
        base=str(base),
        sources=[{"task": t, "path": str(p)} for t, p in finetunes.items()],
        examples_per_task=args.examples_per_task,
        seed=args.seed,
        **({"steps": args.steps} if args.steps else {}),
    )
    rows = {}
    arithmetic = SuperMerger(dataclasses.replace(config, method="task_arithmetic", method_kwargs={"lam": "auto"}))
    rows["fine-tunes (each on its own task)"] = _accuracy(arithmetic.evaluate(test, finetunes=True))
    arithmetic.fit(labelled)  # lambda from a grid, by accuracy on the labelled examples
    rows[f"task arithmetic (lambda={arithmetic.chosen['lam']:g})"] = _accuracy(arithmetic.evaluate(test))
    del arithmetic
    merger = SuperMerger(config)
    learn_start = time.perf_counter()
    merger.fit(labelled, unlabelled=unlabelled)
    learn_seconds = time.perf_counter() - learn_start
    rows["supermerge"] = _accuracy(merger.evaluate(test))

    print(f"\nTest accuracy{' of LoRA fine-tunes' if args.lora else ''} "
          f"({', '.join(f'{t}: {len(test[t])}' for t in args.tasks)} examples; "
          f"{args.examples_per_task} labelled examples per task for merging)\n")
    print(format_table(rows, args.tasks))
    num_sources, num_groups = merger.coefficients.values.shape
    print(f"\nSuperMerge learned {num_sources} x {num_groups} coefficients in {learn_seconds:.0f} s "
          f"(selected step {merger.selected_step} of {config.steps}); total {time.perf_counter() - start:.0f} s.")
    if output is not None:
        merger.save_pretrained(output, overwrite=args.overwrite)
        print(f"\nMerged body: {output} (AutoModel.from_pretrained). Each task's complete classifier: "
              f"supermerge_hf.load_task_model({str(output)!r}, {args.tasks[0]!r}).")
    if adapter is not None:
        merger.save_adapter(adapter, overwrite=args.overwrite)
        print(f"Combined LoRA adapter of the base body: {adapter} "
              f"(PeftModel.from_pretrained(AutoModel.from_pretrained(base), {str(adapter)!r})).")
    return rows
