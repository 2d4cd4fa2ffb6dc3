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
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), steps=3,
                              batch_size=4, holdout_fraction=0.0, learning_rate=0.05, seed=1,
                              init_from_task_arithmetic=False)
    config.to_dict()
    (tmp_path / "config.json").write_text(config.to_json_string())
    examples = family_examples(bert_family, n=8)
    torch.save(examples, tmp_path / "examples.pt")
    env = os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(tmp_path / "config.json"), str(tmp_path / "examples.pt"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["num_processes"] == 2

    single = SuperMerger(config, accelerator=Accelerator(cpu=True)).fit(examples)
    assert single.accelerator.num_processes == 1
    distributed = torch.tensor(result["raw"])
    # equal up to float rounding of the split batch means (Adam steps are 0.05 here)
    torch.testing.assert_close(distributed, single.coefficients.raw, rtol=0, atol=5e-5)
    assert not torch.allclose(distributed, torch.full_like(distributed, distributed[0, 0].item()))
