"""Checkpoint files: lazy reading of a model folder, one tensor at a time, and safe writing of output folders."""

import contextlib
import json
import math
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

SAFE_WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class PickleCheckpointError(ValueError):
    """A checkpoint has only pickle `.bin` weights and the user did not opt in to reading them."""


def _weight_map(folder: Path, weights: str, index: str) -> dict[str, str] | None:
    if (folder / index).is_file():
        return dict(json.loads((folder / index).read_text())["weight_map"])
    return {} if (folder / weights).is_file() else None


class Checkpoint:
    """Read-only view of a folder's weights (`weights`, or its sharded index; `pytorch_model.bin` only with
    `allow_pickle`): headers parsed once, tensors read on demand into fresh memory, never memory-mapped."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, weights: str = SAFE_WEIGHTS) -> None:
        self.folder = Path(folder)
        self._pickle: dict[str, torch.Tensor] | None = None
        self._headers: dict[str, tuple[dict, int]] = {}
        self.weight_map = _weight_map(self.folder, weights, weights.replace(".safetensors", ".safetensors.index.json"))
        if self.weight_map is None:
            pickle_map = _weight_map(self.folder, PICKLE_WEIGHTS, PICKLE_INDEX)
            if pickle_map is None:
                raise FileNotFoundError(f"No weights in {self.folder}: expected {weights} (or its sharded index).")
            if not allow_pickle:
                raise PickleCheckpointError(f"{self.folder} has only pickle .bin weights, which can run code when "
                                            "loaded. Convert it to safetensors, or pass allow_pickle=True if trusted.")
            self._pickle = {}
            for name in sorted(set(pickle_map.values())) or [PICKLE_WEIGHTS]:
                self._pickle.update(torch.load(self.folder / name, map_location="cpu", weights_only=True, mmap=True))
            self.weight_map = {name: "" for name in self._pickle}
        elif not self.weight_map:
            self.weight_map = {name: weights for name in self._header(weights)[0] if name != "__metadata__"}

    def _header(self, filename: str) -> tuple[dict, int]:
        if filename not in self._headers:
            with open(self.folder / filename, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                self._headers[filename] = (json.loads(f.read(size)), 8 + size)
        return self._headers[filename]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`, from the header only."""
        if self._pickle is not None:
            return tuple(self._pickle[name].shape)
        return tuple(self._header(self.weight_map[name])[0][name]["shape"])

    def read_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` in fresh memory; with `out` (contiguous, same shape) written there and `out` returned."""
        if self._pickle is not None:
            return self._pickle[name].clone() if out is None else out.copy_(self._pickle[name])
        filename = self.weight_map[name]
        header, start = self._header(filename)
        dtype = _DTYPES[header[name]["dtype"]]
        direct = out is not None and out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(header[name]["shape"], dtype=dtype)
        with open(self.folder / filename, "rb") as f:
            f.seek(start + header[name]["data_offsets"][0])
            f.readinto(memoryview(target.reshape(-1).view(torch.uint8).numpy()))  # reshape: 0-dim tensors too
        return target if out is None or direct else out.copy_(target)

    def dtype(self) -> torch.dtype | None:
        """The floating dtype of most weights, counted in elements (from the headers only); `None` if none is
        floating (fp32 norms beside bf16 matrices: bf16)."""
        counts: dict[torch.dtype, int] = {}
        for name in self.weight_map:
            dtype = (self._pickle[name].dtype if self._pickle is not None
                     else _DTYPES[self._header(self.weight_map[name])[0][name]["dtype"]])
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + max(1, math.prod(self.shape(name)))
        return max(counts, key=counts.get) if counts else None

    def nbytes(self) -> int:
        """Total bytes of the weights, from the headers only."""
        if self._pickle is not None:
            return sum(t.numel() * t.element_size() for t in self._pickle.values())
        return sum(v["data_offsets"][1] - v["data_offsets"][0] for f in set(self.weight_map.values())
                   for k, v in self._header(f)[0].items() if k != "__metadata__")


def check_output_dir(path: str | Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that already holds files, unless `overwrite`.

    Raises:
        `FileExistsError`: `path` is a file, or a non-empty folder and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output {str(path)!r} is a file, not a folder: choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {str(path)!r} already holds files. Choose another folder, or pass "
                              "overwrite=True (CLI: --overwrite) to replace it.")


def check_not_an_input(folder: str | Path, inputs: list[Path]) -> None:
    """`ValueError` for an output folder that is, or holds, one of `inputs`: replacing it would destroy an input."""
    out = Path(folder).expanduser().resolve()
    if any(p.resolve() == out or p.resolve().is_relative_to(out) for p in inputs):
        raise ValueError(f"The output folder {str(folder)!r} is or holds an input of this merge (the base or a "
                         "source): writing there would replace it. Choose another folder.")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success move it into place, so a failure never loses data."""
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(path.parent.stat().st_mode & 0o777)  # mkdtemp makes it 0700: take the parent folder's mode
        old = path.parent / f".{path.name}.old-{tmp.name}"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files (and chat template) of `src` into `dst`; returns the names copied."""
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied
