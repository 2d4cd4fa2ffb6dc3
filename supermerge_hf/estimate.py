"""Peak memory of a merge, estimated from safetensors headers before any weight is loaded."""

import re
from dataclasses import dataclass

import torch

from .plan import MergePlan
from .sources import ModelSpec

# Measured by benchmarks/memory.py and lora_memory.py (CPU): ~380 MB after imports; at the peak of learning ~0.17 of
# a model copy besides the model-sized tensors (gradient, activations, heads: 217 MB for a 1278 MB BERT-large, K = 2).
IMPORT_MB = 380.0
TRANSIENT_COPIES = 0.17
MODES = ("flat", "hierarchical", "streaming")


@dataclass
class Estimate:
    """Expected peak memory (MB) of one mode; `copies` counts model-sized tensors held at the peak."""

    mode: str
    copies: float
    host_mb: float
    device_mb: float


def parse_memory(value: str | int | float) -> float:
    """'8GB', '512MB', '1.5GiB' or a number of bytes -> MB; raises `ValueError` on an unreadable size."""
    if isinstance(value, (int, float)):
        return float(value) / 2**20
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(value), re.I)
    if not match:
        raise ValueError(f"Cannot read memory size {value!r}: write e.g. '8GB' or '512MB'.")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return float(match.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[unit] / 2**20


def estimate(plan: MergePlan, *, dtype: torch.dtype = torch.float32, group_size: int = 2,
             on_device: bool = False) -> list[Estimate]:
    """Peak memory of flat, hierarchical (`group_size`) and streaming learning: the base and merged tensors (each
    gradient is folded into dL/dc and freed) plus all task vectors (flat) or at most `group_size` (hierarchical);
    streaming holds only the merged tensors and two read buffers. Host memory adds the process and its transients."""
    numels = [int(torch.Size(plan.base.shapes[n]).numel()) for n in plan.merged]
    model_mb = sum(numels) * torch.finfo(dtype).bits / 8 / 2**20
    # a full fine-tune holds a dense task vector (one model copy), a LoRA adapter only its factors
    sources = sorted((model_mb if isinstance(s, ModelSpec) else s.checkpoint.nbytes() / 2**20 for s in plan.sources),
                     reverse=True)
    held = {"flat": model_mb + sum(sources), "hierarchical": model_mb + sum(sources[:group_size]),
            "streaming": 2 * (max(numels) * model_mb / sum(numels))}  # two read buffers
    out = []
    for mode in MODES:
        tensors_mb = model_mb + held[mode]
        peak_mb = tensors_mb + TRANSIENT_COPIES * model_mb  # on the device when learning runs there
        out.append(Estimate(mode, tensors_mb / model_mb, IMPORT_MB + (0.0 if on_device else peak_mb),
                            peak_mb if on_device else 0.0))
    return out


def pick_mode(estimates: list[Estimate], max_memory_mb: float | None) -> str | None:
    """The fastest mode that fits: flat, then hierarchical, then streaming; None if none fits."""
    fits = [e.mode for e in estimates if max_memory_mb is None or max(e.host_mb, e.device_mb) <= max_memory_mb]
    return fits[0] if fits else None


def configured_mode(config) -> str:
    return "hierarchical" if config.hierarchical else "streaming" if config.streaming else "flat"


def format_estimates(estimates: list[Estimate], max_memory_mb: float | None = None) -> str:
    lines = [f"{'mode':<13}{'model copies':>13}{'host MB':>10}{'device MB':>11}"]
    lines += [f"{e.mode:<13}{e.copies:>13.1f}{e.host_mb:>10.0f}{e.device_mb:>11.0f}" for e in estimates]
    if max_memory_mb is not None:
        mode = pick_mode(estimates, max_memory_mb)
        lines.append(f"With --max-memory {max_memory_mb:.0f} MB: " + (f"use {mode}." if mode else "no mode fits."))
    return "\n".join(lines)


def check_memory(estimates: list[Estimate], mode: str, max_memory_mb: float) -> None:
    """`ValueError`, before any weight is loaded, when the estimated peak of `mode` exceeds the limit."""
    peak = next(max(e.host_mb, e.device_mb) for e in estimates if e.mode == mode)
    if peak > max_memory_mb:
        raise ValueError(f"A {mode} merge needs about {peak:.0f} MB, more than --max-memory {max_memory_mb:.0f} MB."
                         f"\n{format_estimates(estimates, max_memory_mb)}\nSet `streaming: true` or "
                         "`hierarchical: {group_size: 2}` in the recipe, or raise the limit.")
