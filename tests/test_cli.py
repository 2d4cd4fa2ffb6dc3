"""The README's Python quickstart, the example recipe and the `supermerge` command."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from supermerge_hf import Coefficients, HierarchicalConfig, SuperMergeConfig
from supermerge_hf.cli import build_parser, main

from .conftest import write_text_examples

ROOT = Path(__file__).parent.parent


def code_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def place_models(bert_family, folder: Path) -> None:
    for name, path in [("base", bert_family.base), *bert_family.sources.items()]:
        shutil.copytree(path, folder / name)


def test_readme_python_quickstart(bert_family, tmp_path, monkeypatch):
    place_models(bert_family, tmp_path)
    for i, (task, k) in enumerate(bert_family.num_labels.items()):
        write_text_examples(tmp_path / f"{task}.jsonl", 24, k, seed=i)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code_block("quickstart"), "README-quickstart", "exec"), namespace)
    assert isinstance(namespace["merger"].coefficients, Coefficients)
    assert namespace["sst_model"].config.num_labels == 2
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    for name, tensor in namespace["reloaded"].merged_tensors.items():
        assert torch.equal(tensor, namespace["merger"].merged_tensors[name]), name


def test_readme_commands_are_what_ci_runs():
    assert "pip install torch==2.13.0" in code_block("ci:demo") and "supermerge demo" in code_block("ci:demo")
    assert "pytest" in code_block("ci:test")
    assert "ci:test" in (ROOT / ".ci" / "run").read_text()


def test_example_recipe_runs(bert_family, tmp_path):
    recipe_dir = tmp_path / "recipe"
    (recipe_dir / "data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "recipe.yaml", recipe_dir / "recipe.yaml")
    place_models(bert_family, recipe_dir / "models")
    write_text_examples(recipe_dir / "data" / "sst.jsonl", 20, 2, seed=0)
    rows = [json.loads(line) for line in (recipe_dir / "data" / "sst.jsonl").read_text().splitlines()]
    with (recipe_dir / "data" / "nli.csv").open("w", newline="") as f:  # label names, as in the fine-tune's config
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": f"LABEL_{i % 3}"} for i, r in enumerate(rows))
    assert main(["merge", str(recipe_dir / "recipe.yaml"), "--steps", "2"]) == 0
    out = recipe_dir / "merged"
    config = SuperMergeConfig.from_pretrained(out)
    assert config.steps == 2 and config.merge_info["task_specific"]["sst"] == ["classifier.weight", "classifier.bias"]
    assert AutoModel.from_pretrained(out)(torch.tensor([[2, 5, 6, 3]])).last_hidden_state.shape == (1, 4, 32)
    # a second run refuses to overwrite, --overwrite replaces
    assert main(["merge", str(recipe_dir / "recipe.yaml"), "--steps", "1"]) == 2
    assert main(["merge", str(recipe_dir / "recipe.yaml"), "--steps", "1", "--overwrite"]) == 0


def test_recipe_without_data_is_refused_for_a_learned_method(bert_family, tmp_path, capsys):
    import yaml

    recipe = yaml.safe_load(write_recipe(bert_family, tmp_path).read_text())
    del recipe["sources"][1]["data"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "source(s) ['nli']" in (err := capsys.readouterr().err) and "need `data:" in err
    assert not (tmp_path / "o").exists()


def test_data_free_recipe_needs_no_data(bert_family, tmp_path):
    import yaml

    sources = [{"task": t, "path": str(p)} for t, p in bert_family.sources.items()]
    recipe = {"base": str(bert_family.base), "sources": sources, "method": "ties",
              "method_kwargs": {"lam": 0.8, "density": 0.5}, "output_dir": str(tmp_path / "o")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yaml")]) == 0
    assert AutoModel.from_pretrained(tmp_path / "o")(torch.tensor([[2, 5, 6, 3]])).last_hidden_state.shape == (1, 4, 32)


@pytest.mark.parametrize("command", ["merge", "demo"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, f"option {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in text


def test_methods_lists_all_sixteen(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]  # indented: a method's hyperparameters
    assert names == sorted(["average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                            "tsv_m", "iso_c", "iso_cts", "lines", "adamerging", "adamerging_plus", "supermerge",
                            "regmean", "regmean_plusplus", "prodistill"])
    assert next(line for line in lines if line.startswith("regmean ")).split()[1] == "statistics"


def write_recipe(family, folder: Path, **extra) -> Path:
    import yaml

    (folder / "data").mkdir(parents=True, exist_ok=True)
    sources = []
    for i, (task, path) in enumerate(family.sources.items()):
        write_text_examples(folder / "data" / f"{task}.jsonl", 12, family.num_labels[task], seed=i)
        sources.append({"task": task, "path": str(path), "data": {"path": f"data/{task}.jsonl"}})
    recipe = {"base": str(family.base), "sources": sources, "steps": 2, "batch_size": 4} | extra
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def test_estimate_prints_every_mode_and_picks_one(bert_family, llama_family, tmp_path, capsys):
    from supermerge_hf import SuperMerger
    from supermerge_hf.estimate import estimate, pick_mode

    recipe = write_recipe(bert_family, tmp_path)
    assert main(["estimate", str(recipe), "--max-memory", "100GB"]) == 0
    out = capsys.readouterr().out
    assert all(mode in out for mode in ("flat", "hierarchical", "streaming")) and "use flat" in out
    merger = SuperMerger(SuperMergeConfig(base=str(llama_family.base), sources=llama_family.source_list()))
    flat, hier, stream = estimate(merger.plan, group_size=1)
    assert flat.copies == 5 and hier.copies == 3 and stream.copies < 2  # 2 + S, 2 + g, 1 + 2 tensors
    assert estimate(merger.plan, group_size=3)[1].copies == 5  # one group: the flat merge
    assert flat.host_mb > hier.host_mb > stream.host_mb
    assert pick_mode([flat, hier, stream], (hier.host_mb + stream.host_mb) / 2) == "streaming"
    assert pick_mode([flat, hier, stream], (flat.host_mb + hier.host_mb) / 2) == "hierarchical"
    assert pick_mode([flat, hier, stream], 1.0) is None


def test_merge_refuses_a_run_that_cannot_fit(bert_family, tmp_path, capsys):
    recipe = write_recipe(bert_family, tmp_path, output_dir=str(tmp_path / "out"))
    assert main(["merge", str(recipe), "--max-memory", "10MB"]) == 2
    err = capsys.readouterr().err
    assert "A flat merge needs about" in err and "more than --max-memory 10 MB" in err and "streaming" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties", "adamerging"])
def test_other_methods_from_the_cli(method, bert_family, tmp_path):
    extra = {"method": method, "output_dir": str(tmp_path / "out")}
    if method == "ties":
        extra["method_kwargs"] = {"density": 0.5, "lam": "auto"}
    recipe = write_recipe(bert_family, tmp_path, **extra)
    assert main(["merge", str(recipe)]) == 0
    assert SuperMergeConfig.from_pretrained(tmp_path / "out").method == method
    assert AutoModel.from_pretrained(tmp_path / "out")(torch.tensor([[2, 5, 6, 3]])).last_hidden_state.shape == (1, 4, 32)


@pytest.mark.parametrize("mode", [{"streaming": True}, {"hierarchical": {"group_size": 2, "grouping": "similarity"}}])
def test_memory_modes_from_the_cli(mode, bert_family, tmp_path):
    recipe = write_recipe(bert_family, tmp_path, output_dir=str(tmp_path / "out"), **mode)
    assert main(["merge", str(recipe), "--max-memory", "100GB"]) == 0
    saved = SuperMergeConfig.from_pretrained(tmp_path / "out")
    hierarchical = HierarchicalConfig(**mode["hierarchical"]) if "hierarchical" in mode else None
    assert (saved.streaming, saved.hierarchical) == (mode.get("streaming", False), hierarchical)
    assert (tmp_path / "out" / "hierarchy.json").is_file() == ("hierarchical" in mode)
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model(torch.tensor([[2, 5, 6, 3]])).last_hidden_state.shape == (1, 4, 32)
