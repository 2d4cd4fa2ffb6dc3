"""Generative tasks: records -> answer-only labels, padding, truncation; answer-token loss, rank classification and
greedy exact match, each against a direct computation with the model."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from supermerge_hf import SuperMergeConfig, SuperMerger, read_generative, tokenize_examples
from supermerge_hf.card import metrics_table
from supermerge_hf.cli import main
from supermerge_hf.data import as_examples, collate, make_splits
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.scoring import rank_scores

from .conftest import Family, perturb, tiny_tokenizer

X = -100
CHAT_TEMPLATE = ("{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}[CLS] assistant {% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_each_form_labels_only_its_answer(tok):
    prompt, answer = ids(tok, "the cat sat"), ids(tok, "on the mat")
    pc, text, s2s, s2s_enc = (tokenize_examples([r], tok, encoder_decoder=enc)[0] for r, enc in [
        ({"prompt": "the cat sat", "completion": "on the mat"}, False), ({"text": "the cat sat"}, False),
        ({"source": "the cat sat", "target": "on the mat"}, False),
        ({"source": "the cat sat", "target": "on the mat"}, True)])
    assert pc["input_ids"].tolist() == prompt + answer and pc["labels"].tolist() == [X, X, X] + answer
    assert pc["attention_mask"].tolist() == [1] * 6
    assert text["labels"].tolist() == text["input_ids"].tolist() == prompt  # plain LM: every token
    assert s2s["labels"].tolist() == pc["labels"].tolist()  # decoder-only: source and target are prompt, completion
    assert s2s_enc["input_ids"].tolist() == prompt and s2s_enc["labels"].tolist() == answer  # encoder / decoder
    tok_eos = tiny_tokenizer()
    tok_eos.eos_token = "[SEP]"  # an answer ends with EOS: generating it means saying the answer, then stopping
    with_eos = tokenize_examples([{"prompt": "the cat sat", "completion": "on the mat"}], tok_eos)[0]
    assert with_eos["labels"].tolist() == [X, X, X, *answer, tok.sep_token_id]


def test_chat_template_labels_the_assistant_turns():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "a dog"},
                {"role": "assistant", "content": "good movie"}, {"role": "user", "content": "bad plot"},
                {"role": "assistant", "content": "fun"}]
    ex = tokenize_examples([{"messages": messages}], tok)[0]
    ids_ = ex["input_ids"].tolist()
    assert tok.decode(ids_) == "[CLS] [UNK] the cat [SEP] [CLS] [UNK] a dog [SEP] [CLS] [UNK] good movie [SEP] " \
                               "[CLS] [UNK] bad plot [SEP] [CLS] [UNK] fun [SEP]"
    answer = {12, 13, 14, 22, 23}  # "good movie [SEP]", "fun [SEP]": each assistant turn to its end of turn
    assert ex["labels"].tolist() == [t if i in answer else X for i, t in enumerate(ids_)]
    with pytest.raises(ValueError, match="chat template"):
        tokenize_examples([{"messages": messages}], tiny_tokenizer())  # no template


def test_choices_keep_every_option_and_the_right_one_as_inputs(tok):
    ex = tokenize_examples([{"prompt": "the cat", "choices": ["sat", "ran on"], "label": 1}], tok)[0]
    prompt = ids(tok, "the cat")
    assert ex["input_ids"].tolist() == prompt + ids(tok, "ran on") and ex["choice_index"].item() == 1
    assert ex["choice_input_ids"].tolist() == [prompt + ids(tok, "sat") + [tok.pad_token_id],
                                               prompt + ids(tok, "ran on")]
    assert ex["choice_labels"].tolist() == [[X, X, *ids(tok, "sat"), X], [X, X, *ids(tok, "ran on")]]
    assert ex["choice_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    batch = collate([ex, tokenize_examples([{"text": "a"}], tok)[0] | {k: v for k, v in ex.items() if "choice" in k}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # choices never reach the model as inputs
    assert batch["labels"][1].tolist() == [ids(tok, "a")[0], X, X, X]
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="the index of the right one"):
        tokenize_examples([{"prompt": "the cat", "choices": ["sat"], "label": 3}], tok)


def test_truncation_is_counted_in_the_log(tok, caplog):
    records = [{"prompt": "the cat", "completion": "sat"}, {"text": "a b c d e f"},
               {"prompt": "a a a", "completion": "b b b"}]
    with caplog.at_level(logging.WARNING, logger="supermerge_hf.generative"):
        out = tokenize_examples(records, tok, max_length=4, task="lm")
    assert [len(ex["input_ids"]) for ex in out] == [3, 4, 4] and out[2]["labels"].tolist()[-1] != X
    assert "2 of 3 examples of task 'lm' were longer than max_length=4" in caplog.text


def test_lists_datasets_jsonl_and_csv_give_the_same_examples(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": "the cat", "completion": "sat on", "choices": None, "label": None},  # a Dataset's columns
               {"prompt": "good", "completion": None, "choices": ["yes", "no maybe"], "label": 0}]
    want = tokenize_examples(records, tok)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with (tmp_path / "d.csv").open("w", newline="") as f:  # other column names; choices as JSON text
        writer = csv.DictWriter(f, ["question", "answer", "choices", "label"])
        writer.writeheader()
        writer.writerows([{"question": r["prompt"], "answer": r["completion"], "label": r["label"],
                           "choices": r["choices"] and json.dumps(r["choices"])} for r in records])
    fields = {"prompt": "question", "completion": "answer"}
    for got in (tokenize_examples(datasets.Dataset.from_list(records), tok), read_generative(tmp_path / "d.jsonl", tok),
                read_generative(tmp_path / "d.csv", tok, fields=fields)):
        assert [sorted(ex) for ex in got] == [sorted(ex) for ex in want]
        assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)


def answer_loss(model, examples: list[dict]) -> float:
    """Mean cross-entropy per answer token, each example run alone (no padding)."""
    nll, count = 0.0, 0
    for ex in examples:
        logits = model(ex["input_ids"][None]).logits[0, :-1]  # (T - 1, V): position t predicts t + 1
        labels = ex["labels"][1:]
        keep = labels != X
        nll -= float(torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep, None]).sum())
        count += int(keep.sum())
    return nll / count


def mixed_records(seed: int, n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = "good bad movie plot actor is was not very the fun dull cat dog sat ran".split()

    def text(k):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))
    return [{"prompt": text(int(torch.randint(2, 7, (), generator=g))),
             "completion": text(int(torch.randint(1, 4, (), generator=g)))} for _ in range(n)]


def test_supervised_fit_selects_on_the_answer_token_loss(llama_family, tok):
    examples = {t: tokenize_examples(mixed_records(i), tok) for i, t in enumerate(llama_family.sources)}
    config = SuperMergeConfig(base=str(llama_family.base), sources=llama_family.source_list(), steps=2, eval_every=1,
                              batch_size=4, learning_rate=0.1, holdout_fraction=0.25, init_from_task_arithmetic=False)
    merger = SuperMerger(config).fit(examples)
    splits, _ = make_splits({t: as_examples(t, e) for t, e in examples.items()}, 0.25, config.seed)
    model = merger.merge_and_unload().float().eval()
    held = next(h["holdout"] for h in merger.history if h["step"] == merger.selected_step)
    with torch.no_grad():
        for task, split in splits.items():  # batched, padded, per answer token = each example alone, unpadded
            assert held[task] == pytest.approx(answer_loss(model, split.holdout), rel=1e-5)
            assert merger.metrics[task]["merged"]["loss"] == pytest.approx(held[task], rel=1e-6)
    assert "exact_match merged" in metrics_table(merger.metrics)


def ranked_examples(tok) -> list[dict]:
    return tokenize_examples([{"prompt": "the cat", "choices": ["sat", "ran on the mat", "is"], "label": 0},
                              {"prompt": "a very good", "choices": ["movie", "plot"], "label": 0},
                              {"prompt": "dog", "choices": ["ran", "sat on", "was not fun"], "label": 0}], tok)


def test_rank_classification_equals_the_finetunes_own_scores(gpt2_family, tok):
    examples = ranked_examples(tok)
    model = AutoModelForCausalLM.from_pretrained(gpt2_family.sources["a"]).eval()
    with torch.no_grad():  # each choice alone: the summed log-probability of its tokens given the prompt
        best = [int(torch.tensor([-answer_loss(model, [{"input_ids": i[m.bool()], "labels": lab[m.bool()]}])
                                  * int((lab != X).sum()) for i, m, lab in zip(ex["choice_input_ids"],
                                                                                ex["choice_attention_mask"],
                                                                                ex["choice_labels"])]).argmax())
                for ex in examples]
    merger = SuperMerger(SuperMergeConfig(base=str(gpt2_family.base), sources=gpt2_family.source_list()))
    right = [ex | {"choice_index": torch.tensor(b)} for ex, b in zip(examples, best)]
    wrong = [ex | {"choice_index": torch.tensor((b + 1) % len(ex["choice_input_ids"]))}
             for ex, b in zip(examples, best)]
    assert merger.evaluate({"a": right}, finetunes=True)["a"]["accuracy"] == 1.0  # one-hot merge = fine-tune a
    assert merger.evaluate({"a": wrong}, finetunes=True, batch_size=2)["a"]["accuracy"] == 0.0


def each_choice_alone(model, example: dict) -> torch.Tensor:
    """The summed log-probability of each choice's answer tokens, the choice run alone and unpadded."""
    scores = []
    for i, m, lab in zip(example["choice_input_ids"], example["choice_attention_mask"], example["choice_labels"]):
        i, lab = i[m.bool()], lab[m.bool()]
        log_p = torch.log_softmax(model(i[None]).logits[0, :-1].double(), -1)  # position t predicts token t + 1
        scores.append(sum(float(log_p[t, lab[t + 1]]) for t in range(len(lab) - 1) if lab[t + 1] != X))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("family", ["gpt2_family", "llama_family"])
