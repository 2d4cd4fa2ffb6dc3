"""Peak host memory of coefficient learning with K LoRA adapters vs the same adapters densified (full checkpoints).

The base is a random mid-size BERT body (hidden 512, 8 layers, ~41M parameters). Each source is a PEFT LoRA
adapter of a 2-label `BertForSequenceClassification` (r=8, alpha=16, query/key/value/dense, the classifier in
`modules_to_save`, random A and B); its densified twin is PEFT's own `merge_and_unload()` of it, saved as a full
checkpoint. Memory does not depend on what the weights are, so random adapters stand in for trained ones. Each
run is a fresh Python process that builds a `SuperMerger`, learns for a few steps on tiny random examples and
reports its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss` at the end), next to `SuperMerger.estimate_memory`'s
figure.

    python benchmarks/lora_memory.py              # K = 4 -> results/lora_memory.json
    python benchmarks/lora_memory.py --ks 2 4 8

Checkpoints go to `cache/lora_memory/` (gitignored) and are reused. A benchmark, not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKDIR = HERE / "cache" / "lora_memory"
RESULTS = HERE / "results" / "lora_memory.json"
# the setting results/lora_memory.json was measured with (the package default then): the paper's SuperMerge
PAPER = {"granularity": "tensor", "method_kwargs": {"objective": "labels", "start": "constant", "refit_heads": 0}}
MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)
LORA = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS",
            modules_to_save=["classifier"], init_lora_weights=False)
SEQ_LEN, EXAMPLES, STEPS, BATCH = 16, 4, 3, 2


def build(workdir: Path, num_sources: int) -> None:
    """The base, `num_sources` adapters and their densified twins; written once, one model in memory at a time."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    base = workdir / "base"
    if not (base / "model.safetensors").is_file():
        torch.manual_seed(0)
        BertModel(BertConfig(**MODEL)).save_pretrained(base)
    for i in range(num_sources):
        adapter, dense = workdir / f"lora{i}", workdir / f"dense{i}"
        if not (adapter / "adapter_model.safetensors").is_file():
            torch.manual_seed(1000 + i)
            model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
            get_peft_model(model, LoraConfig(**LORA)).save_pretrained(adapter)
        if not (dense / "model.safetensors").is_file():
            model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
            PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(dense)


def child(kind: str, num_sources: int, workdir: Path) -> dict:
    """One learning run in this fresh process."""
    import torch
    from memory import model_numel, vocab_size

    from supermerge_hf import SuperMergeConfig, SuperMerger

    import_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sources = [{"task": f"task{i}", "path": str(workdir / f"{kind}{i}")} for i in range(num_sources)]
    config = SuperMergeConfig(base=str(workdir / "base"), sources=sources, steps=STEPS, batch_size=BATCH,
                              examples_per_task=EXAMPLES, holdout_fraction=0.0, **PAPER)
    start = time.perf_counter()
    merger = SuperMerger(config)
    estimated = next(e.host_mb for e in merger.estimate_memory() if e.mode == "flat")
    g = torch.Generator().manual_seed(0)
    vocab = vocab_size(workdir / "base")
    examples = {s["task"]: [{"input_ids": torch.randint(1000, vocab, (SEQ_LEN,), generator=g),
                             "labels": torch.tensor(j % 2)} for j in range(EXAMPLES)] for s in sources}
    merger.fit(examples)
    numel = model_numel(workdir / "base")
    source_bytes = sum((workdir / f"{kind}{i}").joinpath(
        "adapter_model.safetensors" if kind == "lora" else "model.safetensors").stat().st_size
        for i in range(num_sources))
    return {"sources": kind, "num_sources": num_sources, "model_mb": round(numel * 4 / 2**20, 1),
            "source_files_mb": round(source_bytes / 2**20, 1), "import_rss_mb": round(import_mb, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "estimated_mb": round(estimated, 1), "seconds": round(time.perf_counter() - start, 1)}


def run(args: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise RuntimeError(f"{args} failed with exit code {proc.returncode}")
    return proc.stdout


def table(rows: list[dict]) -> str:
    lines = [f"{'sources':<9}{'K':>3}{'model MB':>10}{'source files MB':>17}{'peak RSS MB':>13}{'estimate MB':>13}"
             f"{'seconds':>9}"]
    lines += [f"{r['sources']:<9}{r['num_sources']:>3}{r['model_mb']:>10.0f}{r['source_files_mb']:>17.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['estimated_mb']:>13.0f}{r['seconds']:>9.1f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", nargs="+", type=int, default=[4], help="Numbers of sources (default: 4).")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="Where the checkpoints are kept.")
    parser.add_argument("--output", type=Path, default=RESULTS, help="The JSON results file.")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build(args.workdir, args.build)
        return 0
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.workdir)))
        return 0
    # checkpoints and every measurement in their own processes, so that this parent stays small
    run(["--build", str(max(args.ks)), "--workdir", str(args.workdir)])
    rows = []
    for k in args.ks:
        for kind in ("lora", "dense"):
            out = run(["--child", kind, str(k), "--workdir", str(args.workdir)])
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(table(rows[-1:]).splitlines()[1], flush=True)
    print("\n" + table(rows))
    result = {"runs": rows, "setup": {
        "base": "BertModel(BertConfig(" + ", ".join(f"{k}={v}" for k, v in MODEL.items()) + ")), random",
        "lora": "BertForSequenceClassification(num_labels=2) + LoraConfig(" + ", ".join(
            f"{k}={v!r}" for k, v in LORA.items()) + ")",
        "dense": "the same adapters, PeftModel.merge_and_unload().save_pretrained()",
        "learning": {"steps": STEPS, "batch_size": BATCH, "examples_per_task": EXAMPLES, "sequence_length": SEQ_LEN,
                     "holdout_fraction": 0.0, "granularity": "tensor", "dtype": "float32", "device": "cpu"},
        "peak_rss": "getrusage(RUSAGE_SELF).ru_maxrss at the end of a fresh process per run",
        "estimated_mb": "SuperMerger.estimate_memory() host_mb, flat mode"}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"Written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
