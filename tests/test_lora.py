"""LoRA adapters as sources: PEFT's own delta, the exact combined adapter, the LoRA-space gradient, mixed sources,
clear refusals, data-free methods and the CLI (method.md section 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
)

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.cli import main
from supermerge_hf.data import as_examples
from supermerge_hf.demo.finetune import finetune_lora_classifier
from supermerge_hf.demo.tasks import TaskData
from supermerge_hf.export import combined_factors
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.methods import task_arithmetic, ties
from supermerge_hf.results import Coefficients
from supermerge_hf.lora import LoraSpec
from supermerge_hf.sources import IncompatibleSourceError, ModelSpec
from tests.hub_server import hub_server_fixture  # noqa: F401  (fixture `hub_server`)

from .conftest import (BERT_CONFIG, OVER_TASK_VECTORS, classification_examples, coefficient, family_examples,
                       write_text_examples)

SEQ_CLS = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
CAUSAL_LM = {"task_type": "CAUSAL_LM"}
LABELS = {"sst": 2, "nli": 3}


def make_adapter(base: Path, out: Path, *, seed: int, num_labels: int | None = None, **lora) -> PeftModel:
    """A LoRA adapter of `base` with random A and B (`init_lora_weights=False`), saved to `out`."""
    torch.manual_seed(seed)
    if num_labels is not None:
        model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out)
    return peft_model


def lora_layers(peft_model: PeftModel) -> dict[str, torch.nn.Module]:
    """The model's LoRA layers by module path in the task model (`bert.encoder.layer.0.attention.self.query`)."""
    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if "default" in getattr(m, "lora_A", {}) or "default" in getattr(m, "lora_embedding_A", {})}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def config(base: Path, sources: dict[str, Path], **kwargs) -> SuperMergeConfig:
    """SuperMerge over the task vectors with the fine-tunes' heads (what the exactness tests compare) unless `kwargs`
    name another method."""
    kwargs = {"steps": 3, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0} | kwargs
    if kwargs.get("method", "supermerge") == "supermerge":
        kwargs["method_kwargs"] = OVER_TASK_VECTORS | kwargs.get("method_kwargs", {})
    return SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                            **kwargs)


def table(merger: SuperMerger, values: torch.Tensor) -> Coefficients:
    """A coefficient table of `values` `(S, G)` for this merger's sources and groups."""
    return Coefficients.from_values(merger.plan.source_names, merger.plan.groups, values, merger.config.transform)


def functional(merger: SuperMerger) -> FunctionalMerge:
    """The merged model of a merger's plan as a function of the coefficients (float32, in memory)."""
    return FunctionalMerge(merger.plan, dtype=torch.float32)


def bert_examples(n: int = 8) -> dict[str, list[dict]]:
    return {t: classification_examples(k, n, seed=i) for i, (t, k) in enumerate(LABELS.items())}


@pytest.fixture(scope="module")
def bert_adapters(bert_family, tmp_path_factory) -> dict[str, Path]:
    """Two SEQ_CLS adapters of the bare BERT base: heads of 2 and 3 labels, other ranks, patterns, rsLoRA."""
    root = tmp_path_factory.mktemp("bert_lora")
    make_adapter(bert_family.base, root / "sst", seed=1, num_labels=2, r=4, lora_alpha=8,
                 target_modules=["query", "value", "dense"], rank_pattern={"layer.0.attention.self.query": 2},
                 alpha_pattern={"value": 3}, **SEQ_CLS)
    make_adapter(bert_family.base, root / "nli", seed=2, num_labels=3, r=6, lora_alpha=4, use_rslora=True,
                 target_modules=["query", "key"], **SEQ_CLS)
    return {"sst": root / "sst", "nli": root / "nli"}


@pytest.fixture(scope="module")
def bert_dense(bert_family, bert_adapters, tmp_path_factory) -> dict[str, Path]:
    """The same adapters densified by PEFT into full checkpoints (trained classifier heads included)."""
    root = tmp_path_factory.mktemp("bert_dense")
    for task, adapter in bert_adapters.items():
        model = BertForSequenceClassification.from_pretrained(bert_family.base, num_labels=LABELS[task])
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        saved = load_file(adapter / "adapter_model.safetensors")
        assert torch.equal(merged.classifier.weight, saved["base_model.model.classifier.weight"]), "head lost"
        merged.save_pretrained(root / task)
    return {t: root / t for t in bert_adapters}


