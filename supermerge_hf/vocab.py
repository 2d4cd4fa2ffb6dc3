"""The merged vocabulary (issue 17): `tokenizer_source: union`, or a source that added tokens, decided from the
tokenizers and safetensors headers before any weight is read.

Every model's vocabulary tensors (the input embedding; the output embedding and its bias when untied) are seen
re-indexed to the merged vocabulary by token string. A token the base lacks gets, as base row, the mean of the
rows of the sources that have it (so its task vector is 0 there and a single source's row is kept exactly); a
token a source lacks gets the base's row (a zero task vector). Rows past the tokenizer (padding rows of an
embedding larger than its tokenizer) keep their position.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import TOKENIZER_FILES
from .sources import AdapterSpec, IncompatibleSourceError, ModelSpec, Source, canonical

logger = logging.getLogger(__name__)

UNION = "union"


@dataclass
class Vocabulary:
    """The merged vocabulary: its `tokenizer` (the one the merge ships), `size` (rows of every vocabulary tensor,
    the merged `vocab_size`), the vocabulary tensors' canonical `names` and the tokens the base lacks (`added`)."""

    tokenizer: object
    size: int
    names: list[str]
    added: list[str]


class VocabRows:
    """One model's rows in the merged vocabulary: merged row j is its own row `index[j]`, or, where that is -1 (a
    token it lacks), the next row of `fill(name)` (one row per -1)."""

    def __init__(self, names: list[str], index: torch.Tensor, fill: Callable[[str], torch.Tensor]) -> None:
        self.names, self.index, self.fill = names, index, fill  # index: (V,) long
        self.has = index >= 0  # (V,)

    def align(self, name: str, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        aligned = raw.new_empty((len(self.index), *raw.shape[1:]))  # (V, *rest)
        aligned[self.has] = raw[self.index[self.has]]
        if not self.has.all():
            aligned[~self.has] = self.fill(name).to(aligned.dtype)  # (missing, *rest)
        return aligned if out is None else out.copy_(aligned)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def vocab_tensors(spec: Source) -> list[str]:
    """Canonical names of the model's vocabulary tensors: input embedding, output embedding and its bias (for a
    model that does not name them, the tensors with `vocab_size` rows)."""
    with torch.device("meta"):
        meta = spec.cls(spec.config)
    try:
        output = meta.get_output_embeddings()
        wanted = [meta.get_input_embeddings().weight, *([output.weight, output.bias] if output is not None else [])]
    except (NotImplementedError, AttributeError):
        size = getattr(spec.config.get_text_config(), "vocab_size", None)
        return [n for n, shape in spec.shapes.items() if shape[:1] == (size,)]
    ids = {id(p) for p in wanted if p is not None}
    return [canonical(n, meta.base_model_prefix) for n, p in meta.named_parameters() if id(p) in ids]


def _rows(spec: Source, name: str) -> int:
    """Rows of one vocabulary tensor as stored (an adapter's saved embedding may have more than the base's)."""
    if isinstance(spec, AdapterSpec):
        return spec.checkpoint.shape(spec.saved[name])[0] if name in spec.saved else spec.base.shapes[name][0]
    return spec.shapes[name][0]


def _token_ids(tokenizer, who: str, base: dict[str, int] | None = None) -> dict[str, int]:
    """The tokenizer's token -> id, refused where a base token has another id."""
    vocab = tokenizer.get_vocab()
    moved = {t: (base[t], i) for t, i in vocab.items() if base is not None and base.get(t, i) != i}
    if moved:
        raise IncompatibleSourceError(f"The tokenizer of {who} gives base tokens other ids (token: (base id, its id)) "
                                      f"{dict(sorted(moved.items(), key=lambda m: m[1])[:5])}: whether their "
                                      "embedding rows moved with them is ambiguous. Save the base's tokenizer, with "
                                      "the added tokens appended, beside it, or merge with tokenizer_source: base.")
    return vocab


def union_tokenizer(tokenizers: list):
    """The first tokenizer (the base's, a fresh copy) plus every other's added tokens it lacks, first seen first,
    with their `AddedToken` flags (special, lstrip, rstrip, normalized, single_word)."""
    merged = copy.deepcopy(tokenizers[0])
    for tokenizer in tokenizers[1:]:
        for _, token in sorted(tokenizer.added_tokens_decoder.items()):
            if token.content not in merged.get_vocab():
                merged.add_tokens([copy.copy(token)], special_tokens=token.special)
    return merged


def _index(tokens: list[str | None], vocab: dict[str, int], rows: int, who: str) -> torch.Tensor:
    """Own row of each merged row: by token string; by position for rows past the merged tokenizer."""
    index = torch.tensor([vocab.get(t, -1) if t is not None else j if j < rows else -1 for j, t in enumerate(tokens)])
    if (index >= rows).any():
        raise IncompatibleSourceError(f"The tokenizer of {who} has {max(vocab.values()) + 1} tokens but its embedding "
                                      f"has {rows} rows: tokens of the merged vocabulary such as "
                                      f"{[tokens[j] for j in (index >= rows).nonzero().flatten()[:5]]} have no row in "
                                      "it. Resize its embeddings to the tokenizer "
                                      "(`model.resize_token_embeddings(len(tokenizer))`) and re-save it.")
    return index  # (V,)


def _mean_rows(base: ModelSpec, contributors: list[tuple[Source, torch.Tensor]], missing: torch.Tensor):
    """`fill` of the base: per tensor, each row it lacks as the mean of that row in the sources that have it."""
    cache: dict[str, torch.Tensor] = {}

    def fill(name: str) -> torch.Tensor:
        if name not in cache:
            total, count = None, torch.zeros(int(missing.sum()))
            for spec, index in contributors:
                raw = (spec.checkpoint.read_tensor(spec.saved[name]) if isinstance(spec, AdapterSpec)
                       else spec.checkpoint.read_tensor(spec.keys[name])).float()  # (V_s, *rest)
                rows = index[missing]  # (missing,)
                part = torch.where((rows >= 0).view(-1, *[1] * (raw.dim() - 1)), raw[rows.clamp(min=0)], 0.0)
                total = part if total is None else total + part
                count += rows >= 0
            cache[name] = total / count.view(-1, *[1] * (total.dim() - 1))  # (missing, *rest), float32
        return cache[name]

    return fill


def _resized(spec: Source, names: list[str], size: int) -> tuple[object, dict]:
    config = copy.deepcopy(spec.config)
    config.get_text_config().vocab_size = size
    return config, {n: (size, *s[1:]) if n in names else s for n, s in spec.shapes.items()}


def _tokenizers(base: ModelSpec, sources: dict[str, Source], differ: list[str], tokenizer_source: str):
    """Each model's token -> id (a source without a tokenizer: the base's, if its rows are the base's) and the
    merged tokenizer."""
    from transformers import AutoTokenizer

    if not has_tokenizer(base.folder):
        raise IncompatibleSourceError(f"tokenizer_source={tokenizer_source!r} matches embedding rows by token, but "
                                      f"the base ({base.folder}) has no tokenizer files. Save its tokenizer beside it.")
    tokenizers = {"base": AutoTokenizer.from_pretrained(base.folder)}
    vocabs = {"base": _token_ids(tokenizers["base"], "the base")}
    for task, spec in sources.items():
        if has_tokenizer(spec.folder):
            tokenizers[task] = AutoTokenizer.from_pretrained(spec.folder)
            vocabs[task] = _token_ids(tokenizers[task], f"task {task!r}", vocabs["base"])
        elif task in differ:
            raise IncompatibleSourceError(f"Task {task!r} ({spec.folder}) has other embedding rows than the base and "
                                          "no tokenizer: its rows cannot be matched to tokens. Save its tokenizer "
                                          "beside it (`tokenizer.save_pretrained`).")
        else:
            vocabs[task] = vocabs["base"]
    if tokenizer_source == UNION:
        return vocabs, union_tokenizer([tokenizers["base"], *(tokenizers[t] for t in sources if t in tokenizers)])
    if tokenizer_source not in tokenizers:
        raise IncompatibleSourceError(f"tokenizer_source={tokenizer_source!r}: {sources[tokenizer_source].folder} "
                                      "has no tokenizer files. Save the tokenizer beside that fine-tune, or use "
                                      "tokenizer_source: base.")
    return vocabs, tokenizers[tokenizer_source]


def align_vocabulary(base: ModelSpec, sources: dict[str, Source], tokenizer_source: str,
                     ) -> tuple[Vocabulary | None, ModelSpec, dict[str, Source]]:
    """The vocabulary of `tokenizer_source` (`base`, `union` or a task) and the base and sources seen in it
    (`None` and the inputs themselves when every model already has it). `IncompatibleSourceError` (before any
    weight is read), with the reason, where the rows cannot be matched by token."""
    names = vocab_tensors(base)
    if not names:
        return None, base, sources
    rows = {"base": min(base.shapes[n][0] for n in names)}
    rows |= {t: min([_rows(s, n) for n in names if n in s.shapes], default=rows["base"]) for t, s in sources.items()}
    differ = [t for t, s in sources.items() if any(_rows(s, n) != base.shapes[n][0] for n in names if n in s.shapes)]
    if tokenizer_source == "base" and (not differ or not all(has_tokenizer(s.folder) for s in
                                                             [base, *(sources[t] for t in differ)])):
        return None, base, sources  # nothing to align, or the plan refuses the shapes with their reason
    vocabs, target = _tokenizers(base, sources, differ, tokenizer_source)
    ids = {i: t for t, i in target.get_vocab().items()}
    size = max(max(ids) + 1, rows["base"])
    tokens = [ids.get(j) for j in range(size)]
    index = {m: _index(tokens, vocabs[m], rows[m], "the base" if m == "base" else f"task {m!r}") for m in vocabs}
    if not differ and size == rows["base"] and all(torch.equal(i, torch.arange(size)) for i in index.values()):
        return None, base, sources
    for task, spec in sources.items():
        _check_adapter(task, spec, names, vocabs[task] != vocabs["base"] or task in differ)
    missing, covered = index["base"] < 0, torch.zeros(size, dtype=torch.bool)  # (V,), (V,)
    contributors = [(sources[t], i) for t, i in index.items() if t != "base" and bool((i[missing] >= 0).any())]
    for _, i in contributors:
        covered |= i >= 0
    if (missing & ~covered).any():
        raise IncompatibleSourceError(f"Rows {(missing & ~covered).nonzero().flatten().tolist()[:5]} of the merged "
                                      "vocabulary belong to no model (no token, past every embedding): "
                                      f"tokenizer_source={tokenizer_source!r} cannot be used. Pick another one.")
    base_view = dataclasses.replace(base, **dict(zip(("config", "shapes"), _resized(base, names, size))),
                                    rows=VocabRows(names, index["base"], _mean_rows(base, contributors, missing)))
    views = {task: _view(spec, base_view, names, size, index[task]) for task, spec in sources.items()}
    added = [t for t, m in zip(tokens, missing) if m and t is not None]
    logger.info("Merged vocabulary (tokenizer_source=%s): %d rows, %d token(s) the base lacks: %s", tokenizer_source,
                size, len(added), added[:10])
    return Vocabulary(target, size, names, added), base_view, views


def _check_adapter(task: str, spec: Source, names: list[str], own_vocabulary: bool) -> None:
    """An adapter's rows can be matched by token only where it saved the whole tensor (`modules_to_save`)."""
    if not isinstance(spec, AdapterSpec):
        return
    factored = [n for n in names if n in spec.targeted]
    unsaved = [n for n in names if n in spec.shapes and n not in spec.saved]
    if factored or (own_vocabulary and unsaved):
        why = (f"has {spec.label} on the vocabulary tensors {factored}, which cannot be re-indexed to the merged "
               "vocabulary" if factored else f"changes the vocabulary (its tokenizer differs from the base's) "
               f"without saving the vocabulary tensors {unsaved}")
        raise IncompatibleSourceError(f"Adapter of task {task!r} ({spec.folder}) {why}. Save them with the adapter "
                                      "(`modules_to_save=['embed_tokens', 'lm_head']`) or densify it (PEFT "
                                      "`merge_and_unload().save_pretrained(out)`), or merge with tokenizer_source: "
                                      "base if it adds no tokens.")


def _view(spec: Source, base_view: ModelSpec, names: list[str], size: int, index: torch.Tensor) -> Source:
    """A source seen in the merged vocabulary: rows it lacks are the base's (a zero task vector there)."""
    config, shapes = _resized(spec, names, size)
    has = [n for n in names if n in spec.shapes and (not isinstance(spec, AdapterSpec) or n in spec.saved)]
    rows = VocabRows(has, index, lambda name: base_view.read_tensor(name)[index < 0]) if has else None
    if isinstance(spec, AdapterSpec):
        return spec.aligned(base_view, config, shapes, rows)
    return dataclasses.replace(spec, config=config, shapes=shapes, rows=rows)
