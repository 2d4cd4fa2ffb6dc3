"""The merged vocabulary (issue 17): `tokenizer_source: union` or a task that added tokens, embedding rows matched by
token, and what is refused (before any weight is read) when rows cannot be matched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from supermerge_hf import IncompatibleSourceError, SuperMergeConfig, SuperMerger
from supermerge_hf.vocab import union_tokenizer

from .conftest import OVER_TASK_VECTORS, VOCAB, perturb, tiny_tokenizer

CHAT_TOKENS = [AddedToken("<|im_start|>", special=True, normalized=False),
               AddedToken("<|im_end|>", special=True, normalized=False)]
TEXT = "<|im_start|> good movie <|im_end|>"


def tiny_llama(**options) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                        max_position_embeddings=64, **options))


@pytest.fixture(scope="module")
def added(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A Llama base (a 28-token tokenizer, 64 embedding rows: 36 padding rows), fine-tune `chat` that added two
    special tokens (ids 28, 29) and resized its embeddings to 66 rows, and a plain fine-tune `plain`."""
    root = tmp_path_factory.mktemp("added")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    for seed, task in enumerate(["chat", "plain"]):
        model, tokenizer = LlamaForCausalLM.from_pretrained(root / "base"), tiny_tokenizer()
        if task == "chat":
            tokenizer.add_tokens(CHAT_TOKENS)
            model.resize_token_embeddings(VOCAB + 2, mean_resizing=False)
        perturb(model, seed=seed).save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
    return root / "base", {t: root / t for t in ["chat", "plain"]}


def merger_for(base: Path, sources: dict[str, Path], **options) -> SuperMerger:
    config = SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                              **({"method": "task_arithmetic"} | options))
    return SuperMerger(config)


def chat_examples(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.cat([torch.tensor([28]), torch.randint(4, 28, (6,), generator=g),
                                             torch.tensor([29])])), "labels": ids.clone()} for _ in range(n)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("tokenizer_source", ["union", "chat"])