# ---------------------------------------------------------------- the delta is PEFT's
VARIANTS = {
    "plain": ("bert_family", dict(r=4, lora_alpha=8, target_modules=["query", "value"], **SEQ_CLS)),
    "rank_and_alpha_pattern": ("bert_family", dict(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
        rank_pattern={"layer.0.attention.self.query": 2, "output.dense": 6},
        alpha_pattern={"value": 3, "layer.1.attention.self.query": 20}, **SEQ_CLS)),
    "rslora": ("bert_family", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "key"], **SEQ_CLS)),
    "embedding": ("bert_family", dict(r=3, lora_alpha=6, target_modules=["word_embeddings", "query"], **SEQ_CLS)),
    "fan_in_fan_out": ("gpt2_family", dict(r=3, lora_alpha=5, fan_in_fan_out=True,  # c_proj (attn) is square
                                           target_modules=["c_attn", "c_proj", "c_fc"], **CAUSAL_LM)),
    "llama": ("llama_family", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], **CAUSAL_LM)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_delta_equals_peft(variant, request, tmp_path):
    family_name, lora = VARIANTS[variant]
    family = request.getfixturevalue(family_name)
    num_labels = 2 if lora["task_type"] == "SEQ_CLS" else None
    peft_model = make_adapter(family.base, tmp_path / "adapter", seed=3, num_labels=num_labels, **lora)
    if variant == "fan_in_fan_out":  # PEFT orients each layer by its type; the saved flag is the last layer's
        saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved | {"fan_in_fan_out": False}))
    base = ModelSpec.from_folder(family.base)
    spec = LoraSpec(tmp_path / "adapter", base)
    canonical = {model_name: name for name, model_name in spec.param_names.items()}
    layers = lora_layers(peft_model)
    assert len(layers) == len(spec.factors) > 0
    ranks = set()
    for module, layer in layers.items():
        name = canonical[module + ".weight"]
        delta = spec.delta(name, base.read_tensor(name))
        torch.testing.assert_close(delta.dense(), layer.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
        ranks.add(delta.A.shape[0])
    if variant == "rank_and_alpha_pattern":
        assert ranks == {2, 4, 6}


# ---------------------------------------------------------------- the combined adapter is the dense merge
def saved_adapter_and_merge(merger: SuperMerger, base: Path, tmp_path: Path):
    """Save the dense merge and the combined adapter; the adapter's body output on random ids equals the merge's.
    Returns the PEFT model, the merged body's output and the ids."""
    merger.save_pretrained(tmp_path / "merged")
    merger.save_adapter(tmp_path / "adapter")
    x = torch.randint(1, 64, (3, 7))
    expected = AutoModel.from_pretrained(tmp_path / "merged")(x).last_hidden_state
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "adapter")
    assert relative_error(peft_model(x).last_hidden_state, expected) < 1e-5
    return peft_model, expected, x


def test_combined_adapter_equals_dense_merge_bert(bert_family, bert_adapters, tmp_path):
    merger = SuperMerger(config(bert_family.base, bert_adapters)).fit(bert_examples())
    c = merger.coefficients.values
    assert not torch.equal(c, torch.full_like(c, 0.3)), "the coefficients should have moved"
    peft_model, expected, x = saved_adapter_and_merge(merger, bert_family.base, tmp_path)
    assert relative_error(expected, AutoModel.from_pretrained(bert_family.base)(x).last_hidden_state) > 1e-2

    # rank of each module = sum of the source ranks that target it, in the config and as PEFT reads it
    expected_ranks: dict[str, int] = {}
    for source in merger.plan.sources:
        for weight, (a_key, *_) in source.factors.items():
            module = merger.plan.base.param_names[weight].removesuffix(".weight")
            expected_ranks[module] = expected_ranks.get(module, 0) + source.checkpoint.shape(a_key)[0]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(expected_ranks)
    assert {m: saved["rank_pattern"].get(m, saved["r"]) for m in expected_ranks} == expected_ranks
    assert {m: layer.r["default"] for m, layer in lora_layers(peft_model).items()} == expected_ranks
    assert expected_ranks["encoder.layer.0.attention.self.query"] == 2 + 6  # rank_pattern + the other source

    # heads stay per task in the dense merge
    for task, adapter in bert_adapters.items():
        head = load_file(adapter / "adapter_model.safetensors")["base_model.model.classifier.weight"]
        assert torch.equal(load_task_model(tmp_path / "merged", task).classifier.weight, head)


