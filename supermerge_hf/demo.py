"""`supermerge demo`: real MiniLM fine-tunes of real offline tasks, merged from 32 labelled examples per task."""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .config import SuperMergeConfig
from .demo_tasks import load_task, minilm_path, tokenize_examples
from .finetune import finetune_classifier, finetune_lora_classifier
from .examples import as_examples
from .merger import SuperMerger
from .objectives import FunctionalMerge

logger = logging.getLogger(__name__)

LAMBDA_GRID = [round(0.1 * i, 1) for i in range(1, 11)]


def accuracies(fm: FunctionalMerge, c: torch.Tensor, examples: dict[str, list], name: str | None = None):
    """Per-task accuracy of the merged model with coefficients `c` `(S, G)`."""
    out = {}
    for task, ex in examples.items():
        labels = torch.stack([e["labels"] for e in ex])  # (N,)
        desc = f"Evaluating {name} on {task}" if name else None
        out[task] = float((fm.predictions(c, task, ex, desc=desc) == labels).float().mean())
    return out


def pick_task_arithmetic(fm: FunctionalMerge, shape: tuple[int, int], labelled: dict[str, list]):
    """lambda of the grid with the best mean accuracy on the labelled examples (the first one on ties)."""
    scores = {lam: sum(accuracies(fm, torch.full(shape, lam), labelled).values()) for lam in LAMBDA_GRID}
    best = max(LAMBDA_GRID, key=lambda lam: scores[lam])
    logger.info("Task arithmetic: lambda grid scores %s, picked %.1f", scores, best)
    return best


def format_table(rows: dict[str, dict[str, float]], tasks: list[str]) -> str:
    width = max(len(r) for r in rows)
    head = f"{'method':<{width}}  " + "  ".join(f"{t:>8}" for t in tasks) + f"  {'mean':>8}"
    lines = [head, "-" * len(head)]
    for name, acc in rows.items():
        cells = "  ".join(f"{acc[t]:>8.3f}" for t in tasks)
        lines.append(f"{name:<{width}}  {cells}  {sum(acc[t] for t in tasks) / len(tasks):>8.3f}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Fine-tune (cached), merge, evaluate, print the accuracy table; optionally save the merge."""
    start = time.perf_counter()
    cache = Path(args.cache_dir or Path.home() / ".cache" / "supermerge_hf" / "demo").expanduser()
    lora = args.lora
    output = Path(args.output) / "merged" if args.output else None
    adapter = Path(args.output) / "adapter" if args.output and lora else None
    for folder in (output, adapter):
        if folder is not None and folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
            raise FileExistsError(f"{str(folder)!r} already holds files: pass --overwrite or another --output.")
    base = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = {t: load_task(t) for t in args.tasks}
    if lora:  # PEFT LoRA adapters (r=8, the classifier in modules_to_save), merged in LoRA space
        finetunes = {t: finetune_lora_classifier(base, data[t], cache / f"minilm-lora-{t}") for t in args.tasks}
    else:
        finetunes = {t: finetune_classifier(base, data[t], cache / f"minilm-{t}") for t in args.tasks}
    logger.info("Fine-tunes ready after %.0f s: %s", time.perf_counter() - start, finetunes)

    rng = random.Random(args.seed)
    labelled = {t: tokenize_examples(tokenizer, rng.sample(data[t].pool, args.examples_per_task)) for t in args.tasks}
    test = {t: as_examples(t, tokenize_examples(tokenizer, data[t].test[: args.test_size])) for t in args.tasks}
    config = SuperMergeConfig(
        base=str(base),
        sources=[{"task": t, "path": str(p)} for t, p in finetunes.items()],
        examples_per_task=args.examples_per_task,
        seed=args.seed,
        **({"steps": args.steps} if args.steps else {}),
    )
    merger = SuperMerger(config)
    fm = merger.functional
    shape = (len(args.tasks), len(merger.plan.groups))
    rows = {"fine-tunes (each on its own task)": {}}
    for i, task in enumerate(args.tasks):  # each fine-tune on its own task: c = one-hot
        one_hot = torch.zeros(shape)
        one_hot[i] = 1.0
        rows["fine-tunes (each on its own task)"] |= accuracies(fm, one_hot, {task: test[task]}, f"fine-tune {task}")
    labelled_tensors = {t: as_examples(t, ex) for t, ex in labelled.items()}
    lam = pick_task_arithmetic(fm, shape, labelled_tensors)
    rows[f"task arithmetic (lambda={lam})"] = accuracies(fm, torch.full(shape, lam), test, "task arithmetic")
    learn_start = time.perf_counter()
    merger.fit(labelled)
    learn_seconds = time.perf_counter() - learn_start
    rows["supermerge"] = accuracies(fm, merger.coefficients.values, test, "supermerge")

    print(f"\nTest accuracy{' of LoRA fine-tunes' if lora else ''} "
          f"({', '.join(f'{t}: {len(test[t])}' for t in args.tasks)} examples; "
          f"{args.examples_per_task} labelled examples per task for merging)\n")
    print(format_table(rows, args.tasks))
    print(f"\nSuperMerge learned {shape[0]} x {shape[1]} coefficients in {learn_seconds:.0f} s "
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
