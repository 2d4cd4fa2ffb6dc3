"""ProDistill (`method: prodistill`, `blockdistill.py`): element-wise coefficients learned block by block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.blockdistill import block_path, capture, learn_block, real_positions
from supermerge_hf.data import as_examples, collate
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.gram import finetune_weights, same_shape_batches

from .conftest import family_examples, lm_examples

FAST = {"block_steps": 30, "lr": 0.05, "max_inputs": 8}


def merge(family, examples, tasks=None, **kwargs) -> SuperMerger:
    sources = [s for s in family.source_list() if tasks is None or s["task"] in tasks]
    config = SuperMergeConfig(base=str(family.base), sources=sources, method="prodistill",
                              method_kwargs=FAST | kwargs)
    return SuperMerger(config).fit({t: examples[t] for t in (tasks or examples)})


def test_one_source_is_learned_back_block_by_block(bert_family, tmp_path):
    """With one source the merged body's features on the task's inputs move from those of c = 0.3 towards the
    fine-tune's; outside numbered blocks the tensors are the mean of the task vectors (here the fine-tune's)."""
    examples = family_examples(bert_family, n=8)
    learned = Path(merge(bert_family, examples, ["sst"], block_steps=60).save_pretrained(tmp_path / "learned"))
    config = SuperMergeConfig(base=str(bert_family.base), sources=[bert_family.source_list()[0]],
                              method="task_arithmetic", method_kwargs={"lam": 0.3})
    start = SuperMerger(config).fit().save_pretrained(tmp_path / "start")
    batch = collate(as_examples("sst", [{"input_ids": ex["input_ids"]} for ex in examples["sst"]],
                                require_labels=False))

    def features(folder):
        with torch.no_grad():
            return AutoModel.from_pretrained(folder)(**batch).last_hidden_state

    target = features(bert_family.sources["sst"])
    assert (features(learned) - target).norm() < 0.5 * (features(start) - target).norm()
    tuned = load_file(bert_family.sources["sst"] / "model.safetensors")
    merged = load_file(learned / "model.safetensors")
    torch.testing.assert_close(merged["embeddings.word_embeddings.weight"],
                               tuned["bert.embeddings.word_embeddings.weight"])


def test_block_loss_falls_and_the_kept_step_is_the_lowest(bert_family):
    """`learn_block` on the first block of two sources: the feature MSE at the kept step is below step 0's, and
    step 0 is the merge with c = init everywhere."""
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), method="prodistill")
    merger = SuperMerger(config)
    plan = merger.plan
    fm = FunctionalMerge(plan, dtype=torch.float32, streaming=True)
    names = [n for n in plan.merged if n.startswith("encoder.layer.0.")]
    examples = family_examples(bert_family, n=8)
    io = {}
    for task in plan.tasks:
        inputs = as_examples(task, examples[task], require_labels=False)
        batches = [collate(b) for b in same_shape_batches(inputs, 8, keep_labels=False)]
        path = block_path(plan, task, names)
        weights = finetune_weights(fm, plan.task_rows[task], {})
        targets = capture(fm, task, weights, batches, path, output=True)
        io[task] = (path, capture(fm, task, weights, batches, path, output=False),
                    [(t, real_positions(b, t)) for t, b in zip(targets, batches)])
    tensors, first, best = learn_block(fm, names, io, {"lr": 0.05, "block_steps": 20}, 0.3)
    assert best < 0.7 * first
    _, first_again, zero_steps = learn_block(fm, names, io, {"lr": 0.05, "block_steps": 0}, 0.3)
    assert first_again == pytest.approx(first) and zero_steps == pytest.approx(first)


@pytest.mark.parametrize("family_name", ["bert_family", "llama_family"])
def test_merge_saves_and_reloads_identical_logits(family_name, request, tmp_path):
    family = request.getfixturevalue(family_name)
    examples = family_examples(family, n=6) if family.num_labels else \
        {t: lm_examples(6, seed=i) for i, t in enumerate(family.sources)}
    merger = merge(family, examples, block_steps=3)
    assert all(torch.isfinite(t).all() for t in merger.merged_tensors.values())
    out = merger.save_pretrained(tmp_path / "merged")
    x = torch.randint(1, 64, (2, 7))
    if family.num_labels:
        assert torch.equal(AutoModel.from_pretrained(out)(x).last_hidden_state,
                           merger.merge_and_unload()(x).last_hidden_state)
    else:
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(x).logits, merger.merge_and_unload()(x).logits)
    again = SuperMerger.from_pretrained(out)  # a statistics merge reloads its saved weights
    assert all(torch.equal(again.merged_tensors[n], t) for n, t in merger.merged_tensors.items())


def test_prodistill_needs_inputs_for_every_task(bert_family):
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), method="prodistill")
    with pytest.raises(ValueError, match="no inputs"):
        SuperMerger(config).fit({"sst": family_examples(bert_family, n=4)["sst"]})