def test_added_tokens_keep_their_ids_and_the_fine_tunes_rows(added, tmp_path, tokenizer_source):
    base, sources = added
    merger = merger_for(base, sources, method="supermerge", steps=2, eval_every=1, examples_per_task=8,
                        batch_size=4, tokenizer_source=tokenizer_source, method_kwargs=OVER_TASK_VECTORS)
    merger.fit({"chat": chat_examples(), "plain": chat_examples()})  # examples with the new token ids learn
    out = Path(merger.save_pretrained(tmp_path / "merged"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [28, 29]
    assert tokenizer.added_tokens_decoder[28].special
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    theta, tau = weights(base), {t: weights(p) for t, p in sources.items()}
    merged = weights(out)
    for name in ["model.embed_tokens.weight", "lm_head.weight"]:
        group = name.removeprefix("model.")
        c = torch.tensor([float(merger.coefficients[t, group]) for t in sources])  # (S,)
        for rows in [slice(0, 28), slice(30, VOCAB)]:  # base tokens, then padding rows (by position)
            deltas = torch.stack([tau[t][name][rows] - theta[name][rows] for t in sources])  # (S, R, H)
            expected = torch.einsum("s,srh->rh", c, deltas) + theta[name][rows]  # base + sum_i c_i tau_i
            assert torch.equal(merged[name][rows], expected)
        assert torch.equal(merged[name][28:30], tau["chat"][name][28:30])  # added tokens: the fine-tune's own rows
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids[0, 0] == 28 and ids[0, -1] == 29
    with torch.no_grad():
        reference = merger.merge_and_unload()(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, reference)


def test_union_of_a_plain_source_gives_a_zero_task_vector_on_tokens_it_lacks(added, tmp_path):
    base, sources = added
    merger = merger_for(base, sources, tokenizer_source="union", method_kwargs={"lam": 0.5}).fit()
    plan = merger.plan
    name = "embed_tokens.weight"
    assert plan.vocabulary.added == ["<|im_start|>", "<|im_end|>"]
    assert torch.equal(plan.task_specs["plain"].read_tensor(name)[28:30], plan.base.read_tensor(name)[28:30])
    assert torch.equal(plan.base.read_tensor(name)[28:30], load_file(sources["chat"] / "model.safetensors")[
        "model.embed_tokens.weight"][28:30])
    assert torch.equal(merger.merged_tensors[name][28:30], plan.base.read_tensor(name)[28:30])
    streamed = merger_for(base, sources, tokenizer_source="union", method_kwargs={"lam": 0.5}, streaming=True)
    assert torch.equal(streamed.fit().merged_tensors[name], merger.merged_tensors[name])


def test_tokenizer_source_base_drops_the_added_tokens(added, tmp_path):
    base, sources = added
    out = Path(merger_for(base, sources).fit().save_pretrained(tmp_path / "merged"))
    assert len(AutoTokenizer.from_pretrained(out)) == 28
    assert weights(out)["model.embed_tokens.weight"].shape == (VOCAB, 32)


def test_union_tokenizer_adds_each_new_token_once_in_first_seen_order():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    first.add_tokens([CHAT_TOKENS[0], "alpha"])
    second.add_tokens(["alpha", CHAT_TOKENS[1]])
    merged = union_tokenizer([tiny_tokenizer(), first, second])
    assert merged.convert_tokens_to_ids(["<|im_start|>", "alpha", "<|im_end|>"]) == [28, 29, 30]
    assert merged.added_tokens_decoder[30].special and not merged.added_tokens_decoder[29].special


def save_source(root: Path, name: str, model, tokenizer=None) -> Path:
    model.save_pretrained(root / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(root / name)
    return root / name


def swap_good_and_bad(folder: Path) -> None:
    """The base's tokenizer with `good` and `bad` (ids 4, 5) swapped: did their rows move with them?"""
    tokenizer_file = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer_file["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_file))


def refused_source(kind: str, root: Path, base: Path) -> Path:
    if kind == "ambiguous":
        folder = save_source(root, kind, LlamaForCausalLM.from_pretrained(base), tiny_tokenizer())
        swap_good_and_bad(folder)
        return folder
    if kind == "no tokenizer":
        model = LlamaForCausalLM.from_pretrained(base)
        model.resize_token_embeddings(VOCAB + 2, mean_resizing=False)
        return save_source(root, kind, model)
    if kind == "tied":
        return save_source(root, kind, tiny_llama(tie_word_embeddings=True), tiny_tokenizer())
    if kind == "too many tokens":
        tokenizer = tiny_tokenizer()
        tokenizer.add_tokens([f"new{k}" for k in range(VOCAB)])
        return save_source(root, kind, LlamaForCausalLM.from_pretrained(base), tokenizer)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj"] if kind == "adapter without embedding" else ["q_proj", "embed_tokens"]
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=targets))
    tokenizer = tiny_tokenizer()
    if kind == "adapter without embedding":
        tokenizer.add_tokens(CHAT_TOKENS)
    model.save_pretrained(root / kind, save_embedding_layers=False)
    tokenizer.save_pretrained(root / kind)
    return root / kind


@pytest.mark.parametrize(("kind", "match"), [
    ("ambiguous", r"other ids .* \{'good': \(4, 5\), 'bad': \(5, 4\)\}: whether their embedding rows moved"),
    ("no tokenizer", "has other embedding rows than the base and no tokenizer"),
    ("tied", "tie_word_embeddings=True but the base has False"),
    ("too many tokens", "has 92 tokens but its embedding has 64 rows"),
    ("adapter without embedding", r"changes the vocabulary .* without saving the vocabulary tensors"),
    ("adapter with embedding factors", "has LoRA factors on the vocabulary tensors"),
])
def test_union_is_refused_before_loading_weights_when_rows_cannot_be_matched(added, tmp_path, kind, match,
                                                                              monkeypatch):
    base, sources = added
    source = refused_source(kind, tmp_path, base)
    from supermerge_hf.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "read_tensor", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(IncompatibleSourceError, match=match):
        merger_for(base, {"chat": sources["chat"], "other": source}, tokenizer_source="union")


def test_a_union_merge_is_not_exported_as_a_mergekit_recipe(added, tmp_path):
    from supermerge_hf.mergekit_recipe import mergekit_recipe

    base, sources = added
    folder = merger_for(base, sources, tokenizer_source="union").fit().save_pretrained(tmp_path / "merged")
    with pytest.raises(ValueError, match="re-indexed the embedding rows"):
        mergekit_recipe(folder)
