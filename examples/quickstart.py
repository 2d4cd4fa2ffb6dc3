"""The README's Python quickstart on the tiny inputs of `build_tiny_inputs.py` (run that first):

    python examples/build_tiny_inputs.py && python examples/quickstart.py
"""

import logging
from pathlib import Path

from transformers import AutoModel, AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model, read_examples

HERE = Path(__file__).parent


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    models, data = HERE / "models", HERE / "data"
    config = SuperMergeConfig(base=str(models / "base"), steps=20,
                              sources=[{"task": "sst", "path": str(models / "sst")},
                                       {"task": "nli", "path": str(models / "nli")}])
    merger = SuperMerger(config)  # resolves and checks the sources (headers only)
    tokenizer = AutoTokenizer.from_pretrained(models / "base")
    nli = merger.plan.task_specs["nli"].config.label2id  # the CSV names its labels
    examples = {"sst": read_examples(data / "sst.jsonl", tokenizer),
                "nli": read_examples(data / "nli.csv", tokenizer, label2id=nli)}
    merger.fit(examples)
    print("merged:", merger.evaluate(examples))
    print("fine-tunes:", merger.evaluate(examples, finetunes=True))
    out = merger.save_pretrained(HERE / "merged-python", overwrite=True)
    body = AutoModel.from_pretrained(out)  # the merged body
    sst_model = load_task_model(out, "sst")  # body + sst's own classifier head
    reloaded = SuperMerger.from_pretrained(out)  # the merge again, from its config and coefficients
    print(f"Saved to {out}: {type(body).__name__}, {type(sst_model).__name__}, {len(reloaded.coefficients.groups)} "
          "coefficient groups")


if __name__ == "__main__":
    main()
