"""`supermerge demo --llm` end to end on a tiny random Llama with SmolLM2's chat template (no download): LoRA
fine-tunes, task arithmetic and SuperMerge, the tables, the merged model and the combined adapter that PEFT loads
and that equals the merge."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from supermerge_hf.cli import build_parser
from supermerge_hf.demo import llm, run_llm
from supermerge_hf.demo.tasks import TaskData
from supermerge_hf.scoring import rank_accuracy

WORDS = "good bad great awful movie film plot actor fun boring love hate".split()


def toy(name: str, flip: bool) -> TaskData:
    g = torch.Generator().manual_seed(len(name))
    examples = []
    for i in range(24):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (4,), generator=g)]
        examples.append({"text": " ".join(words), "label": (i % 2) ^ flip})
    return TaskData(name, ["no", "yes"], test=examples[:6], pool=examples[6:18], train=examples)


def test_llm_demo_end_to_end_on_a_tiny_llama(tmp_path, monkeypatch, capsys):
    tasks = {"bbc": toy("bbc", False), "tweets": toy("tweets", True)}  # the names pick the chat prompts
    monkeypatch.setattr(run_llm, "build_base", lambda folder: llm.build_tiny_base(folder))
    monkeypatch.setattr(run_llm, "load_task", tasks.__getitem__)
    monkeypatch.setattr(run_llm, "MAX_LENGTH", 512)  # the tiny tokenizer is byte-level: long prompts
    monkeypatch.setattr(run_llm, "TEXT_TOKENS", 16)
    args = build_parser().parse_args(["demo", "--llm", "--output", str(tmp_path / "out"), "--cache-dir",
                                      str(tmp_path / "cache"), "--finetune-steps", "2", "--steps", "2",
                                      "--examples-per-task", "4", "--test-size", "3"])
    rows = run_llm.run_llm_demo(args)
    assert list(rows)[:2] == ["base model (zero-shot)", "LoRA adapters (each on its own task)"]
    assert list(rows)[2].startswith("task arithmetic (lambda=") and list(rows)[-1] == "supermerge"
    assert all(set(acc) == {"bbc", "tweets"} and all(0 <= a <= 1 for a in acc.values()) for acc in rows.values())
    out = capsys.readouterr().out
    assert "Rank-classification accuracy" in out and "Greedy exact match" in out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "smollm2-135m-instruct", "smollm2-lora-2-bbc", "smollm2-lora-2-tweets"]  # fmt: skip

    base_dir = tmp_path / "cache" / "smollm2-135m-instruct"
    tokenizer, plain = AutoTokenizer.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for name, task in tasks.items():  # the zero-shot row is the base's own rank classification
        test = llm.tokenized(tokenizer, task, task.test[:3], text_tokens=16, max_length=512)
        with torch.no_grad():
            direct = rank_accuracy(test, lambda batch: plain(**batch), shift=True)
        assert rows["base model (zero-shot)"][name] == direct

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense, lora = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        plain = adapted.get_base_model()  # the same weights with the adapter off
        with adapted.disable_adapter():
            before = plain(input_ids=ids).logits
    assert float((lora - dense).abs().max()) < 1e-3 * float((dense - before).abs().max())  # the adapter is the merge
    with pytest.raises(FileExistsError, match="already holds files: pass --overwrite"):
        run_llm.run_llm_demo(args)


@pytest.mark.parametrize("extra, message", [(["--tasks", "bbc", "imdb"], "chat prompts for the tasks"),
                                            (["--lora"], "drop --lora")])
def test_llm_demo_refuses_bad_options_before_building_anything(extra, message, monkeypatch, tmp_path):
    monkeypatch.setattr(run_llm, "build_base", lambda folder: pytest.fail("built the base"))
    args = build_parser().parse_args(["demo", "--llm", "--cache-dir", str(tmp_path), *extra])
    assert args.llm and args.finetune_steps is None
    with pytest.raises(ValueError, match=message):
        run_llm.run_llm_demo(args)
