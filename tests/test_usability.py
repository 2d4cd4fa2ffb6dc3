"""What Hugging Face and mergekit users expect (issue 17): saved dtype, tokenizer and chat template sources, cards
and configs without local paths, the CLI's help, version and overrides, one log line per event."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from supermerge_hf import SuperMergeConfig, SuperMerger

from .conftest import VOCAB, family_examples, lm_examples, perturb
from .hub_server import hub_server_fixture  # noqa: F401 (the fixture `hub_server`)
from .test_lora import bert_adapters  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A bfloat16 Llama base and two bfloat16 fine-tunes."""
    root = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "base")
    sources = {}
    for i, task in enumerate(["code", "math"]):
        model = perturb(LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32), seed=i)
        model.to(torch.bfloat16).save_pretrained(root / task)
        sources[task] = root / task
    return root / "base", sources


def saved_dtypes(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize(("method", "dtype", "expected"), [
    ("task_arithmetic", "auto", "BF16"), ("supermerge", "auto", "BF16"), ("task_arithmetic", "float32", "F32")])
def test_saved_dtype_follows_the_sources_unless_asked(bf16_llama, tmp_path, method, dtype, expected):
    base, sources = bf16_llama
    config = SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                              method=method, dtype=dtype, steps=2, eval_every=1, examples_per_task=8, batch_size=4)
    merger = SuperMerger(config).fit({t: lm_examples(8, seed=i) for i, t in enumerate(sources)})
    assert merger.dtype == torch.float32 if dtype == "auto" else merger.dtype == getattr(torch, dtype)
    out = Path(merger.save_pretrained(tmp_path / "merged"))
    assert saved_dtypes(out) == {expected}
    assert json.loads((out / "config.json").read_text())["dtype"] == {"BF16": "bfloat16", "F32": "float32"}[expected]
    assert merger.merge_and_unload().dtype == {"BF16": torch.bfloat16, "F32": torch.float32}[expected]


def text_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*")
            if p.is_file() and p.suffix in {".json", ".md", ".yaml", ".txt", ".jinja", ""}}


def absolute_paths_in(folder: Path, roots: list[Path]) -> dict[str, list[str]]:
    found = {}
    for name, text in text_files(folder).items():
        hits = [str(r) for r in roots if str(r) in text]
        if hits:
            found[name] = hits
    return found


@pytest.fixture(scope="module")
def lora_fitted(bert_family, bert_adapters):
    """A SuperMerge of two LoRA adapters of the tiny BERT, learned for 2 steps."""
    adapters = bert_adapters
    config = SuperMergeConfig(base=str(bert_family.base), steps=2, eval_every=1, examples_per_task=8, batch_size=4,
                              sources=[{"task": t, "path": str(p)} for t, p in adapters.items()])
    return SuperMerger(config).fit(family_examples(bert_family, 8))


def test_no_absolute_path_in_any_saved_file(lora_fitted, bert_family, tmp_path):
    import sys

    roots = [bert_family.base.parent, Path(sys.prefix), Path.home(), tmp_path]
    merged = Path(lora_fitted.save_pretrained(tmp_path / "out" / "merged"))
    adapter = Path(lora_fitted.save_adapter(tmp_path / "out" / "adapter"))
    for folder in (merged, adapter):
        assert text_files(folder)
        assert absolute_paths_in(folder, roots) == {}
    saved = json.loads((merged / "supermerge_config.json").read_text())
    assert saved["base"].startswith("../") and saved["output_dir"] is None
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == saved["base"]
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card and "sst" in card
    # the relative paths reload the merge from anywhere
    reloaded = SuperMerger.from_pretrained(merged)
    for name, tensor in lora_fitted.merged_tensors.items():
        assert torch.equal(reloaded.merged_tensors[name], tensor), name


