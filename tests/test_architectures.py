"""One learned merge per architecture family, saved and reloaded with the matching `AutoModel*` class: the reloaded
model gives the merger's own merged forward (same logits, same greedy generations) and its tensors are
base + sum_i c_i tau_i. Llama (GQA), Qwen2 (GQA, biased q/k/v), GPT-2 (Conv1D, tied embeddings), T5 (encoder-decoder,
seq2seq records), BERT (classification heads) and CLIP (the 0-dim `logit_scale`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BertForSequenceClassification,
                          CLIPConfig, CLIPModel, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model, tokenize_examples
from supermerge_hf.data import as_examples, collate
from supermerge_hf.deltas import DeltaStack
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.sparsify import magnitude_thresholds

from .conftest import OVER_TASK_VECTORS, VOCAB, Family, classification_examples, perturb, tiny_tokenizer

LEARN = {"steps": 2, "eval_every": 1, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0,
         "init_from_task_arithmetic": False}


def make_family(root: Path, build, tasks: list[str]) -> Family:
    """A saved random base (`build()`) and one seeded perturbation of it per task."""
    torch.manual_seed(0)
    base = build()
    base.save_pretrained(root / "base")
    for i, task in enumerate(tasks):
        perturb(type(base).from_pretrained(root / "base"), seed=i).save_pretrained(root / task)
    return Family(root / "base", {t: root / t for t in tasks}, None)


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory) -> Family:
    config = Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    return make_family(tmp_path_factory.mktemp("qwen2"), lambda: Qwen2ForCausalLM(config), ["a", "b"])


@pytest.fixture(scope="module")
def t5_family(tmp_path_factory) -> Family:
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, pad_token_id=0,
                      eos_token_id=3, decoder_start_token_id=0)  # [PAD], [SEP] of the tiny tokenizer
    return make_family(tmp_path_factory.mktemp("t5"), lambda: T5ForConditionalGeneration(config), ["a", "b"])


@pytest.fixture(scope="module")
def clip_family(tmp_path_factory) -> Family:
    tower = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config=tower | {"vocab_size": VOCAB, "max_position_embeddings": 16, "bos_token_id": 1,
                                             "eos_token_id": 2, "pad_token_id": 0},
                        vision_config=tower | {"image_size": 16, "patch_size": 8}, projection_dim=16)
    return make_family(tmp_path_factory.mktemp("clip"), lambda: CLIPModel(config), ["a", "b"])


def answer_examples(n: int, seed: int) -> list[dict]:
    """Decoder-only examples of different lengths: a prompt (labelled -100), then the answer."""
    g, out = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        prompt, answer = int(torch.randint(2, 7, (), generator=g)), int(torch.randint(1, 5, (), generator=g))
        ids = torch.randint(4, VOCAB, (prompt + answer,), generator=g)
        out.append({"input_ids": ids, "labels": torch.cat([torch.full((prompt,), -100), ids[prompt:]])})
    return out


def seq2seq_examples(n: int, seed: int) -> list[dict]:
    """`{"source", "target"}` records of different lengths, tokenised for an encoder-decoder."""
    g, words = torch.Generator().manual_seed(seed), ["good", "bad", "movie", "plot", "cat", "dog", "sat", "on", "mat"]

    def text(k: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))

    records = [{"source": text(int(torch.randint(2, 7, (), generator=g))),
                "target": text(int(torch.randint(1, 4, (), generator=g)))} for _ in range(n)]
    return tokenize_examples(records, tiny_tokenizer(), encoder_decoder=True)


def clip_examples(n: int, seed: int) -> list[dict]:
    """Image-text pairs (captions of different lengths): CLIPModel's inputs, no labels."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(3, 9, (), generator=g)),), generator=g),
             "pixel_values": torch.randn(3, 16, 16, generator=g)} for _ in range(n)]


