"""Build the inputs that `recipe.yaml`, `llm_recipe.yaml` and `quickstart.py` name, as tiny random models, so
that all run as shipped:

    python examples/build_tiny_inputs.py          # writes examples/models/ and examples/data/ (a few seconds)
    supermerge merge examples/recipe.yaml         # writes examples/merged/
    python examples/quickstart.py                 # the same merge from Python, into examples/merged-python/
    supermerge merge examples/llm_recipe.yaml --adapter-output examples/llm-adapter   # LoRA adapters of an LLM

`models/base` is a 2-layer BERT with a word-level tokenizer; `models/sst` (2 labels) and `models/nli` (3 labels)
are its "fine-tunes" (random perturbations with classifier heads); `data/` holds labelled examples of both tasks
(JSONL with integer labels, CSV with label names). `models/llm` is a 2-layer Llama with a chat template, and
`models/llm-qa`, `models/llm-chat` two PEFT LoRA adapters of it (random factors); `data/*.jsonl` chat records
for them. Replace them with your own folders, Hub ids and data.
"""

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

HERE = Path(__file__).parent
WORDS = ["good", "bad", "movie", "plot", "actor", "is", "was", "not", "very", "the", "a", "and", "but", "fun", "dull"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def main() -> None:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(HERE / "models" / "base")
    tokenizer().save_pretrained(HERE / "models" / "base")
    rng = random.Random(0)
    (HERE / "data").mkdir(exist_ok=True)
    for task, num_labels in (("sst", 2), ("nli", 3)):
        model = BertForSequenceClassification.from_pretrained(HERE / "models" / "base", num_labels=num_labels)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        model.save_pretrained(HERE / "models" / task)
        rows = [{"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))), "label": rng.randrange(num_labels)}
                for _ in range(48)]
        if task == "sst":
            (HERE / "data" / "sst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:  # label names, as in the fine-tune's config.json (id2label)
            with (HERE / "data" / "nli.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["text", "label"])
                writer.writeheader()
                writer.writerows({"text": r["text"], "label": model.config.id2label[r["label"]]} for r in rows)
    build_llm(rng)
    print(f"Wrote {HERE / 'models'} and {HERE / 'data'}")


CHAT = ("{% for m in messages %}[CLS] {{ m['role'] }} {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}[CLS] assistant {% endif %}")


def build_llm(rng: random.Random) -> None:
    """A tiny Llama with a chat template, two LoRA adapters of it, and chat records for each (system, user and
    assistant turns: the loss is on the assistant's)."""
    chat_tokenizer = tokenizer()
    chat_tokenizer.chat_template = CHAT
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(HERE / "models" / "llm")
    chat_tokenizer.save_pretrained(HERE / "models" / "llm")
    for i, task in enumerate(("qa", "chat")):
        model = LlamaForCausalLM.from_pretrained(HERE / "models" / "llm")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a changed model
        get_peft_model(model, lora).save_pretrained(HERE / "models" / f"llm-{task}")
        records = [{"messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))},
                                 {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 3 + i)))}]}
                   for _ in range(24)]
        (HERE / "data" / f"llm-{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
