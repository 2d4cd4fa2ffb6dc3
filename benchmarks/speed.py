"""Speed on text-5, measured side by side in one run; writes results/speed.json.

1. One coefficient-learning step vs one fine-tuning step of the same MiniLM on the same batches: 8 labelled
   examples of each of the five tasks (a SuperMerge step sees all five; so does the fine-tuning step, which
   is the multitask recipe's: one body, one head per task, AdamW on every trainable parameter, embeddings
   frozen as in `finetune_classifier`). Both in float32 on the CPU, the same threads. A learning step is
   timed through the public API: `SuperMerger.fit` with 2 + `--steps` steps minus `fit` with 2 steps (no
   hold-out, evaluation only at the end), divided by `--steps`; a fine-tuning step is the median of `--steps`
   timed steps after 2 warm-up steps.
2. Data-free TIES on the five fine-tunes (density 0.2 per tensor, λ = 1): `supermerge merge` (the CLI, which
   also writes heads, config and card) vs `mergekit-pytorch` (mergekit 0.1.5, tensors renamed to the base's
   names beforehand, untimed); wall time and peak RSS of each process.

    python benchmarks/speed.py            # needs the cached fine-tunes (benchmarks/finetune_all.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from build_data import HERE, TEXT5, load_tasks
from finetune_all import FINETUNES
from run_text5 import draw_labelled
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.demo.tasks import minilm_path, tokenize_examples

RESULTS = HERE / "results" / "speed.json"
# the setting results/speed.json was measured with (the package default then): the paper's SuperMerge
PAPER = {"granularity": "tensor", "method_kwargs": {"objective": "labels", "start": "constant", "refit_heads": 0}}
# Runs a command and prints its own peak RSS (KB): RUSAGE_CHILDREN of a process whose only child is it.
RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def timed(step, steps: int) -> list[float]:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def step_times(batch_size: int, steps: int) -> dict:
    tasks = load_tasks(TEXT5, check=False)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batches = {t: tokenize_examples(tokenizer, draw_labelled(tasks[t], 0, batch_size)) for t in TEXT5}

    def fit_seconds(learn_steps: int) -> tuple[float, SuperMerger]:
        # every step sees all batch_size examples of every task; no hold-out, evaluated once at the end
        sources = [{"task": t, "path": str(FINETUNES / t)} for t in TEXT5]
        config = SuperMergeConfig(base=str(minilm_path()), sources=sources, steps=learn_steps, eval_every=learn_steps,
                                  batch_size=batch_size, examples_per_task=batch_size, holdout_fraction=0.0,
                                  **PAPER)
        merger = SuperMerger(config)
        start = time.perf_counter()
        merger.fit(batches)
        return time.perf_counter() - start, merger

    short, _ = fit_seconds(2)
    long, merger = fit_seconds(2 + steps)
    learn_step_s = (long - short) / steps

    models = {t: AutoModelForSequenceClassification.from_pretrained(FINETUNES / t, dtype=torch.float32) for t in TEXT5}
    body = models[TEXT5[0]].bert
    for model in models.values():
        model.bert = body
        model.train()
    body.embeddings.requires_grad_(False)
    params = list({id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}.values())
    adamw = torch.optim.AdamW(params, lr=1e-4)
    inputs = {t: tokenizer.pad(batches[t], return_tensors="pt") for t in TEXT5}  # labels included

    def finetune_step() -> None:
        loss = sum(models[t](**inputs[t]).loss for t in TEXT5)
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    tune = statistics.median(timed(finetune_step, steps))
    return {
        "batch": f"{batch_size} examples x {len(TEXT5)} tasks, texts cut to 64 tokens",
        "threads": torch.get_num_threads(),
        "coefficient_step_s": round(learn_step_s, 4),
        "finetune_step_s": round(tune, 4),
        "ratio_coefficient_over_finetune": round(learn_step_s / tune, 3),
        "trained_numbers": {"coefficients": merger.coefficients.values.numel(),
                            "finetune": sum(p.numel() for p in params)},
        "timed_steps": steps,
        "coefficient_step": "(fit with 2 + timed_steps steps - fit with 2 steps) / timed_steps",
    }


def run_measured(command: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rss_kb = int(done.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"wall_s": round(seconds, 2), "peak_rss_mb": round(rss_kb / 1024, 1)}


def ties_vs_mergekit(work: Path, density: float, lam: float) -> dict:
    base_file = minilm_path() / "model.safetensors"
    names = set(load_file(base_file))
    models = []
    for task in TEXT5:  # mergekit-pytorch matches tensors by name: the fine-tunes' bodies under the base's names
        body = {k.removeprefix("bert."): v for k, v in load_file(FINETUNES / task / "model.safetensors").items()}
        save_file({k: v for k, v in body.items() if k in names}, work / f"{task}.safetensors")
        models.append({"model": str(work / f"{task}.safetensors"), "parameters": {"weight": 1.0, "density": density}})
    mergekit_config = {"merge_method": "ties", "base_model": str(base_file), "models": models, "dtype": "float32",
                       "parameters": {"lambda": lam}}  # fmt: skip
    (work / "mergekit.yml").write_text(yaml.safe_dump(mergekit_config))
    recipe = {"base": str(minilm_path()), "sources": [{"task": t, "path": str(FINETUNES / t)} for t in TEXT5],
              "method": "ties", "method_kwargs": {"lam": lam, "density": density}, "output_dir": str(work / "ours")}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    mergekit = shutil.which("mergekit-pytorch", path=str(Path(sys.executable).parent)) or "mergekit-pytorch"
    theirs = run_measured([mergekit, str(work / "mergekit.yml"), str(work / "mergekit"), "--quiet"])
    ours = run_measured([sys.executable, "-m", "supermerge_hf.cli", "merge", str(work / "recipe.yaml")])
    merged = load_file(work / "ours" / "model.safetensors")
    reference = load_file(work / "mergekit" / "model.safetensors")
    max_diff = max(float((merged[k] - reference[k]).abs().max()) for k in reference)
    return {"supermerge_hf": ours, "mergekit_pytorch": theirs, "wall_ratio_ours_over_mergekit":
            round(ours["wall_s"] / theirs["wall_s"], 3), "rss_ratio_ours_over_mergekit":
            round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3), "max_abs_difference": max_diff,
            "density": density, "lambda": lam}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per task in a step")
    args = parser.parse_args()
    steps = step_times(args.batch_size, args.steps)
    print(f"coefficient step {steps['coefficient_step_s']:.3f} s, fine-tuning step {steps['finetune_step_s']:.3f} s "
          f"(ratio {steps['ratio_coefficient_over_finetune']:.2f}; {steps['batch']})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        merge = ties_vs_mergekit(Path(tmp), density=0.2, lam=1.0)
    print(f"TIES on 5 fine-tunes: supermerge_hf {merge['supermerge_hf']} vs mergekit-pytorch "
          f"{merge['mergekit_pytorch']} (wall ratio {merge['wall_ratio_ours_over_mergekit']:.2f}, RSS ratio "
          f"{merge['rss_ratio_ours_over_mergekit']:.2f}; max |difference| {merge['max_abs_difference']:.2e})")
    RESULTS.write_text(json.dumps({"step_time": steps, "ties_vs_mergekit": merge}, indent=2) + "\n")
    print(f"Wrote {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