def test_default_on_adapters_learns_over_task_vectors_and_exports_the_adapter(bert_family, bert_adapters, tmp_path):
    """`start: auto` is `constant` for adapter sources: the combined adapter stays exact; the refit heads (the
    default) stay per task in the dense merge."""
    sources = [{"task": t, "path": str(p)} for t, p in bert_adapters.items()]
    merger = SuperMerger(SuperMergeConfig(base=str(bert_family.base), sources=sources, steps=2, batch_size=4,
                                          holdout_fraction=0.0))
    assert merger.config.method_kwargs["start"] == "constant" and merger.config.method_kwargs["refit_heads"] == 200
    merger.fit(bert_examples())
    peft_model, expected, x = saved_adapter_and_merge(merger, bert_family.base, tmp_path)
    for task, adapter in bert_adapters.items():
        head = load_file(adapter / "adapter_model.safetensors")["base_model.model.classifier.weight"]
        saved = load_task_model(tmp_path / "merged", task).classifier.weight
        assert torch.equal(saved, merger.result.heads[task]["classifier.weight"]) and not torch.equal(saved, head)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("family_name", ["gpt2_family", "llama_family"])
def test_combined_adapter_equals_dense_merge_causal_lm(family_name, granularity, request, tmp_path):
    family = request.getfixturevalue(family_name)
    targets = ["c_attn", "c_proj"] if family_name == "gpt2_family" else ["q_proj", "o_proj", "up_proj"]
    adapters = {}
    for i, (task, r) in enumerate({"a": 2, "b": 5}.items()):
        make_adapter(family.base, tmp_path / task, seed=i, r=r, lora_alpha=2 * r + 1, target_modules=targets,
                     fan_in_fan_out=family_name == "gpt2_family", **CAUSAL_LM)
        adapters[task] = tmp_path / task
    examples = {t: family_examples(family)[s] for t, s in zip(adapters, family.sources)}
    merger = SuperMerger(config(family.base, adapters, granularity=granularity)).fit(examples)
    merger.save_pretrained(tmp_path / "merged")
    merger.save_adapter(tmp_path / "adapter")  # per row: c_i scales B_i's rows (Conv1D: A_i's columns)
    x = torch.randint(1, 64, (2, 8))
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(x).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(family.base), tmp_path / "adapter")
    assert relative_error(peft_model(x).logits, expected) < 1e-5
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 7 and not saved["rank_pattern"]


def test_svd_compressed_adapter_reports_its_error(bert_family, tmp_path):
    """Ranks 20 + 16 on 32 x 32 weights: rank 32 is exact through the SVD path, rank 4 the best rank-4 cut."""
    adapters = {}
    for i, (task, r) in enumerate({"sst": 20, "nli": 16}.items()):
        make_adapter(bert_family.base, tmp_path / task, seed=i, num_labels=LABELS[task], r=r, lora_alpha=r,
                     target_modules=["query", "value"], **SEQ_CLS)
        adapters[task] = tmp_path / task
    merger = SuperMerger(config(bert_family.base, adapters))
    S, G = merger.plan.num_sources, len(merger.plan.groups)
    merger.apply_coefficients(table(merger, torch.rand(S, G, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8))
    full, _ = combined_factors(merger.plan, merger.coefficients)
    for rank in (4, 32):
        merger.save_adapter(tmp_path / f"rank{rank}", rank=rank)
        report = json.loads((tmp_path / f"rank{rank}" / "supermerge_adapter.json").read_text())
        saved = json.loads((tmp_path / f"rank{rank}" / "adapter_config.json").read_text())
        assert saved["r"] == rank and not saved["rank_pattern"] and report["rank"] == rank
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(bert_family.base), tmp_path / f"rank{rank}")
        for module, layer in lora_layers(peft_model).items():
            name = module + ".weight"
            delta = merger.result.merged[name] - merger.plan.base.read_tensor(name)  # (out, in), the exact merged delta
            torch.testing.assert_close(full[name][1] @ full[name][0], delta, rtol=1e-4, atol=1e-5)
            singular = torch.linalg.svdvals(delta.double())  # (32,)
            best = float(singular[rank:].norm() / singular.norm())  # Eckart-Young: the best rank-k error
            error = relative_error(layer.get_delta_weight("default"), delta)
            assert report["modules"][name]["relative_error"] == pytest.approx(best, abs=1e-5)
            assert error == pytest.approx(best, abs=1e-5)
            assert (best > 0.1) if rank == 4 else (error < 1e-5)


