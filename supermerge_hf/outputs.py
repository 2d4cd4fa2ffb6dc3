"""Writing a merge safely (temporary folder, then a rename) and loading a task's complete model back."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PreTrainedModel

from .coefficients import COEFFICIENTS_NAME
from .task_vectors import model_class

if TYPE_CHECKING:
    from .merger import SuperMerger

logger = logging.getLogger(__name__)

HEADS_DIR = "heads"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
)


def check_output_dir(path: str | Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that already holds files, unless overwriting is asked.

    Raises:
        `FileExistsError`: `path` is a non-empty folder (or a file) and `overwrite` is False.
    """
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not overwrite):
        raise FileExistsError(
            f"Output folder {str(path)!r} already holds files. Choose another folder, or pass overwrite=True "
            "(CLI: --overwrite) to replace it."
        )


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success move it into place, so a failure never loses data."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{tmp.name}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def save_merge(merger: SuperMerger, save_directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write a merge as a standard checkpoint folder.

    Layout: the merged model (`config.json`, safetensors), the base's tokenizer files, `supermerge_config.json`,
    `coefficients.json` (learned methods), `README.md` (model card), and `heads/<task>/` (the source's config
    and its task-specific tensors) for each task whose head is not merged. Load a task's complete model with
    `load_task_model(save_directory, task)`.
    """
    from .card import build_model_card

    plan = merger.plan
    with atomic_output_dir(save_directory, overwrite=overwrite) as tmp:
        merger.merge_and_unload().save_pretrained(tmp, max_shard_size=merger.config.max_shard_size)
        copy_tokenizer(plan.base.folder, tmp)
        for task, source in plan.task_specs.items():
            names = plan.task_specific[task]
            if not names:
                continue
            head_dir = tmp / HEADS_DIR / task
            head_dir.mkdir(parents=True)
            source.config.save_pretrained(head_dir)
            tensors = {source.param_names[n]: source.get_tensor(n).contiguous() for n in names}
            save_file(tensors, head_dir / "head.safetensors", metadata={"format": "pt"})
        config = dataclasses.replace(merger.config, merge_info=merger.merge_info())
        config.save_pretrained(tmp)
        if merger.coefficients is not None:
            merger.coefficients.save(tmp / COEFFICIENTS_NAME)
        if merger.levels:  # hierarchical: each level's groups and coefficients
            (tmp / "hierarchy.json").write_text(json.dumps(merger.levels, indent=1) + "\n")
        build_model_card(merger, tmp).save(tmp / "README.md")
    logger.info("Saved the merge to %s", save_directory)
    return Path(save_directory)


def load_task_model(merged_dir: str | Path, task: str, **kwargs) -> PreTrainedModel:
    """Load one task's complete model from a merge: the merged body plus that task's own head.

    The body is stored once; each task folder `heads/<task>` holds only the head and the task's config.

    Args:
        merged_dir (`str` or `Path`): A folder written by `SuperMerger.save_pretrained`.
        task (`str`): A task name of the merge.
        kwargs: Passed to `from_pretrained` (e.g. `dtype`).

    Example:
        ```python
        model = load_task_model("merged", "bbc")  # a BertForSequenceClassification with bbc's classifier
        ```

    Raises:
        `FileNotFoundError`: The merge has no head for `task` (then the merged model itself is complete).
    """
    merged_dir = Path(merged_dir)
    head_dir = merged_dir / HEADS_DIR / task
    if not (head_dir / "head.safetensors").is_file():
        known = sorted(p.name for p in (merged_dir / HEADS_DIR).iterdir()) if (merged_dir / HEADS_DIR).is_dir() else []
        raise FileNotFoundError(
            f"No head for task {task!r} in {str(merged_dir)!r} (tasks with heads: {known}). Without a head the "
            "merged model is complete: load it with AutoModel*.from_pretrained."
        )
    config = AutoConfig.from_pretrained(head_dir)
    cls = model_class(config)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head is reported "newly initialised" before we load it
    try:
        model = cls.from_pretrained(merged_dir, config=config, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    head = load_file(head_dir / "head.safetensors")
    with torch.no_grad():
        for name, tensor in head.items():
            param = model.get_parameter(name)
            param.copy_(tensor.to(param.dtype))
    return model.eval()