def learn(family: Family, examples: dict[str, list[dict]], **config) -> SuperMerger:
    """SuperMerge over the task vectors (what `check_formula` checks) unless `config` names another method."""
    sources = [{"task": t, "path": str(p)} for t, p in family.sources.items()]
    if config.get("method", "supermerge") == "supermerge":
        config["method_kwargs"] = OVER_TASK_VECTORS | config.get("method_kwargs", {})
    return SuperMerger(SuperMergeConfig(base=str(family.base), sources=sources, **(LEARN | config))).fit(examples)


def merged_forward(merger: SuperMerger):
    """The merger's own functional forward of its merged tensors, per task: `forward(task, batch)`."""
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    return lambda task, batch: fm.forward(task, merger.merged_tensors, batch)


def check_formula(merger: SuperMerger, family: Family, name: str, model: PreTrainedModel) -> None:
    """Tensor `name` of the merge and of the reloaded `model` = base + sum_i c_i tau_i (c_i per row: `row`)."""
    plan, c = merger.plan, merger.coefficients.values[:, merger.plan.group_index[name]]  # (S,) or (S, rows)
    full = plan.base.param_names[name]
    base = load_file(family.base / "model.safetensors")[full]
    taus = [load_file(p / "model.safetensors")[plan.task_specs[t].param_names[name]] - base
            for t, p in family.sources.items()]  # a classifier names its body `bert.*`
    expected = base + sum(ci.view(-1, *[1] * (tau.dim() - 1)) * tau if ci.dim() else ci * tau
                          for ci, tau in zip(c, taus))
    torch.testing.assert_close(merger.merged_tensors[name], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.get_parameter(full), merger.merged_tensors[name])
    assert not torch.equal(c, torch.full_like(c, 0.3)), "learning should have moved the coefficients"


def greedy(forward, task: str, inputs: dict, steps: int, *, decoder_start: int | None = None) -> list[int]:
    """Greedy decoding, one token at a time, with `forward` (a batch of one, no cache)."""
    key = "input_ids" if decoder_start is None else "decoder_input_ids"
    inputs = inputs if decoder_start is None else inputs | {key: torch.tensor([[decoder_start]])}
    start = inputs[key].shape[1]
    for _ in range(steps):
        token = forward(task, inputs).logits[0, -1].argmax()
        inputs = inputs | {key: torch.cat([inputs[key], token.view(1, 1)], dim=1)}
        if "attention_mask" in inputs and key == "input_ids":
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs[key][0, start:].tolist()