# ---------------------------------------------------------------- the gradient in LoRA space is the dense one
def test_lora_gradient_equals_dense_gradient(bert_family, bert_adapters, bert_dense):
    lora = SuperMerger(config(bert_family.base, bert_adapters))
    dense = SuperMerger(config(bert_family.base, bert_dense))
    assert lora.plan.groups == dense.plan.groups and lora.plan.task_specific == dense.plan.task_specific
    S, G = lora.plan.num_sources, len(lora.plan.groups)
    c = torch.rand(S, G, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8  # (S, G)
    batches = {t: as_examples(t, ex) for t, ex in bert_examples(6).items()}
    scale = {"sst": 1.0, "nli": 0.5}
    fm_lora = functional(lora)
    grad_lora, losses_lora = fm_lora.coefficient_grad(c, batches, scale)
    grad_dense, losses_dense = functional(dense).coefficient_grad(c, batches, scale)
    torch.testing.assert_close(grad_lora, grad_dense, rtol=1e-4, atol=1e-6)
    assert grad_dense.abs().max() > 1e-3 and (grad_dense == 0).any()  # untargeted tensors: no gradient
    assert len(fm_lora.lowrank) > 0  # the targeted layers ran in LoRA form
    for task in batches:
        torch.testing.assert_close(losses_lora[task], losses_dense[task], rtol=1e-5, atol=0)
    lora.apply_coefficients(table(lora, c))
    dense.apply_coefficients(table(dense, c))
    assert lora.result.merged.keys() == dense.result.merged.keys()
    for name, tensor in lora.result.merged.items():
        torch.testing.assert_close(tensor, dense.result.merged[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("variant", ["embedding", "fan_in_fan_out", "llama"])
def test_lora_layers_learn_without_a_dense_delta(variant, granularity, request, tmp_path):
    """Embedding, Conv1D and Linear LoRA layers run W x + sum_i c_i s_i B_i (A_i x): the merged tensors handed to
    the model are the base's own, and the gradient equals that of the same adapters densified by PEFT."""
    family_name, lora_kwargs = VARIANTS[variant]
    family = request.getfixturevalue(family_name)
    adapters, dense = {}, {}
    for i, task in enumerate(["sst", "nli"]):
        num_labels = LABELS[task] if lora_kwargs["task_type"] == "SEQ_CLS" else None
        peft_model = make_adapter(family.base, tmp_path / task, seed=10 + i, num_labels=num_labels, **lora_kwargs)
        peft_model.merge_and_unload().save_pretrained(tmp_path / f"{task}-dense")
        adapters[task], dense[task] = tmp_path / task, tmp_path / f"{task}-dense"
    lora = SuperMerger(config(family.base, adapters, granularity=granularity))
    full = SuperMerger(config(family.base, dense, granularity=granularity))
    fm = functional(lora)
    targeted = {n for n in lora.plan.merged if any(p is not None and not isinstance(p, torch.Tensor)
                                                   for p in fm.deltas[n].parts)}  # fmt: skip
    assert targeted and set(fm.lowrank) == targeted
    S, G = lora.plan.num_sources, len(lora.plan.groups)
    c = torch.rand(S, G, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8  # (S, G)
    merged = fm.params(c)
    assert all(merged[n] is fm.base[n] for n in targeted)  # no dense delta of a LoRA layer is formed
    if lora_kwargs["task_type"] == "SEQ_CLS":
        batches = {t: as_examples(t, ex) for t, ex in bert_examples(6).items()}
    else:
        examples = family_examples(family, 6)
        batches = {t: as_examples(t, examples[s]) for t, s in zip(adapters, family.sources)}
    scale = {"sst": 1.0, "nli": 0.5}
    grad_lora, losses_lora = fm.coefficient_grad(c, batches, scale)
    grad_dense, losses_dense = functional(full).coefficient_grad(c, batches, scale)
    torch.testing.assert_close(grad_lora, grad_dense, rtol=1e-4, atol=1e-6)
    assert grad_lora.abs().max() > 1e-3
    for task in batches:
        torch.testing.assert_close(losses_lora[task], losses_dense[task], rtol=1e-5, atol=0)


def test_bfloat16_learning_with_adapters(bert_family, bert_adapters):
    merger = SuperMerger(config(bert_family.base, bert_adapters, dtype="bfloat16")).fit(bert_examples())
    base = load_file(bert_family.base / "model.safetensors")
    targeted = {n for source in merger.plan.sources for n in source.factors}
    assert 0 < len(targeted) < len(merger.result.merged)
    for name, tensor in merger.result.merged.items():
        assert tensor.dtype == torch.bfloat16, name
        assert (name in targeted) != torch.equal(tensor, base[name].to(torch.bfloat16)), name


# ---------------------------------------------------------------- mixed sources
def test_full_finetune_and_adapter_merge(bert_family, bert_adapters, tmp_path):
    sources = {"sst": bert_family.sources["sst"], "nli": bert_adapters["nli"]}
    merger = SuperMerger(config(bert_family.base, sources)).fit(bert_examples())
    base = load_file(bert_family.base / "model.safetensors")
    full = {k.removeprefix("bert."): v for k, v in load_file(sources["sst"] / "model.safetensors").items()}
    spec = merger.plan.sources[1]
    c = merger.coefficients.values  # (S, G)
    for name, merged in merger.result.merged.items():
        g = merger.plan.group_index[name]
        lora = spec.delta(name, base[name])
        expected = base[name] + coefficient(c, 0, g, base[name]) * (full[name] - base[name])
        expected = expected + (coefficient(c, 1, g, base[name]) * lora.dense() if lora is not None else 0)
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    out = merger.save_pretrained(tmp_path / "merged")
    assert load_task_model(out, "nli").config.num_labels == 3 and load_task_model(out, "sst").config.num_labels == 2
    message = r"sources \['sst'\] are full fine-tunes, whose task vectors no adapter holds exactly"
    with pytest.raises(ValueError, match=message):
        merger.save_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- clear refusals, before any learning
def test_adapter_of_another_shape_is_refused(bert_family, tmp_path):
    torch.manual_seed(0)
    wide = BertForSequenceClassification(BertConfig(**(BERT_CONFIG | {"hidden_size": 48}), num_labels=2))
    get_peft_model(wide, LoraConfig(r=2, target_modules=["query"], **SEQ_CLS)).save_pretrained(tmp_path / "wide")
    cfg = config(bert_family.base, {"sst": bert_family.sources["sst"], "wide": tmp_path / "wide"})
    with pytest.raises(IncompatibleSourceError, match=r"give shape \(48, 48\), but the base has \(32, 32\)"):
        SuperMerger(cfg)


def test_adapter_declared_for_another_base_is_refused(bert_family, tmp_path):
    shutil.copytree(bert_family.base, tmp_path / "other-bert")
    make_adapter(tmp_path / "other-bert", tmp_path / "adapter", seed=0, num_labels=2, r=2, target_modules=["query"],
                 **SEQ_CLS)
    cfg = config(bert_family.base, {"sst": bert_family.sources["sst"], "other": tmp_path / "adapter"})
    with pytest.raises(IncompatibleSourceError, match=r"was trained on '.*other-bert', not on the base"):
        SuperMerger(cfg)


def test_dora_adapter_is_refused(bert_family, tmp_path):
    make_adapter(bert_family.base, tmp_path / "dora", seed=0, num_labels=2, r=2, target_modules=["query"],
                 use_dora=True, **SEQ_CLS)
    cfg = config(bert_family.base, {"sst": bert_family.sources["sst"], "dora": tmp_path / "dora"})
    message = r"uses DoRA: its task vector is not s \* B @ A.*merge_and_unload"
    with pytest.raises(IncompatibleSourceError, match=message):
        SuperMerger(cfg)


# ---------------------------------------------------------------- data-free methods
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_data_free_methods_with_adapters(method, bert_family, bert_adapters, bert_dense):
    kwargs = {"lam": 0.7} | ({"density": 0.3} if method == "ties" else {})
    merger = SuperMerger(config(bert_family.base, bert_adapters, method=method, method_kwargs=kwargs)).fit()
    base = load_file(bert_family.base / "model.safetensors")
    dense = [{k.removeprefix("bert."): v for k, v in load_file(p / "model.safetensors").items()}
             for p in bert_dense.values()]
    merge = {"task_arithmetic": task_arithmetic, "ties": ties}[method]
    for name, merged in merger.result.merged.items():
        deltas = torch.stack([d[name] - base[name] for d in dense])  # (S, *shape), densified by PEFT
        torch.testing.assert_close(merged, base[name] + merge(deltas, **kwargs), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"here '{method}' learns no coefficients"):
        merger.save_adapter("unused")


# ---------------------------------------------------------------- CLI
def write_recipe(folder: Path, base: Path, sources: dict[str, Path]) -> Path:
    for i, (task, k) in enumerate(LABELS.items()):
        write_text_examples(folder / f"{task}.jsonl", 12, k, seed=i)
    recipe = {"base": str(base), "steps": 2, "batch_size": 4, "holdout_fraction": 0.0,
              "sources": [{"task": t, "path": str(p), "data": {"path": f"{t}.jsonl"}} for t, p in sources.items()]}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def test_cli_writes_the_combined_adapter(bert_family, bert_adapters, tmp_path):
    recipe = write_recipe(tmp_path, bert_family.base, bert_adapters)
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    args = ["merge", str(recipe), "--output", str(merged), "--adapter-output", str(adapter)]
    assert main(args) == 0
    x = torch.randint(1, 64, (2, 6))
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(bert_family.base), adapter)
    expected = AutoModel.from_pretrained(merged)(x).last_hidden_state
    assert relative_error(peft_model(x).last_hidden_state, expected) < 1e-5
    assert main([*args, "--overwrite", "--adapter-rank", "3"]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 3
    assert json.loads((adapter / "supermerge_adapter.json").read_text())["rank"] == 3


def test_cli_refuses_an_adapter_of_full_finetunes_before_learning(bert_family, bert_adapters, tmp_path, capsys):
    recipe = write_recipe(tmp_path, bert_family.base, {"sst": bert_family.sources["sst"], "nli": bert_adapters["nli"]})
    args = ["merge", str(recipe), "--output", str(tmp_path / "merged"), "--adapter-output", str(tmp_path / "adapter")]
    assert main(args) == 2
    assert "here sources ['sst'] are full fine-tunes" in capsys.readouterr().err
    assert main(["merge", str(recipe), "--output", str(tmp_path / "merged"), "--adapter-rank", "2"]) == 2
    assert "give that folder too" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_finetune_lora_classifier_gives_a_cached_adapter_source(bert_family, tmp_path):
    train = [{"text": "good fun movie", "label": 1}, {"text": "bad dull plot", "label": 0}] * 4
    task = TaskData("toy", ["negative", "positive"], test=train, pool=train, train=train)
    out = finetune_lora_classifier(bert_family.base, task, tmp_path / "lora", steps=2, batch_size=4, r=2, lora_alpha=4)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["task_type"]) == (2, 4, "SEQ_CLS")
    assert json.loads((out / "finetune.json").read_text())["learning_rate"] == 5e-4
    spec = LoraSpec(out, ModelSpec.from_folder(bert_family.base))
    assert spec.config.num_labels == 2 and sorted(spec.saved) == ["classifier.bias", "classifier.weight"]
    assert len(spec.factors) == 2 * 6 + 1  # per layer q, k, v and 3 dense; the pooler's dense
    assert all(spec.checkpoint.read_tensor(b).abs().max() > 0 for _, b, *_ in spec.factors.values())  # trained
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    assert finetune_lora_classifier(bert_family.base, task, out, steps=2, batch_size=4, r=2, lora_alpha=4) == out
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_push_combined_adapter_to_hub(hub_server, bert_family, bert_adapters, tmp_path):
    """The combined adapter goes to the Hub test double and loads back with PeftModel from the pulled folder."""
    from supermerge_hf.hub import resolve

    merger = SuperMerger(config(bert_family.base, bert_adapters), token="hf_adapter_token", endpoint=hub_server.url)
    merger.fit(bert_examples())
    oid = merger.push_adapter_to_hub("user/combined-adapter", token="hf_adapter_token")
    pulled = resolve("user/combined-adapter", revision=oid, token=False, endpoint=hub_server.url).path
    merged_dir = Path(merger.save_pretrained(str(tmp_path / "merged")))
    x = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        via_adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(bert_family.base), pulled).eval()(x)
        dense = AutoModel.from_pretrained(merged_dir).eval()(x)
    assert relative_error(via_adapter.last_hidden_state, dense.last_hidden_state) < 1e-5
