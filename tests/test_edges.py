"""The edges the redesign closed (review section 3): each test failed before it."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    CLIPConfig,
    CLIPModel,
    T5Config,
    T5ForConditionalGeneration,
)

from supermerge_hf import Coefficients, SuperMergeConfig, SuperMerger
from supermerge_hf import hierarchy as hierarchy_module
from supermerge_hf.checkpoint import Checkpoint

from .conftest import BERT_CONFIG, OVER_TASK_VECTORS, classification_examples, family_examples, perturb

SEQ_CLS = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}


def config(base, sources: dict, **kwargs) -> SuperMergeConfig:
    kwargs = {"steps": 2, "eval_every": 1, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0} | kwargs
    return SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                            **kwargs)


def lora_adapter(base, out, *, seed: int, num_labels: int | None = None, **lora):
    torch.manual_seed(seed)
    model = (BertForSequenceClassification.from_pretrained(base, num_labels=num_labels) if num_labels
             else AutoModelForCausalLM.from_pretrained(base))
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    return out


# ---------------------------------------------------------------- hierarchical


def test_hierarchical_levels_share_one_split_and_report_the_real_finetunes(llama_family, monkeypatch):
    seen = []
    learn = hierarchy_module.learn
    monkeypatch.setattr(hierarchy_module, "learn",
                        lambda plan, cfg, method, splits, *a, **k: seen.append(splits) or learn(plan, cfg, method,
                                                                                             splits, *a, **k))
    examples = family_examples(llama_family, n=12)
    options = {"group_size": 2, "grouping": "explicit", "groups": [["code"], ["math", "chat"]]}
    hier = SuperMerger(config(llama_family.base, llama_family.sources, holdout_fraction=0.25,
                              hierarchical=options)).fit(examples)
    flat = SuperMerger(config(llama_family.base, llama_family.sources, holdout_fraction=0.25)).fit(examples)
    assert [sorted(s) for s in seen] == [["chat", "math"], ["chat", "code", "math"]]
    for task in ("math", "chat"):  # the same examples held out at both levels
        assert seen[0][task][1] is seen[1][task][1] and seen[0][task][0] is seen[1][task][0]
    for task in llama_family.sources:  # a task's "fine-tune" numbers are its own source's, as in the flat merge
        assert hier.metrics[task]["finetune"] == flat.metrics[task]["finetune"]


def test_hierarchical_merge_rebuilds_from_its_saved_files(llama_family, tmp_path):
    options = {"group_size": 2, "grouping": "explicit", "groups": [["code", "chat"], ["math"]]}
    merger = SuperMerger(config(llama_family.base, llama_family.sources, hierarchical=options))
    out = merger.fit(family_examples(llama_family)).save_pretrained(tmp_path / "merged")
    levels = json.loads((tmp_path / "merged" / "hierarchy.json").read_text())
    assert [lvl["group"] for lvl in levels] == [["code", "chat"], ["(code+chat)", "math"]]
    rebuilt = SuperMerger.from_pretrained(out)
    saved = {k.removeprefix("model."): v for k, v in load_file(tmp_path / "merged" / "model.safetensors").items()}
    assert rebuilt.merged_tensors.keys() == merger.merged_tensors.keys()
    for name, tensor in rebuilt.merged_tensors.items():
        assert torch.equal(tensor, saved[name]), name


def test_combined_adapter_of_a_hierarchical_merge_is_refused_before_writing(llama_family, tmp_path):
    adapters = {t: lora_adapter(llama_family.base, tmp_path / t, seed=i, r=2, target_modules=["q_proj", "v_proj"],
                                task_type="CAUSAL_LM") for i, t in enumerate(llama_family.sources)}
    options = {"group_size": 2, "grouping": "explicit", "groups": [["code", "math"], ["chat"]]}
    merger = SuperMerger(config(llama_family.base, adapters, hierarchical=options)).fit(family_examples(llama_family))
    with pytest.raises(ValueError, match="hierarchical"):
        merger.save_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.fixture(scope="module")
def bert_mixed(bert_family, tmp_path_factory):
    """Beside the bare BERT base: a token classifier (no pooler), a sequence classifier, a SEQ_CLS LoRA adapter."""
    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(3)
    perturb(BertForTokenClassification.from_pretrained(bert_family.base, num_labels=4), 3).save_pretrained(root / "ner")
    lora_adapter(bert_family.base, root / "nli", seed=4, num_labels=3, r=2, target_modules=["query"], **SEQ_CLS)
    return {"ner": root / "ner", "sst": bert_family.sources["sst"], "nli": root / "nli"}


def test_a_tensor_missing_from_one_member_is_task_specific_at_every_level(bert_family, bert_mixed):
    examples = {"ner": [{"input_ids": ex["input_ids"], "labels": [ex["labels"]] * len(ex["input_ids"])}
                        for ex in classification_examples(4, 8, seed=0)],
                "sst": classification_examples(2, 8, seed=1), "nli": classification_examples(3, 8, seed=2)}
    options = {"group_size": 2, "grouping": "explicit", "groups": [["ner", "sst"], ["nli"]]}
    flat = SuperMerger(config(bert_family.base, bert_mixed))
    hier = SuperMerger(config(bert_family.base, bert_mixed, hierarchical=options)).fit(examples)
    assert "pooler.dense.weight" not in flat.plan.merged
    assert set(hier.merged_tensors) == set(flat.plan.merged)  # no level merges the pooler
    assert "pooler.dense.weight" in flat.plan.task_specific["nli"]


def test_lora_source_beside_a_finetune_without_pooler_keeps_the_base_pooler(bert_family, bert_mixed, tmp_path):
    sources = {"ner": bert_mixed["ner"], "nli": bert_mixed["nli"]}
    examples = {"ner": [{"input_ids": ex["input_ids"], "labels": [ex["labels"]] * len(ex["input_ids"])}
                        for ex in classification_examples(4, 8, seed=0)], "nli": classification_examples(3, 8, seed=2)}
    merger = SuperMerger(config(bert_family.base, sources)).fit(examples)
    merger.save_pretrained(tmp_path / "merged")
    head = load_file(tmp_path / "merged" / "heads" / "nli" / "head.safetensors")
    base = load_file(bert_family.base / "model.safetensors")
    assert torch.equal(head["bert.pooler.dense.weight"], base["pooler.dense.weight"])


# ---------------------------------------------------------------- sources and plans


def test_zero_dim_parameters_are_read_and_merged(tmp_path):
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(tmp_path / "base")
    for i, task in enumerate(["a", "b"]):
        perturb(CLIPModel.from_pretrained(tmp_path / "base"), i).save_pretrained(tmp_path / task)
    assert Checkpoint(tmp_path / "a").read_tensor("logit_scale").shape == ()
    merger = SuperMerger(config(tmp_path / "base", {"a": tmp_path / "a", "b": tmp_path / "b"},
                                method="task_arithmetic", method_kwargs={"lam": 0.5})).fit()
    scale = {t: load_file(tmp_path / t / "model.safetensors")["logit_scale"] for t in ("base", "a", "b")}
    expected = scale["base"] + 0.5 * (scale["a"] - scale["base"] + scale["b"] - scale["base"])
    torch.testing.assert_close(merger.merged_tensors["logit_scale"], expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "average"])
def test_streaming_with_full_and_lora_sources_equals_flat(bert_family, bert_mixed, method):
    sources = {"sst": bert_mixed["sst"], "nli": bert_mixed["nli"]}
    flat = SuperMerger(config(bert_family.base, sources, method=method)).fit()
    streamed = SuperMerger(config(bert_family.base, sources, method=method, streaming=True)).fit()
    for name, tensor in flat.merged_tensors.items():
        torch.testing.assert_close(streamed.merged_tensors[name], tensor, rtol=1e-6, atol=1e-6)


def test_base_classifier_with_another_label_count_keeps_heads_task_specific(bert_family, tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**BERT_CONFIG, num_labels=2)).save_pretrained(tmp_path / "base")
    for i, (task, k) in enumerate({"sst": 2, "nli": 3}.items()):
        model = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=k,
                                                              ignore_mismatched_sizes=True)
        perturb(model, i).save_pretrained(tmp_path / task)
    merger = SuperMerger(config(tmp_path / "base", {"sst": tmp_path / "sst", "nli": tmp_path / "nli"}))
    assert {"classifier.weight", "classifier.bias"} <= set(merger.plan.task_specific["nli"])
    assert "classifier.weight" not in merger.plan.merged


def test_block_granularity_gives_each_encoder_and_decoder_block_a_group(tmp_path):
    torch.manual_seed(0)
    t5 = T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=64, decoder_start_token_id=0)
    T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "base")
    perturb(T5ForConditionalGeneration.from_pretrained(tmp_path / "base"), 0).save_pretrained(tmp_path / "a")
    merger = SuperMerger(config(tmp_path / "base", {"a": tmp_path / "a"}, granularity="block"))
    blocks = [g for g in merger.plan.groups if ".block." in g]
    assert blocks == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_trust_remote_code_is_no_longer_a_silent_option(bert_family):
    with pytest.raises(ValueError, match="trust_remote_code"):
        SuperMergeConfig.from_dict({"base": str(bert_family.base), "sources": bert_family.source_list(),
                                    "trust_remote_code": True})


# ---------------------------------------------------------------- provenance


def test_auto_choices_are_saved_and_rebuild_the_merge(bert_family, tmp_path):
    examples = family_examples(bert_family, n=8)
    merger = SuperMerger(config(bert_family.base, bert_family.sources, method="ties", output_dir=str(tmp_path / "m"),
                                method_kwargs={"lam": "auto", "density": 0.5})).fit(examples)
    out = merger.save_pretrained()
    info = json.loads((tmp_path / "m" / "supermerge_config.json").read_text())["merge_info"]
    assert info["chosen"] == merger.chosen and set(merger.chosen) == {"lam", "density"}
    assert f"`lam` = {merger.chosen['lam']}" in (tmp_path / "m" / "README.md").read_text()
    rebuilt = SuperMerger.from_pretrained(out)
    for name, tensor in merger.merged_tensors.items():
        assert torch.equal(rebuilt.merged_tensors[name], tensor), name


def test_apply_coefficients_matches_rows_by_name_and_checks_the_range(bert_family):
    merger = SuperMerger(config(bert_family.base, bert_family.sources, method_kwargs=OVER_TASK_VECTORS))
    groups = merger.plan.groups
    values = torch.stack([torch.full((len(groups),), 0.1), torch.full((len(groups),), 0.6)])
    merger.apply_coefficients(Coefficients.from_values(["nli", "sst"], groups, values, "tanh"))
    assert merger.coefficients.sources == ["sst", "nli"]
    assert torch.equal(merger.coefficients.values, values.flip(0))
    with pytest.raises(ValueError, match=r"inside \(-1, 1\)"):
        Coefficients.from_values(["sst", "nli"], groups, torch.full((2, len(groups)), 1.5), "tanh")
    with pytest.raises(ValueError, match="another merge"):
        merger.apply_coefficients(Coefficients.from_values(["a", "b"], groups, values, "tanh"))


def test_saved_config_says_what_ran(bert_family, tmp_path):
    examples = family_examples(bert_family, n=8)
    merger = SuperMerger(config(bert_family.base, bert_family.sources, method="adamerging_plus",
                                method_kwargs={"density": 0.9})).fit(examples)
    merger.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "supermerge_config.json").read_text())
    assert saved["transform"] == "none" and saved["method_kwargs"] == {"density": 0.9}
    assert json.loads((tmp_path / "merged" / "coefficients.json").read_text())["transform"] == "none"
    assert float(merger.coefficients.values.min()) >= 0.0 and float(merger.coefficients.values.max()) <= 1.0
    with pytest.raises(ValueError, match="method_kwargs.*densty"):
        config(bert_family.base, bert_family.sources, method="ties", method_kwargs={"densty": 0.5})
    with pytest.raises(ValueError, match="not hyperparameters of 'supermerge'"):
        config(bert_family.base, bert_family.sources, method_kwargs={"lam": 0.5})
    with pytest.raises(ValueError, match="normalized"):
        config(bert_family.base, bert_family.sources, method="adamerging", loss_combination="normalized")


def test_nan_in_a_source_is_never_saved(bert_family, tmp_path):
    state = load_file(bert_family.sources["sst"] / "model.safetensors")
    state["bert.pooler.dense.bias"][0] = float("nan")
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((bert_family.sources["sst"] / "config.json").read_text())
    merger = SuperMerger(config(bert_family.base, {"sst": tmp_path / "bad", "nli": bert_family.sources["nli"]},
                                method="task_arithmetic"))
    with pytest.raises(FloatingPointError, match="pooler.dense.bias"):
        merger.fit()


def test_causal_lm_examples_of_different_lengths(llama_family):
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(4, 12, (10,), generator=g)]
    examples = {t: [{"input_ids": (ids := torch.randint(1, 64, (n,), generator=g)), "labels": ids.clone()}
                    for n in lengths] for t in llama_family.sources}
    merger = SuperMerger(config(llama_family.base, llama_family.sources, holdout_fraction=0.3)).fit(examples)
    assert merger.history[0]["holdout"] is not None and set(merger.metrics) == set(llama_family.sources)
    metrics = merger.evaluate(examples)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics.values())


def test_config_fields_are_typed(bert_family):
    recipe = {"base": str(bert_family.base), "sources": bert_family.source_list()}
    with pytest.raises(ValueError, match="`streaming` must be true or false, got 'false'"):
        SuperMergeConfig.from_dict(recipe | {"streaming": "false"})
    with pytest.raises(ValueError, match="`steps` must be an integer, got True"):
        SuperMergeConfig.from_dict(recipe | {"steps": True})
    assert SuperMergeConfig.from_dict(recipe | {"learning_rate": "1e-3"}).learning_rate == 1e-3
    with pytest.raises(ValueError, match="`sources` must be a list"):
        SuperMergeConfig.from_dict(recipe | {"sources": {"sst": str(bert_family.sources["sst"])}})
    with pytest.raises(ValueError, match="a mapping of fields"):
        SuperMergeConfig.from_dict([recipe])
    with pytest.raises(ValueError, match="`method_kwargs` must be a mapping"):
        SuperMergeConfig.from_dict(recipe | {"method": "ties", "method_kwargs": "x"})


def test_an_output_path_that_is_a_file_is_refused_before_learning(bert_family, tmp_path):
    (tmp_path / "merged").write_text("not a folder")
    merger = SuperMerger(config(bert_family.base, bert_family.sources, output_dir=str(tmp_path / "merged")))
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        merger.fit(family_examples(bert_family, n=4))


def test_output_folder_takes_its_parent_folders_mode(bert_family, tmp_path):
    (tmp_path / "out").mkdir(mode=0o755)
    (tmp_path / "out").chmod(0o755)
    merger = SuperMerger(config(bert_family.base, bert_family.sources, method="task_arithmetic")).fit()
    merger.save_pretrained(tmp_path / "out" / "merged")
    assert (tmp_path / "out" / "merged").stat().st_mode & 0o777 == 0o755


def test_cli_version(capsys):
    from importlib.metadata import version

    from supermerge_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"supermerge {version('supermerge_hf')}"
