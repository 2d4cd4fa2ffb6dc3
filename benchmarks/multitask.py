"""The multitask reference: one MiniLM body and one classifier head per task, fine-tuned jointly, cached.

Same recipe as the individual fine-tunes (`finetune_classifier`: embeddings frozen, AdamW lr 1e-4 constant,
batch 16, texts cut to 64 tokens, bf16 autocast, seed 0) and the same total number of steps: tasks take turns
(step k trains on a batch of task k mod T), so with T tasks and `steps_per_task` 300 the body takes T x 300
steps and each task sees exactly the batches budget of its own fine-tune. Saved as one complete
`BertForSequenceClassification` folder per task under `benchmarks/cache/multitask/<task>/` (all with the same
body) plus `multitask.json` (the recipe and the training time).

    python benchmarks/multitask.py [--tasks bbc spam]      # trains once; later runs reuse the cache
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from build_data import HERE, TEXT5, load_tasks
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from supermerge_hf.demo.tasks import TaskData, minilm_path

logger = logging.getLogger("multitask")

MULTITASK = HERE / "cache" / "multitask"
RECIPE_NAME = "multitask.json"


def finetune_multitask(
    base_path: str | Path,
    tasks: dict[str, TaskData],
    output_dir: str | Path,
    *,
    steps_per_task: int = 300,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """Fine-tune one shared body with one head per task (round robin over tasks), or reuse the cache."""
    output_dir = Path(output_dir)
    recipe = {"tasks": list(tasks), "steps_per_task": steps_per_task, "total_steps": steps_per_task * len(tasks),
              "batch_size": batch_size, "learning_rate": learning_rate, "max_length": max_length, "seed": seed,
              "frozen": "embeddings", "optimizer": "AdamW", "autocast": "bfloat16", "schedule": "round robin",
              "train_examples": {n: len(t.train) for n, t in tasks.items()}}  # fmt: skip
    recipe_file = output_dir / RECIPE_NAME
    if recipe_file.is_file():
        cached = json.loads(recipe_file.read_text())
        differing = sorted(k for k in recipe if cached.get(k) != recipe[k])
        if not differing:
            logger.info("Found the multitask fine-tune in %s; not retraining.", output_dir)
            return output_dir
        raise FileExistsError(f"{output_dir} holds a multitask fine-tune whose recipe differs in {differing}; "
                              "delete the folder to retrain.")  # fmt: skip

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {}
        for name, task in tasks.items():
            models[name] = AutoModelForSequenceClassification.from_pretrained(
                base_path, num_labels=len(task.labels), id2label=dict(enumerate(task.labels)),
                label2id={label: i for i, label in enumerate(task.labels)}, dtype=torch.float32,
            )  # fmt: skip
        first = next(iter(models.values()))
        body = first.base_model  # the one body: every task's classifier runs on it
        for model in models.values():
            setattr(model, model.base_model_prefix, body)
        body.embeddings.requires_grad_(False)
        params = {id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(list(params.values()), lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        orders: dict[str, list[int]] = {name: [] for name in tasks}
        names = list(tasks)
        total = steps_per_task * len(names)
        for model in models.values():
            model.train()
        progress = tqdm(range(total), desc="multitask fine-tune", unit="step")
        for step in progress:
            name = names[step % len(names)]
            while len(orders[name]) < batch_size:  # epochs of seeded permutations, as finetune_classifier
                orders[name] += torch.randperm(len(tasks[name].train), generator=generator).tolist()
            batch = [tasks[name].train[i] for i in orders[name][:batch_size]]
            orders[name] = orders[name][batch_size:]
            inputs = tokenizer([e["text"] for e in batch], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt")  # fmt: skip
            labels = torch.tensor([e["label"] for e in batch])  # (B,)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = models[name](**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0:
                progress.set_postfix(task=name, loss=f"{loss.item():.4f}")
    recipe["train_seconds"] = round(time.perf_counter() - start, 1)

    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for name, model in models.items():
        model.save_pretrained(tmp_dir / name)
        tokenizer.save_pretrained(tmp_dir / name)
    (tmp_dir / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp_dir.rename(output_dir)
    logger.info("Multitask fine-tune of %s in %.0f s, saved to %s.", names, recipe["train_seconds"], output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TEXT5, choices=TEXT5)
    args = parser.parse_args(argv)
    folder = finetune_multitask(minilm_path(), load_tasks(args.tasks), MULTITASK)
    print(json.loads((folder / RECIPE_NAME).read_text()))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main()
