"""Lazy reading of a checkpoint folder: one tensor at a time, sharded or not, safetensors unless told otherwise."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class PickleCheckpointError(ValueError):
    """A checkpoint has only pickle `.bin` weights and the user did not opt in to reading them."""


def _weight_map(folder: Path, weights: str, index: str) -> dict[str, str] | None:
    if (folder / index).is_file():
        return dict(json.loads((folder / index).read_text())["weight_map"])
    if (folder / weights).is_file():
        return {}  # filled lazily from the single file's header
    return None


class Checkpoint:
    """Read-only view of the weights in a model folder.

    Tensors are read on demand, one at a time; at most one safetensors shard is open. Returned tensors are
    memory-mapped and alias the file: clone them before any in-place edit.

    Args:
        folder (`str` or `Path`): A model folder with `model.safetensors` or `model.safetensors.index.json`.
        allow_pickle (`bool`, defaults to `False`): Also accept `pytorch_model.bin` (loaded with
            `weights_only=True`). Only for files you trust.
        weights (`str`, defaults to `"model.safetensors"`): File name of the weights (`adapter_model.safetensors`
            for PEFT adapters).

    Raises:
        `FileNotFoundError`: The folder holds no weights.
        `PickleCheckpointError`: The folder holds only pickle weights and `allow_pickle` is False.
    """

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, weights: str = SAFE_WEIGHTS) -> None:
        self.folder = Path(folder)
        self._pickle_state: dict[str, torch.Tensor] | None = None
        self._open_file: str | None = None
        self._handle = None
        self._headers: dict[str, tuple[dict, int]] = {}
        weight_map = _weight_map(self.folder, weights, weights.replace(".safetensors", ".safetensors.index.json"))
        if weight_map is None:
            pickle_map = _weight_map(self.folder, PICKLE_WEIGHTS, PICKLE_INDEX)
            if pickle_map is None:
                raise FileNotFoundError(f"No weights in {self.folder}: expected {weights} (or its sharded index).")
            if not allow_pickle:
                raise PickleCheckpointError(
                    f"{self.folder} has only pickle .bin weights, which can run code when loaded. Convert it "
                    "to safetensors, or pass allow_pickle=True if you trust the file."
                )
            self._pickle_state = self._load_pickle(pickle_map)
            weight_map = {name: "" for name in self._pickle_state}
        elif not weight_map:
            with safe_open(self.folder / weights, framework="pt") as f:
                weight_map = {name: weights for name in f.keys()}
        self.weight_map = weight_map

    def _load_pickle(self, pickle_map: dict[str, str]) -> dict[str, torch.Tensor]:
        files = sorted(set(pickle_map.values())) or [PICKLE_WEIGHTS]
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(torch.load(self.folder / name, map_location="cpu", weights_only=True, mmap=True))
        return state

    def _file(self, filename: str):
        if self._open_file != filename:
            self._handle = safe_open(self.folder / filename, framework="pt")
            self._open_file = filename
        return self._handle

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`, read from the header only."""
        if self._pickle_state is not None:
            return tuple(self._pickle_state[name].shape)
        return tuple(self._file(self.weight_map[name]).get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, memory-mapped (aliases the file: clone before editing in place)."""
        if self._pickle_state is not None:
            return self._pickle_state[name]
        return self._file(self.weight_map[name]).get_tensor(name)

    def _header(self, filename: str) -> tuple[dict, int]:
        if filename not in self._headers:
            with open(self.folder / filename, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                self._headers[filename] = (json.loads(f.read(size)), 8 + size)
        return self._headers[filename]

    def read_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` read into fresh memory with plain file reads (no mapping stays resident): streaming.

        With `out` (a contiguous tensor of the same shape), the values are written there and `out` is returned:
        read straight into it when it is a CPU tensor of the file's dtype, else converted by `copy_`.
        """
        if self._pickle_state is not None:
            tensor = self._pickle_state[name]
            return tensor.clone() if out is None else out.copy_(tensor)
        filename = self.weight_map[name]
        header, start = self._header(filename)
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        direct = out is not None and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(info["shape"], dtype=dtype)
        with open(self.folder / filename, "rb") as f:
            f.seek(start + begin)
            f.readinto(memoryview(target.view(torch.uint8).reshape(-1).numpy()))
        if out is None or direct:
            return target
        return out.copy_(target)

    def nbytes(self) -> int:
        """Total bytes of the weights, from the headers only."""
        if self._pickle_state is not None:
            return sum(t.numel() * t.element_size() for t in self._pickle_state.values())
        total = 0
        for filename in set(self.weight_map.values()):
            header, _ = self._header(filename)
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        return total


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
