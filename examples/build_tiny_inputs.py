"""Build the inputs that `recipe.yaml` and `quickstart.py` name, as tiny random models, so that both run as shipped:

    python examples/build_tiny_inputs.py          # writes examples/models/ and examples/data/ (a few seconds)
    supermerge merge examples/recipe.yaml         # writes examples/merged/
    python examples/quickstart.py                 # the same merge from Python, into examples/merged-python/

`models/base` is a 2-layer BERT with a word-level tokenizer; `models/sst` (2 labels) and `models/nli` (3 labels)
are its "fine-tunes" (random perturbations with classifier heads); `data/` holds labelled examples of both tasks
(JSONL with integer labels, CSV with label names). Replace them with your own folders, Hub ids and data.
"""

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

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
    print(f"Wrote {HERE / 'models'} and {HERE / 'data'}")


if __name__ == "__main__":
    main()
