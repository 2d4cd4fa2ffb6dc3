"""Two CPU processes (gloo, torchrun) learn the same coefficients as one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from supermerge_hf import SuperMergeConfig, SuperMerger

from .conftest import family_examples

SCRIPT = Path(__file__).parent / "scripts" / "learn_coefficients.py"


def test_two_processes_match_one(bert_family, tmp_path):
    """Also when a task has fewer examples than `batch_size` (nli: 3 of 4, split 1 + 2 between the processes);
    only the main process writes the output, which is complete."""
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), steps=3,
                              batch_size=4, holdout_fraction=0.0, learning_rate=0.05, seed=1,
                              init_from_task_arithmetic=False, output_dir=str(tmp_path / "merged"))
    (tmp_path / "config.json").write_text(config.to_json_string())
    examples = family_examples(bert_family, n=8)
    examples["nli"] = examples["nli"][:3]
    torch.save(examples, tmp_path / "examples.pt")
    env = os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(tmp_path / "config.json"), str(tmp_path / "examples.pt"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["num_processes"] == 2

    single_config = SuperMergeConfig.from_dict(config.to_dict() | {"output_dir": None})
    single = SuperMerger(single_config, accelerator=Accelerator(cpu=True)).fit(examples)
    assert single.accelerator.num_processes == 1
    distributed = torch.tensor(result["raw"])
    # equal up to float rounding of the split batch means (Adam steps are 0.05 here)
    torch.testing.assert_close(distributed, single.coefficients.raw, rtol=0, atol=5e-5)
    assert not torch.allclose(distributed, torch.full_like(distributed, distributed[0, 0].item()))
    saved = SuperMerger.from_pretrained(tmp_path / "merged")  # written once, completely, by the main process
    torch.testing.assert_close(saved.coefficients.values, torch.tanh(distributed), rtol=0, atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary folder left


def test_two_process_cli_run_logs_each_event_once(bert_family, tmp_path):
    """`torchrun --nproc_per_node 2 -m supermerge_hf.cli merge`: each log line and printed line appears once."""
    import yaml

    from .conftest import write_text_examples

    sources = []
    for i, (task, path) in enumerate(bert_family.sources.items()):
        write_text_examples(tmp_path / f"{task}.jsonl", 12, bert_family.num_labels[task], seed=i)
        sources.append({"task": task, "path": str(path), "data": {"path": f"{task}.jsonl"}})
    recipe = {"base": str(bert_family.base), "sources": sources, "steps": 2, "batch_size": 4, "eval_every": 1,
              "output_dir": "merged"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "supermerge_hf.cli", "merge", str(tmp_path / "recipe.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for event in ("Merging 2 sources", "Selected step", "Saved the merge to", "Merged model written to",
                  "Each task's fine-tune vs the merge"):
        assert output.count(event) == 1, (event, output[-3000:])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
