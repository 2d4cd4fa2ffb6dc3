"""The one fine-tuning recipe of the demo and the benchmarks (full and LoRA), and test accuracy.

Turns a base and a `TaskData` (see `tasks.py`) into a cached fine-tuned classifier folder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .tasks import TaskData

logger = logging.getLogger(__name__)

LORA_TARGETS = ("query", "key", "value", "dense")  # attention, its output, the MLP and the pooler of a BERT


def evaluate_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict], *,
                      batch_size: int = 64, max_length: int = 64) -> float:
    """Accuracy of a sequence classifier on examples `{"text": str, "label": int}`, in batches, without grad.

    Args:
        model (`PreTrainedModel`): A sequence classifier; its training mode is restored afterwards.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        examples (`list[dict]`): Labelled examples, at least one.
        batch_size (`int`, *optional*, defaults to 64): Examples per forward pass.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.

    Returns:
        `float`: The fraction of examples whose arg-max logit is the label.

    Raises:
        `ValueError`: If `examples` is empty.
    """
    if not examples:
        raise ValueError("`examples` is empty; pass at least one labelled example to evaluate accuracy.")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            inputs = _encode(tokenizer, batch, max_length).to(model.device)
            logits = model(**inputs).logits  # (B, num_labels)
            labels = torch.tensor([e["label"] for e in batch], device=logits.device)  # (B,)
            correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / len(examples)


def finetune_classifier(base_path: str | Path, task: TaskData, output_dir: str | Path, *, steps: int = 300,
                        batch_size: int = 16, learning_rate: float = 1e-4, max_length: int = 64, seed: int = 0) -> Path:
    """Fine-tune a sequence classifier on `task.train` with the demo recipe, or return the cached result.

    Embeddings frozen (so their task vector is exactly zero), AdamW at a constant learning rate, bf16 autocast,
    dynamic padding, batches from seeded permutations of `task.train`. The model (safetensors), tokenizer and
    `finetune.json` (the recipe) go to a temporary folder beside `output_dir`, then renamed to it.

    Args:
        base_path (`str` or `Path`): Local folder of the pretrained base and its tokenizer.
        task (`TaskData`): The task, from `load_task`.
        output_dir (`str` or `Path`): Where to save. If it holds the weights already, it is returned at once.
        steps (`int`, *optional*, defaults to 300): Optimizer steps.
        batch_size (`int`, *optional*, defaults to 16): Examples per step.
        learning_rate (`float`, *optional*, defaults to 1e-4): AdamW learning rate.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.
        seed (`int`, *optional*, defaults to 0): Seeds the classifier initialization, dropout and batches.

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: If `steps`, `batch_size` or `learning_rate` is not positive, or `task.train` is empty.
        `FileExistsError`: If `output_dir` exists, is not empty and holds no weights.
    """

    def build() -> PreTrainedModel:
        model = _new_classifier(base_path, task)
        model.get_input_embeddings().requires_grad_(False)  # at least the word embeddings
        if hasattr(model.base_model, "embeddings"):  # BERT-like: positions, token types, LayerNorm too
            model.base_model.embeddings.requires_grad_(False)
        return model

    recipe = {"frozen": "embeddings"}
    return _finetune(build, base_path, task, Path(output_dir), "model.safetensors", recipe, steps=steps,
                     batch_size=batch_size, learning_rate=learning_rate, max_length=max_length, seed=seed)


def finetune_lora_classifier(base_path: str | Path, task: TaskData, output_dir: str | Path, *, steps: int = 300,
                             batch_size: int = 16, learning_rate: float = 5e-4, max_length: int = 64, seed: int = 0,
                             r: int = 8, lora_alpha: int = 16, target_modules: tuple[str, ...] = LORA_TARGETS) -> Path:
    """Fine-tune a PEFT LoRA adapter of a sequence classifier on `task.train`, or return the cached result.

    The recipe of `finetune_classifier` with LoRA on the frozen base, the classifier in `modules_to_save` and a
    learning rate suited to LoRA. The adapter is saved in PEFT's format (`adapter_config.json` +
    `adapter_model.safetensors`). Arguments, return value and errors as `finetune_classifier`, plus:

    Args:
        r (`int`, *optional*, defaults to 8): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 16): LoRA scaling numerator (scale `lora_alpha / r`).
        target_modules (`tuple[str, ...]`, *optional*): Module name suffixes that get LoRA.
    """
    from peft import LoraConfig, get_peft_model

    lora = {"r": r, "lora_alpha": lora_alpha, "target_modules": list(target_modules), "modules_to_save": ["classifier"]}

    def build() -> PreTrainedModel:
        # a copy: LoraConfig appends to modules_to_save in place, which would change the saved recipe
        return get_peft_model(_new_classifier(base_path, task), LoraConfig(task_type="SEQ_CLS", **copy.deepcopy(lora)))

    return _finetune(build, base_path, task, Path(output_dir), "adapter_model.safetensors", {"lora": lora},
                     steps=steps, batch_size=batch_size, learning_rate=learning_rate, max_length=max_length, seed=seed)


def _finetune(build: Callable[[], PreTrainedModel], base_path: str | Path, task: TaskData, output_dir: Path,
              weights: str, variant: dict, *, steps: int, batch_size: int, learning_rate: float, max_length: int,
              seed: int) -> Path:
    """Reuse `output_dir` if it holds `weights`, else check, train `build()` with the recipe, save atomically."""
    recipe = {"task": task.name, "base_path": str(base_path), "steps": steps, "batch_size": batch_size,
              "learning_rate": learning_rate, "max_length": max_length, "seed": seed, **variant,
              "optimizer": "AdamW", "autocast": "bfloat16", "train_examples": len(task.train)}  # fmt: skip
    if (output_dir / weights).is_file():
        recipe_file = output_dir / "finetune.json"
        cached = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}
        differing = sorted(k for k in recipe if k != "base_path" and cached.get(k) != recipe[k])
        if differing:
            logger.warning("Reusing %s although its recipe differs in %s; delete it to retrain.", output_dir, differing)
        logger.info("Found a fine-tune in %s; not retraining.", output_dir)
        return output_dir
    if steps <= 0 or batch_size <= 0 or learning_rate <= 0:
        raise ValueError(
            f"steps, batch_size and learning_rate must be positive, got {steps}, {batch_size} and {learning_rate}."
        )
    if not task.train:
        raise ValueError(f"Task {task.name!r} has no train examples to fine-tune on.")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty but holds no {weights}; remove it.")

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.random.fork_rng(devices=[]):  # seed init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        model = build()
        _train(model, tokenizer, task, steps, batch_size, learning_rate, max_length, seed)
    recipe["train_seconds"] = round(time.perf_counter() - start, 1)
    _save_atomically(output_dir, model, tokenizer, recipe)
    logger.info("Fine-tuned on %s in %.0f s, saved to %s.", task.name, recipe["train_seconds"], output_dir)
    return output_dir


def _new_classifier(base_path: str | Path, task: TaskData) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=len(task.labels), id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)}, dtype=torch.float32,
    )  # fmt: skip


def _encode(tokenizer: PreTrainedTokenizerBase, batch: list[dict], max_length: int):
    # Dynamic padding: pad to the longest text of the batch, not to max_length.
    texts = [e["text"] for e in batch]
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def _train(model, tokenizer, task: TaskData, steps: int, batch_size: int, learning_rate: float, max_length: int,
           seed: int) -> None:
    """AdamW on the trainable parameters, constant learning rate, bf16 autocast, seeded batches of `task.train`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    progress = tqdm(range(steps), desc=f"fine-tune {task.name}", unit="step")
    for step in progress:
        while len(order) < batch_size:  # epochs of seeded permutations: every example seen before any repeats
            order += torch.randperm(len(task.train), generator=generator).tolist()
        batch = [task.train[i] for i in order[:batch_size]]
        order = order[batch_size:]
        inputs = _encode(tokenizer, batch, max_length)
        labels = torch.tensor([e["label"] for e in batch])  # (B,)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")


def _save_atomically(output_dir: Path, model, tokenizer, recipe: dict) -> None:
    """`save_pretrained` (a model or a PEFT adapter), tokenizer and `finetune.json`, written beside, then renamed."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()  # not tempfile.mkdtemp: its mode 0700 would survive the rename
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "finetune.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if output_dir.exists():
            output_dir.rmdir()  # empty, checked before training
        os.rename(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