def test_card_loads_with_the_architecture_auto_class(bf16_llama, tmp_path):
    base, sources = bf16_llama
    config = SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                              method="task_arithmetic")
    merger = SuperMerger(config).fit()
    card = (Path(merger.save_pretrained(tmp_path / "merged")) / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("merged")' in card


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A Llama base whose tokenizer has no chat template; fine-tune `chat` ships one and its generation config;
    fine-tune `big` has a tokenizer with more tokens than the embedding has rows."""
    from transformers import GenerationConfig

    from .conftest import tiny_tokenizer

    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    sources = {}
    for i, task in enumerate(["chat", "big"]):
        perturb(LlamaForCausalLM.from_pretrained(root / "base"), seed=i).save_pretrained(root / task)
        tokenizer = tiny_tokenizer()
        if task == "chat":
            tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            GenerationConfig(max_new_tokens=7, do_sample=False).save_pretrained(root / task)
        else:
            tokenizer.add_tokens([f"new{k}" for k in range(VOCAB)])
        tokenizer.save_pretrained(root / task)
        sources[task] = root / task
    return root / "base", sources


def merge_chat(chat_llama, tmp_path, **options) -> Path:
    base, sources = chat_llama
    config = SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                              method="task_arithmetic", **options)
    return Path(SuperMerger(config).fit().save_pretrained(tmp_path / "merged"))


MESSAGES = [{"role": "user", "content": "good movie"}]


def test_tokenizer_and_generation_config_from_the_base_by_default(chat_llama, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = merge_chat(chat_llama, tmp_path)
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    assert GenerationConfig.from_pretrained(out).max_new_tokens != 7


def test_tokenizer_source_takes_a_fine_tunes_tokenizer_template_and_generation_config(chat_llama, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = merge_chat(chat_llama, tmp_path, tokenizer_source="chat")
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False) == "<user>good movie"
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7


@pytest.mark.parametrize(("template", "expected"), [
    ("chat", "<user>good movie"), ("chatml", "<|im_start|>user\ngood movie<|im_end|>\n"),
    ("{{ messages[0]['content'] }}!", "good movie!")])
def test_chat_template_from_a_source_by_name_or_as_text(chat_llama, tmp_path, template, expected):
    from transformers import AutoTokenizer

    out = merge_chat(chat_llama, tmp_path, chat_template=template)
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False) == expected


def test_chat_template_from_a_jinja_file(chat_llama, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "t.jinja").write_text("[{{ messages[0]['content'] }}]")
    out = merge_chat(chat_llama, tmp_path, chat_template=str(tmp_path / "t.jinja"))
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(MESSAGES, tokenize=False) == "[good movie]"
    saved = json.loads((out / "supermerge_config.json").read_text())  # the template's text, not this machine's path
    assert saved["chat_template"] == "[{{ messages[0]['content'] }}]"


@pytest.mark.parametrize(("options", "match"), [
    ({"chat_template": "nonsense"}, "neither a built-in"), ({"chat_template": "base"}, "no \\(single\\) chat template"),
    ({"tokenizer_source": "big"}, "92 tokens but .*embedding has 64 rows"),
    ({"tokenizer_source": "other"}, "must be `base` or a task")])
def test_bad_tokenizer_options_are_refused_before_merging(chat_llama, tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        merge_chat(chat_llama, tmp_path, **options)
    assert not (tmp_path / "merged").exists()


def test_examples_run_as_shipped(tmp_path):
    """`examples/` copied elsewhere: build its inputs, run the recipe with the CLI, run the Python quickstart."""
    import shutil
    import subprocess
    import sys

    examples = tmp_path / "examples"
    shutil.copytree(Path(__file__).parents[1] / "examples", examples,
                    ignore=shutil.ignore_patterns("models", "data", "merged*"))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "supermerge_hf.cli", "merge"]
    for cmd in ([sys.executable, examples / "build_tiny_inputs.py"],
                [*cli, examples / "recipe.yaml", "--steps", "3"],
                [*cli, examples / "llm_recipe.yaml", "--steps", "3", "--adapter-output", examples / "llm-adapter"],
                [sys.executable, examples / "quickstart.py"]):
        proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (examples / "merged" / "model.safetensors").is_file()
    assert (examples / "merged-python" / "heads" / "nli" / "head.safetensors").is_file()
    assert "Saved to" in proc.stdout
    # the LLM recipe: the combined LoRA adapter on the base is the dense merge, generations included
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(examples / "llm-merged").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(examples / "models" / "llm"),
                                        examples / "llm-adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(examples / "llm-merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the movie"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(adapter(**prompt).logits, dense(**prompt).logits, rtol=1e-5, atol=1e-5)
        greedy = {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(adapter.generate(**prompt, **greedy), dense.generate(**prompt, **greedy))


def test_pushed_merge_of_local_sources_publishes_no_path(hub_server, bert_family, tmp_path):
    from huggingface_hub import ModelCard

    from supermerge_hf import load_task_model

    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), steps=2, eval_every=1)
    merger = SuperMerger(config, endpoint=hub_server.url).fit(family_examples(bert_family, 8))
    oid = merger.push_to_hub("user/local-merge", token=False)
    files = hub_server.repos["user/local-merge"].commits[oid].files
    text = {name: data.decode() for name, data in files.items() if name.endswith((".json", ".md"))}
    assert not [name for name, t in text.items() if str(bert_family.base.parent) in t or "../" in t]
    saved = json.loads(text["supermerge_config.json"])
    assert saved["base"] == saved["sources"][0]["path"] == "<local folder, not published>"
    card = ModelCard(text["README.md"])
    assert 'AutoModel.from_pretrained("user/local-merge")' in card.text
    assert 'load_task_model("user/local-merge", "sst")' in card.text
    assert "a local folder (not published)" in card.text
    # the heads load from the Hub repo id (the test double), as `from_pretrained` does
    sst = load_task_model("user/local-merge", "sst", revision=oid, token=False)
    assert torch.equal(sst.classifier.weight, merger.result.heads["sst"]["classifier.weight"])  # refit (default)
    with pytest.raises(FileNotFoundError, match="not published"):
        SuperMerger.from_pretrained("user/local-merge", token=False)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from supermerge_hf.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_version_and_verbose_after_the_subcommand(capsys):
    from importlib.metadata import version

    from supermerge_hf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"supermerge {version('supermerge_hf')}"
    assert build_parser().parse_args(["methods", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "methods"]).verbose is True
    assert build_parser().parse_args(["methods"]).verbose is False


def test_merge_help_lists_every_recipe_field_and_method(capsys):
    import dataclasses

    from supermerge_hf import METHODS
    from supermerge_hf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(SuperMergeConfig):
        assert f"    {f.name} (`" in text, f.name
    assert all(name in text for name in METHODS)
    for flag in ("--dtype", "--max-shard-size", "--device"):
        assert flag in text


def write_recipe(family, folder: Path, data: bool = True, **extra) -> Path:
    import yaml

    from .conftest import write_text_examples

    sources = []
    for i, (task, path) in enumerate(family.sources.items()):
        if data:
            write_text_examples(folder / f"{task}.jsonl", 12, family.num_labels[task], seed=i)
        sources.append({"task": task, "path": str(path), "data": {"path": f"{task}.jsonl"}})
    recipe = {"base": str(family.base), "sources": sources, "steps": 2, "batch_size": 4} | extra
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def test_estimate_needs_no_data_files(bert_family, tmp_path, capsys):
    code, out, err = run_cli(["estimate", str(write_recipe(bert_family, tmp_path, data=False))], capsys)
    assert code == 0, err
    assert "streaming" in out


def test_cli_dtype_and_shard_size_override_the_recipe(bert_family, tmp_path, capsys):
    recipe = write_recipe(bert_family, tmp_path, method="task_arithmetic")
    code, _, err = run_cli(["merge", str(recipe), "--output", str(tmp_path / "m"), "--dtype", "bfloat16",
                            "--max-shard-size", "20KB", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()  # sharded at 20KB


@pytest.mark.parametrize(("method", "parameters", "expected"), [
    ("task_arithmetic", [{"weight": 0.5}, {"parameters": {"weight": 2.0}}], {"weights": [0.5, 2.0]}),
    ("ties", [{"density": 0.4, "weight": 1.0}, {"density": 0.4}], {"density": 0.4, "weights": [1.0, 1.0]})])
def test_mergekit_style_per_source_weight_and_density(bert_family, tmp_path, method, parameters, expected):
    import yaml

    from supermerge_hf.cli import read_recipe

    recipe = yaml.safe_load(write_recipe(bert_family, tmp_path, method=method).read_text())
    for source, extra in zip(recipe["sources"], parameters):
        source.update(extra)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    config, _ = read_recipe(tmp_path / "recipe.yaml")
    assert {k: config.method_kwargs[k] for k in expected} == expected


@pytest.mark.parametrize(("method", "parameters", "match"), [
    ("supermerge", [{"weight": 0.5}, {}], "Per-source `weight` is read by methods with a `weights`"),
    ("ties", [{"density": 0.4}, {"density": 0.5}], "Per-source densities \\[0.4, 0.5\\] differ")])
def test_per_source_parameters_a_method_cannot_take_are_refused(bert_family, tmp_path, capsys, method, parameters,
                                                                  match):
    import re

    import yaml

    recipe = yaml.safe_load(write_recipe(bert_family, tmp_path, method=method).read_text())
    for source, extra in zip(recipe["sources"], parameters):
        source.update(extra)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["merge", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and re.search(match, err), err


def test_debug_log_of_step_zero_says_before_learning(bert_family, caplog):
    import logging

    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), steps=1, eval_every=1,
                              examples_per_task=8, batch_size=4)
    with caplog.at_level(logging.DEBUG, logger="supermerge_hf"):
        SuperMerger(config).fit(family_examples(bert_family, 8))
    assert "step 0: before learning, hold-out loss {" in caplog.text and "None" not in caplog.text.split("step 0")[1][:40]


def test_relative_paths_survive_a_symlinked_output(bert_family, tmp_path):
    real = tmp_path / "a" / "b" / "c"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), method="task_arithmetic")
    merger = SuperMerger(config).fit()
    merger.save_pretrained(tmp_path / "link" / "merged")
    reloaded = SuperMerger.from_pretrained(tmp_path / "link" / "merged")
    assert all(torch.equal(reloaded.merged_tensors[n], t) for n, t in merger.merged_tensors.items())


def test_kept_examples_stay_local_when_pushed(hub_server, bert_family, tmp_path):
    config = SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), steps=1, eval_every=1,
                              save_examples=True)
    merger = SuperMerger(config, endpoint=hub_server.url).fit(family_examples(bert_family, 8))
    local = Path(merger.save_pretrained(tmp_path / "local"))
    assert sorted(p.name for p in (local / "examples").iterdir()) == ["nli.jsonl", "sst.jsonl"]
    oid = merger.push_to_hub("user/private-examples", token=False)
    assert not [f for f in hub_server.repos["user/private-examples"].commits[oid].files if f.startswith("examples")]


@pytest.mark.parametrize(("objective", "refit_heads", "code"), [("distill", 200, 0), ("labels", 0, 2)])
def test_recipe_unlabelled_entries_reach_learning(bert_family, tmp_path, capsys, objective, refit_heads, code):
    import yaml

    from .conftest import write_text_examples

    recipe = yaml.safe_load(write_recipe(bert_family, tmp_path, method_kwargs={"objective": objective,
                                                                                "refit_heads": refit_heads}).read_text())
    for i, source in enumerate(recipe["sources"]):
        write_text_examples(tmp_path / f"{source['task']}-more.jsonl", 10, 2, seed=10 + i)
        source["unlabelled"] = {"path": f"{source['task']}-more.jsonl"}  # its labels are never read
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    status, _, err = run_cli(["merge", str(tmp_path / "recipe.yaml"), "--output", str(tmp_path / "m")], capsys)
    assert status == code, err
    if code:  # the paper's objective would ignore them: refused before learning, nothing written
        assert "unlabelled" in err.lower() and not (tmp_path / "m").exists()