def test_rank_scores_read_each_prompt_once_and_equal_each_choice_alone(family, tok, request):
    fam = request.getfixturevalue(family)
    examples = ranked_examples(tok) + tokenize_examples([{"prompt": "x", "choices": ["a b", "c"], "label": 1}], tok)
    model = AutoModelForCausalLM.from_pretrained(fam.sources[next(iter(fam.sources))]).eval()
    calls = []

    def forward(batch):
        calls.append("cache" in batch or "past_key_values" in batch)
        return model(**batch)

    with torch.no_grad():
        scores = rank_scores(examples, forward, shift=True, batch_size=2)
        for ex, score in zip(examples, scores):
            assert torch.allclose(score.double(), each_choice_alone(model, ex), atol=1e-4)
    prompt = [int((ex["choice_labels"][0] != X).int().argmax()) for ex in examples]  # tokens before the answer
    shared = sum(1 for p in prompt if p > 1)
    alone = sum(len(ex["choice_input_ids"]) for ex, p in zip(examples, prompt) if p <= 1)  # one sequence per choice
    assert 0 < shared < len(examples)  # a one-token prompt has nothing to share
    assert calls.count(True) == shared and len(calls) == 2 * shared + -(-alone // 2)  # a prompt, then its choices


def test_rank_scores_without_a_cache_run_each_choice_and_mean_divides_by_the_answer(gpt2_family, tok):
    examples = ranked_examples(tok)
    model = AutoModelForCausalLM.from_pretrained(gpt2_family.sources["a"]).eval()
    calls = []

    def no_cache(batch):  # a model that returns logits only (as a state-space model whose cache cannot repeat)
        calls.append(len(batch["input_ids"]))
        return SimpleNamespace(logits=model(**{k: v for k, v in batch.items() if k != "use_cache"}).logits)

    with torch.no_grad():
        summed = rank_scores(examples, no_cache, shift=True, batch_size=4)
        mean = rank_scores(examples, lambda batch: model(**batch), shift=True, reduce="mean")
        for ex, total, average in zip(examples, summed, mean):
            alone = each_choice_alone(model, ex)
            assert torch.allclose(total.double(), alone, atol=1e-4)
            lengths = (ex["choice_labels"] != X).sum(-1)  # answer tokens of each choice
            assert torch.allclose(average.double(), alone / lengths, atol=1e-4)
    rows = sum(len(ex["choice_input_ids"]) for ex in examples)
    assert calls == [1] + [4] * (rows // 4) + [rows % 4] * bool(rows % 4)  # one try at a cache, then batches


def test_greedy_exact_match(gpt2_family):
    model = AutoModelForCausalLM.from_pretrained(gpt2_family.sources["b"]).eval()
    prompt = torch.tensor([5, 9, 17, 3])
    sequence = prompt
    with torch.no_grad():
        for _ in range(3):  # greedy decoding, one token at a time
            sequence = torch.cat([sequence, model(sequence[None]).logits[0, -1].argmax()[None]])
    greedy = {"input_ids": sequence, "labels": torch.cat([torch.full((4,), X), sequence[4:]])}
    off = sequence.clone()
    off[-1] = (off[-1] + 1) % 64
    other = {"input_ids": off, "labels": torch.cat([torch.full((4,), X), off[4:]])}
    merger = SuperMerger(SuperMergeConfig(base=str(gpt2_family.base), sources=gpt2_family.source_list()))
    assert merger.evaluate({"b": [greedy]}, finetunes=True)["b"]["exact_match"] == 1.0
    assert merger.evaluate({"b": [greedy, other]}, finetunes=True)["b"]["exact_match"] == 0.5


def test_recipe_with_generative_data(llama_family, tmp_path):
    base = tmp_path / "base"  # the llama base with a tokenizer, which the recipe's data is read with
    shutil.copytree(llama_family.base, base)
    tiny_tokenizer().save_pretrained(base)
    for i, task in enumerate(llama_family.sources):
        (tmp_path / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in mixed_records(10 + i, 6)))
    sources = [s | {"data": {"path": f"{s['task']}.jsonl", "format": "prompt_completion", "max_length": 6}}
               for s in llama_family.source_list()]
    recipe = {"base": str(base), "sources": sources, "steps": 1, "batch_size": 3, "output_dir": "merged",
              "init_from_task_arithmetic": False}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yaml")]) == 0
    assert "exact_match merged" in (tmp_path / "merged" / "README.md").read_text()


def chat_like(seed: int, n: int = 5, *, trailing_seed: int | None = None, padding: int = 0) -> list[dict]:
    """Variable-length decoder-only examples: a prompt (-100), the answer, then a following turn (-100, as a chat's
    next user turn); `trailing_seed` redraws that turn's tokens and length, `padding` appends padding by hand."""
    g, t = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(trailing_seed or seed)
    out = []
    for i in range(n):
        prompt, answer = int(torch.randint(1, 6, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        head = torch.randint(1, 64, (prompt + answer,), generator=g)
        tail = torch.randint(1, 64, (int(torch.randint(0, 4, (), generator=t)),), generator=t)
        pad = padding * (i % 2)
        ids = torch.cat([head, tail, torch.full((pad,), 0)])
        labels = torch.cat([torch.full((prompt,), X), head[prompt:], torch.full((len(tail) + pad,), X)])
        out.append({"input_ids": ids, "attention_mask": (torch.arange(len(ids)) < len(ids) - pad).long(),
                    "labels": labels})
    return out


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory) -> Family:
    """A tiny Llama whose predictions are far from uniform (large initial weights), so entropies differ."""
    root = tmp_path_factory.mktemp("sharp_llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.5)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    for i, task in enumerate(["code", "math"]):
        perturb(LlamaForCausalLM.from_pretrained(root / "base"), seed=i, scale=0.2).save_pretrained(root / task)
    return Family(root / "base", {t: root / t for t in ["code", "math"]}, None)


def adamerging_fm(family):
    config = SuperMergeConfig(base=str(family.base), sources=family.source_list(), method="adamerging")
    merger = SuperMerger(config)
    return merger.plan, FunctionalMerge(merger.plan, dtype=torch.float32)


def answer_entropy(fm, task, params, examples) -> float:
    """Mean entropy of the predictions of the answer tokens, each example run alone (no padding, nothing after)."""
    total, count = 0.0, 0
    for ex in examples:
        answer = (ex["labels"] != X).nonzero().flatten()  # positions answer[0] .. answer[-1]
        ids = ex["input_ids"][: int(answer[-1]) + 1]
        log_p = torch.log_softmax(fm.forward(task, params, {"input_ids": ids[None]}).logits[0], -1)  # (T, V)
        rows = log_p[answer - 1]  # position t predicts token t + 1
        total += float(-(rows.exp() * rows).sum())
        count += len(answer)
    return total / count


def test_adamerging_entropy_reads_the_answer_tokens_only(sharp_llama):
    """AdaMerging's entropy on a generative task averages over the answer tokens: prompt, following turns and
    padding are left out, whatever they hold (method.md section 8). Each difference is measured against the one
    that counting every real token makes."""
    plan, fm = adamerging_fm(sharp_llama)
    c = torch.full((plan.num_sources, len(plan.groups)), 0.3)
    examples = chat_like(0)
    grad, losses = fm.coefficient_grad(c, {"code": examples}, {"code": 1.0}, "entropy")
    inputs = [{k: v for k, v in ex.items() if k != "labels"} for ex in examples]  # no answer: every real token
    grad_all, losses_all = fm.coefficient_grad(c, {"code": inputs}, {"code": 1.0}, "entropy")
    with torch.no_grad():
        reference = answer_entropy(fm, "code", fm.params(c), examples)
        gap = abs(float(losses_all["code"]) - reference)
        assert gap > 0 and fm.evaluate("code", inputs, c=c)["entropy"] == pytest.approx(float(losses_all["code"]))
        assert abs(float(losses["code"]) - reference) < 1e-2 * gap
        assert abs(fm.evaluate("code", examples, c=c)["entropy"] - reference) < 1e-2 * gap
    other = chat_like(0, trailing_seed=7, padding=3)  # other following turns, more padding
    assert [len(a["input_ids"]) for a in other] != [len(a["input_ids"]) for a in examples]
    grad_other, losses_other = fm.coefficient_grad(c, {"code": other}, {"code": 1.0}, "entropy")
    assert abs(float(losses_other["code"]) - float(losses["code"])) < 1e-2 * gap
    assert (grad_other - grad).abs().max() < 1e-2 * (grad_all - grad).abs().max()
    torch.testing.assert_close(grad_other, grad, rtol=1e-4, atol=1e-7)


def test_adamerging_gradient_equals_autograd_on_variable_lengths(sharp_llama):
    plan, fm = adamerging_fm(sharp_llama)
    batches = {t: chat_like(i, n=4) for i, t in enumerate(["code", "math"])}
    scale = {"code": 1.0, "math": 0.5}
    w = (0.3 + 0.2 * torch.rand(plan.num_sources, len(plan.groups), generator=torch.Generator().manual_seed(0)))
    w.requires_grad_()  # AdaMerging's transform is `none`: c = w
    merged = {n: fm.base[n] + torch.tensordot(w[:, plan.group_index[n]], d.dense(), dims=1)
              for n, d in fm.deltas.items()}
    loss = 0.0
    for task, examples in batches.items():  # reference: the answer positions written out, autograd through w
        batch = collate([{k: v for k, v in ex.items() if k != "labels"} for ex in examples])
        mask = torch.zeros(batch["input_ids"].shape)  # (B, T)
        for row, ex in zip(mask, examples):
            row[(ex["labels"] != X).nonzero().flatten() - 1] = 1.0
        log_p = torch.log_softmax(fm.forward(task, merged, batch).logits, -1)  # (B, T, V)
        loss = loss + scale[task] * (-(log_p.exp() * log_p).sum(-1) * mask).sum() / mask.sum()
    (reference,) = torch.autograd.grad(loss, [w])
    grad_c, _ = fm.coefficient_grad(w.detach(), batches, scale, "entropy")
    torch.testing.assert_close(grad_c, reference, rtol=1e-4, atol=1e-7)
    assert reference.abs().max() > 0


def test_adamerging_fit_keeps_the_answer_of_labelled_and_unlabelled_inputs(llama_family, monkeypatch):
    """The unlabelled pool keeps a generative example's answer span (class labels alone are dropped), so labelled
    examples and inputs without labels share its batches; learning's forward never gets `labels`."""
    examples = {t: chat_like(i, n=6) for i, t in enumerate(llama_family.sources)}
    extra = {"code": [{"input_ids": ex["input_ids"]} for ex in chat_like(9, n=3)]}
    splits, _ = make_splits({t: as_examples(t, e) for t, e in examples.items()}, 0.0, 0, unlabelled=extra)
    assert torch.equal(splits["code"].unlabelled[0]["labels"], examples["code"][0]["labels"])
    assert "labels" not in splits["code"].unlabelled[-1]
    learning, seen = [], []
    forward, grad = FunctionalMerge.forward, FunctionalMerge.coefficient_grad

    def spy_forward(self, task, params, batch, c=None):
        if learning:
            seen.append("labels" in batch)
        return forward(self, task, params, batch, c)

    def spy_grad(self, *args, **kwargs):
        learning.append(True)
        try:
            return grad(self, *args, **kwargs)
        finally:
            learning.pop()

    monkeypatch.setattr(FunctionalMerge, "forward", spy_forward)
    monkeypatch.setattr(FunctionalMerge, "coefficient_grad", spy_grad)
    config = SuperMergeConfig(base=str(llama_family.base), sources=llama_family.source_list(), method="adamerging",
                              steps=2, eval_every=1, batch_size=4, learning_rate=0.05)
    SuperMerger(config).fit(examples, unlabelled=extra)
    assert seen and not any(seen)
