"""Our data-free merge functions, applied tensor by tensor, against `mergekit-pytorch` (mergekit 0.1.5)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from supermerge_hf.methods import average, task_arithmetic, ties

pytest.importorskip("mergekit", reason="mergekit is an optional test dependency (mergekit==0.1.5, in the `dev` extra)")

NUM_SOURCES = 3
# One YAML per method, in mergekit's own parameter names; the same numbers are passed to our functions below.
CONFIGS = {
    # `linear` ignores the base: Σ w_s θ_s / Σ w_s (normalize defaults to true) = θ_p + average(τ, weights)
    "linear": {"weights": [1.0, 2.0, 1.0], "with_base": False, "parameters": {}},
    "task_arithmetic": {"weights": [0.5, 1.0, 0.7], "with_base": True, "parameters": {"lambda": 0.8}},
    # ties trims each tensor (density per source); weights 1 so that electing on weighted or unweighted agrees
    "ties": {"weights": [1.0, 1.0, 1.0], "with_base": True, "parameters": {"lambda": 0.7}, "density": 0.3},
}


def mergekit_pytorch() -> str:
    # prefer the script installed beside this interpreter (a venv that is not activated)
    script = shutil.which("mergekit-pytorch", path=str(Path(sys.executable).parent))
    script = script or shutil.which("mergekit-pytorch")
    if script is None:
        pytest.skip("mergekit is importable but its `mergekit-pytorch` script is not on PATH")
    return script


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny BERT as base, three fine-tune-like perturbations of it, and mergekit's merge of them per method."""
    root = tmp_path_factory.mktemp("mergekit")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    base = {name: p.detach().clone() for name, p in BertModel(config).named_parameters()}
    save_file(base, root / "base.safetensors")
    sources = []
    for index in range(NUM_SOURCES):
        # the first source leaves the word embeddings untouched: an all-zero task vector tensor
        source = {
            name: tensor if (index == 0 and "word_embeddings" in name) else tensor + 0.01 * torch.randn_like(tensor)
            for name, tensor in base.items()
        }
        save_file(source, root / f"source_{index}.safetensors")
        sources.append(source)

    processes = {}
    for method, spec in CONFIGS.items():
        models = [
            {"model": str(root / f"source_{i}.safetensors"),
             "parameters": {"weight": w, **({"density": spec["density"]} if "density" in spec else {})}}
            for i, w in enumerate(spec["weights"])
        ]  # fmt: skip
        mergekit_config = {"merge_method": method, "models": models, "dtype": "float32"}
        if spec["with_base"]:
            mergekit_config["base_model"] = str(root / "base.safetensors")
        if spec["parameters"]:
            mergekit_config["parameters"] = spec["parameters"]
        (root / f"{method}.yml").write_text(yaml.safe_dump(mergekit_config))
        # usage: mergekit-pytorch CONFIG_PATH OUT_PATH; writes OUT_PATH/model.safetensors
        command = [mergekit_pytorch(), str(root / f"{method}.yml"), str(root / method), "--quiet"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        processes[method] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    merged = {}
    for method, process in processes.items():  # the three run side by side: most of their time is imports
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"mergekit-pytorch {method} failed:\n{output.decode()}"
        merged[method] = load_file(root / method / "model.safetensors")
    return base, sources, merged


def stacked_deltas(base, sources, name):
    return torch.stack([source[name] - base[name] for source in sources])  # (S, *shape)


def check_per_tensor(checkpoints, method, merge):
    base, sources, merged = checkpoints
    assert set(merged[method]) == set(base)
    weights = torch.tensor(CONFIGS[method]["weights"])
    for name in base:
        ours = base[name] + merge(stacked_deltas(base, sources, name), weights)
        max_diff = (ours - merged[method][name]).abs().max().item()
        assert max_diff < 1e-6, f"{method} differs from mergekit on {name}: max |Δ| = {max_diff}"


def test_average_matches_mergekit_linear(checkpoints):
    check_per_tensor(checkpoints, "linear", lambda deltas, weights: average(deltas, weights=weights))


def test_task_arithmetic_matches_mergekit(checkpoints):
    lam = CONFIGS["task_arithmetic"]["parameters"]["lambda"]
    check_per_tensor(
        checkpoints, "task_arithmetic", lambda deltas, weights: task_arithmetic(deltas, weights=weights, lam=lam)
    )


def test_ties_per_tensor_matches_mergekit(checkpoints):
    lam, density = CONFIGS["ties"]["parameters"]["lambda"], CONFIGS["ties"]["density"]
    check_per_tensor(
        checkpoints, "ties", lambda deltas, weights: ties(deltas, weights=weights, lam=lam, density=density)
    )