def check_generation(model: PreTrainedModel, forward, task: str, inputs: dict, **options) -> None:
    """`generate(max_new_tokens=5, do_sample=False)` of the reloaded model = greedy decoding with the merger's."""
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)[0]
    new = out[inputs["input_ids"].shape[1]:] if "decoder_start" not in options else out[1:]
    mine = greedy(forward, task, inputs, 5, **options)
    eos = model.generation_config.eos_token_id
    assert new.tolist() == mine[:len(new)] and (len(new) == 5 or new[-1].item() in torch.tensor(eos).flatten())


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_decoder_only(name, request, tmp_path):
    family = request.getfixturevalue(f"{name}_family")
    examples = {t: answer_examples(8, seed=i) for i, t in enumerate(family.sources)}
    merger = learn(family, examples)
    merger.save_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    forward, task = merged_forward(merger), next(iter(family.sources))
    batch = collate(examples[task])  # different lengths: padded, with an attention mask
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, forward(task, batch).logits)
        prompt = examples[task][0]["input_ids"][:4][None]
        check_generation(model, forward, task, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
    tensor = {"llama": "layers.0.self_attn.k_proj.weight", "qwen2": "layers.1.self_attn.k_proj.bias",
              "gpt2": "h.0.attn.c_attn.weight"}[name]  # GQA's narrow k projection, its bias; a Conv1D
    check_formula(merger, family, tensor, model)
    if name == "gpt2":  # tied: the LM head is the merged input embedding
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        assert torch.equal(model.lm_head.weight, merger.merged_tensors["wte.weight"])


def test_t5_seq2seq(t5_family, tmp_path):
    examples = {t: seq2seq_examples(8, seed=i) for i, t in enumerate(t5_family.sources)}
    merger = learn(t5_family, examples)
    merger.save_pretrained(tmp_path / "merged")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    forward = merged_forward(merger)
    batch = collate(examples["a"])  # sources and targets of different lengths
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, forward("a", batch).logits)
        source = examples["a"][0]["input_ids"][None]
        check_generation(model, forward, "a", {"input_ids": source, "attention_mask": torch.ones_like(source)},
                         decoder_start=0)
    check_formula(merger, t5_family, "decoder.block.0.layer.1.EncDecAttention.k.weight", model)
    assert torch.equal(model.lm_head.weight, merger.merged_tensors["shared.weight"])  # tied to the embedding
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)  # entropy: over the decoder's answer tokens only
    with torch.no_grad():
        log_p = torch.cat([fm.forward("a", merger.merged_tensors, [ex]).logits[0].log_softmax(-1)
                           for ex in examples["a"]])  # (sum of the target lengths, V): each example alone
        reference = float(-(log_p.exp() * log_p).sum(-1).mean())
        assert fm.evaluate("a", examples["a"], params=merger.merged_tensors)["entropy"] == pytest.approx(reference)
    _, losses = fm.coefficient_grad(merger.coefficients.values, {"a": examples["a"]}, {"a": 1.0}, "entropy")
    assert float(losses["a"]) == pytest.approx(reference)  # no labels given: the decoder reads the target
    adamerging = learn(t5_family, examples, method="adamerging")
    assert torch.isfinite(adamerging.coefficients.values).all()


def test_bert_classification(bert_family, tmp_path):
    examples = {t: classification_examples(k, 8, seed=i) for i, (t, k) in enumerate(bert_family.num_labels.items())}
    merger = learn(bert_family, examples)
    merger.save_pretrained(tmp_path / "merged")
    body = AutoModel.from_pretrained(tmp_path / "merged")  # the merged body; each head beside it
    forward = merged_forward(merger)
    for task, exs in examples.items():
        model = load_task_model(tmp_path / "merged", task)
        assert isinstance(model, BertForSequenceClassification)
        batch = {k: v for k, v in collate(as_examples(task, exs)).items() if k != "labels"}
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, forward(task, batch).logits)
    check_formula(merger, bert_family, "encoder.layer.1.attention.self.query.weight", body)


def test_clip_data_free_and_adamerging(clip_family, tmp_path):
    """CLIPModel takes no `labels` (its contrastive loss needs the flag `return_loss=True`, no example field), so
    supervised learning cannot run; data-free methods (TIES: trimming a 0-dim tensor) and AdaMerging (entropy of
    the image-to-text logits, the gradient through `logit_scale`) can."""
    examples = {t: clip_examples(8, seed=i) for i, t in enumerate(clip_family.sources)}
    taus = torch.tensor([0.5, -2.0])  # (S,): the task vectors of a 0-dim tensor; both were an IndexError
    torch.testing.assert_close(DeltaStack.from_dense(taus).inner(torch.tensor(3.0)), torch.tensor([1.5, -6.0]))
    torch.testing.assert_close(magnitude_thresholds([taus], 1.0), torch.tensor([0.5, 2.0]))  # TIES' trim
    with pytest.raises(ValueError, match="without `labels`"):
        learn(clip_family, examples)
    for method in ("ties", "adamerging"):
        merger = learn(clip_family, examples, method=method)
        merger.save_pretrained(tmp_path / method)
        model = AutoModel.from_pretrained(tmp_path / method).eval()
        assert isinstance(model, CLIPModel)
        batch = collate(examples["a"])
        with torch.no_grad():
            got, expected = model(**batch), merged_forward(merger)("a", batch)
        assert torch.equal(got.logits_per_image, expected.logits_per_image)
        if method == "adamerging":
            check_formula(merger, clip_family, "logit_scale", model)
