"""RegMean and RegMean++ against the plain formula written here from hooked inputs, through SuperMerger (one
source, save and reload, errors), and (if installed) against fusion-bench 0.2.33's implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertModel

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.methods import get_method
from supermerge_hf.regmean import regmean, regmean_merge, scale_off_diagonal

from .conftest import VOCAB, family_examples


def config_for(family, method, tasks=None, **kwargs) -> SuperMergeConfig:
    sources = [s for s in family.source_list() if tasks is None or s["task"] in tasks]
    return SuperMergeConfig(base=str(family.base), sources=sources, method=method, **kwargs)


def equal_length_inputs(family, n: int = 6, length: int = 7) -> dict[str, list[dict]]:
    """Inputs without labels or padding, so that every implementation sees the same rows."""
    g = torch.Generator().manual_seed(3)
    return {t: [{"input_ids": torch.randint(1, VOCAB, (length,), generator=g)} for _ in range(n)]
            for t in family.sources}


def bodies(family, dtype: torch.dtype = torch.float32) -> tuple[BertModel, dict[str, BertModel]]:
    """The base and each fine-tune's body as BertModels (eval mode: dropout off), fresh copies."""
    load = lambda path: BertModel.from_pretrained(path).to(dtype).eval()  # noqa: E731
    return load(family.base), {t: load(p) for t, p in family.sources.items()}


def linear_names(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


@torch.no_grad()
def hooked_grams(model: nn.Module, examples: list[dict], kinds: tuple[type, ...] = (nn.Linear,),
                 ) -> dict[str, torch.Tensor]:
    """XᵀX / N of the inputs of every module of `kinds`, one example at a time (no padding), in float64."""
    rows, count = {}, {}

    def hook(name):
        def add(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (N, in)
            rows[name] = rows.get(name, 0) + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]
        return add

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in linear_names(model, kinds)]
    for ex in examples:
        model(input_ids=torch.as_tensor(ex["input_ids"]).view(1, -1))
    for handle in handles:
        handle.remove()
    return {n: rows[n] / count[n] for n in rows}


def formula(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """RegMean written out on Wᵀ (in × out): (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, G̃ = α G + (1 − α) diag(G)."""
    scaled = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    total = sum(scaled)
    return (torch.linalg.inv(total) @ sum(g @ w.double().T for g, w in zip(scaled, weights))).T


# ---- the pure function --------------------------------------------------------------------------------------


def test_scale_off_diagonal():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    torch.testing.assert_close(scale_off_diagonal(g, 0.5), torch.tensor([[4.0, 1.0], [1.0, 9.0]]))


def test_regmean_merge_is_the_least_squares_merge():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(20, 5, generator=g, dtype=torch.float64) for _ in range(3)]  # each task's inputs (N, in)
    deltas = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)  # (S, out, in)
    grams = torch.stack([xi.T @ xi / len(xi) for xi in x])
    merged = regmean_merge(deltas, grams, alpha=1.0)
    # W minimises Σ_i ‖X_i Wᵀ − X_i τ_iᵀ‖² / N_i: the normal equations hold
    residual = sum(xi.T @ (xi @ merged.T - xi @ d.T) / len(xi) for xi, d in zip(x, deltas))
    torch.testing.assert_close(residual, torch.zeros(5, 4, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(regmean_merge(deltas, grams, alpha=0.9),
                               formula(list(deltas), list(grams), 0.9).to(deltas.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(regmean(deltas[:, 0]), deltas[:, 0].mean(dim=0))  # no Gram: the mean


def test_a_feature_no_input_reaches_takes_the_mean():
    grams = torch.eye(3).expand(2, 3, 3).clone()
    grams[:, 2, 2] = 0.0  # input feature 2 is zero on every input of every task
    deltas = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    merged = regmean_merge(deltas, grams, alpha=1.0)
    torch.testing.assert_close(merged, deltas.mean(dim=0))  # identity Grams: the mean everywhere


def test_singular_gram_raises():
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(2))  # one row: rank 1 < 3 features
    grams = (x.T @ x).expand(2, 3, 3)
    with pytest.raises(ValueError, match=r"singular \(alpha=1.0\): give more inputs per task, or an alpha below 1"):
        regmean_merge(torch.zeros(2, 4, 3), grams, alpha=1.0)
    regmean_merge(torch.zeros(2, 4, 3), grams, alpha=0.9)  # the diagonal kept whole: invertible


def test_registry_declares_the_statistics():
    assert get_method("regmean").kind == get_method("regmean_plusplus").kind == "statistics"
    assert get_method("regmean").statistics == "gram"
    assert get_method("regmean_plusplus").statistics == "gram_sequential"
    assert get_method("regmean").hyperparameters["alpha"].default == 0.9
    with pytest.raises(ValueError, match=r"`method_kwargs.alpha` of 'regmean' must be in \[0.0, 1.0\], got 1.5"):
        SuperMergeConfig(base="b", sources=[{"task": "t", "path": "p"}], method="regmean",
                         method_kwargs={"alpha": 1.5})


# ---- through SuperMerger ------------------------------------------------------------------------------------


def test_regmean_equals_the_formula_on_hooked_inputs(bert_family):
    examples = family_examples(bert_family, n=6)  # lengths 4..8: batched by shape, never padded
    merger = SuperMerger(config_for(bert_family, "regmean", method_kwargs={"alpha": 0.7})).fit(examples)
    base, sources = bodies(bert_family)
    grams = {t: hooked_grams(m, examples[t]) for t, m in sources.items()}
    linear = linear_names(base)
    assert {f"{n}.weight" for n in linear} <= set(merger.plan.merged) and len(linear) == 13  # 6 per layer, pooler
    for name in merger.plan.merged:
        finetuned = [m.get_parameter(name) for m in sources.values()]
        module = name.removesuffix(".weight")
        if module in linear and name.endswith(".weight"):
            expected = formula(finetuned, [grams[t][module] for t in sources], 0.7)
        else:  # biases, norms, embeddings: the mean of the fine-tunes
            expected = torch.stack(finetuned).double().mean(dim=0)
        torch.testing.assert_close(merger.merged_tensors[name].double(), expected, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["bert_family", "llama_family", "gpt2_family"])
@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_one_source_gives_its_finetune(method, family, request):
    family = request.getfixturevalue(family)
    task = list(family.sources)[-1]
    merger = SuperMerger(config_for(family, method, tasks=[task])).fit({task: family_examples(family, n=4)[task]})
    source = merger.plan.task_specs[task]
    for name, tensor in merger.merged_tensors.items():
        torch.testing.assert_close(tensor, source.read_tensor(name), rtol=0, atol=1e-5, msg=name)


def test_labels_are_not_read_and_unlabelled_inputs_count(bert_family):
    examples = family_examples(bert_family, n=6)
    inputs = {t: [{"input_ids": ex["input_ids"]} for ex in exs] for t, exs in examples.items()}
    for method in ("regmean", "regmean_plusplus"):
        labelled = SuperMerger(config_for(bert_family, method)).fit(examples).merged_tensors
        unlabelled = SuperMerger(config_for(bert_family, method)).fit(unlabelled=inputs).merged_tensors
        mixed = SuperMerger(config_for(bert_family, method)).fit({"sst": examples["sst"]},
                                                                 unlabelled={"nli": inputs["nli"]}).merged_tensors
        for name, tensor in labelled.items():
            torch.testing.assert_close(unlabelled[name], tensor, rtol=0, atol=1e-6)
            torch.testing.assert_close(mixed[name], tensor, rtol=0, atol=1e-6)


def test_regmean_plusplus_takes_inputs_through_the_merged_blocks(bert_family):
    examples = family_examples(bert_family, n=6)
    plain = SuperMerger(config_for(bert_family, "regmean")).fit(examples).merged_tensors
    plus = SuperMerger(config_for(bert_family, "regmean_plusplus")).fit(examples).merged_tensors
    first, second = "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.query.weight"
    # the first layer's inputs are the merged embeddings (the mean) instead of each fine-tune's own
    assert not torch.allclose(plus[first], plain[first], atol=1e-6)
    assert not torch.allclose(plus[second], plain[second], atol=1e-6)
    torch.testing.assert_close(plus["encoder.layer.1.output.LayerNorm.weight"],
                               plain["encoder.layer.1.output.LayerNorm.weight"])  # the mean in both


def test_without_inputs_raises(bert_family):
    merger = SuperMerger(config_for(bert_family, "regmean"))
    with pytest.raises(ValueError, match=r"task\(s\) \['sst', 'nli'\] have no inputs: pass examples"):
        merger.fit()
    with pytest.raises(ValueError, match=r"task\(s\) \['nli'\] have no inputs"):
        merger.fit({"sst": family_examples(bert_family, n=2)["sst"]})


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_save_and_reload_give_identical_logits(method, bert_family, tmp_path):
    examples = family_examples(bert_family, n=6)
    merger = SuperMerger(config_for(bert_family, method, output_dir=str(tmp_path / "m"))).fit(examples)
    out = merger.save_pretrained()
    rebuilt = SuperMerger.from_pretrained(out)  # its weights are the merge: no examples needed again
    assert rebuilt.config.method == method
    for name, tensor in merger.merged_tensors.items():
        assert torch.equal(rebuilt.merged_tensors[name], tensor), name
    again = rebuilt.save_pretrained(tmp_path / "again")
    x = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))
    for task in bert_family.sources:
        assert torch.equal(load_task_model(out, task)(x).logits, load_task_model(again, task)(x).logits)
    assert merger.evaluate(examples) == rebuilt.evaluate(examples)


def test_recipe_with_labelled_and_unlabelled_inputs(bert_family, tmp_path, capsys):
    import yaml
    from transformers import AutoTokenizer

    from supermerge_hf.cli import main
    from supermerge_hf.data import read_examples

    from .conftest import write_text_examples

    for i, task in enumerate(bert_family.sources):
        write_text_examples(tmp_path / f"{task}.jsonl", 8, bert_family.num_labels[task], seed=i)
    sources = [{"task": "sst", "path": str(bert_family.sources["sst"]), "data": {"path": "sst.jsonl"}},
               {"task": "nli", "path": str(bert_family.sources["nli"]), "unlabelled": {"path": "nli.jsonl"}}]
    recipe = {"base": str(bert_family.base), "sources": sources, "method": "regmean_plusplus",
              "method_kwargs": {"alpha": 0.8}, "output_dir": str(tmp_path / "out")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yaml")]) == 0, capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(bert_family.base)
    api = SuperMerger(config_for(bert_family, "regmean_plusplus", method_kwargs={"alpha": 0.8})).fit(
        {"sst": read_examples(tmp_path / "sst.jsonl", tokenizer)},
        unlabelled={"nli": read_examples(tmp_path / "nli.jsonl", tokenizer, label_field=None)})
    saved = SuperMerger.from_pretrained(tmp_path / "out")
    assert saved.config.method_kwargs == {"alpha": 0.8}
    for name, tensor in api.merged_tensors.items():
        torch.testing.assert_close(saved.merged_tensors[name], tensor, rtol=0, atol=1e-6)


def test_lora_adapters_merge_as_their_densified_finetunes(bert_family, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForSequenceClassification

    adapters, dense = {}, {}
    for i, (task, labels) in enumerate(bert_family.num_labels.items()):
        torch.manual_seed(i)
        model = BertForSequenceClassification.from_pretrained(bert_family.base, num_labels=labels)
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False,
                          task_type="SEQ_CLS", modules_to_save=["classifier"])
        get_peft_model(model, lora).save_pretrained(adapters.setdefault(task, tmp_path / f"{task}-lora"))
        model = BertForSequenceClassification.from_pretrained(bert_family.base, num_labels=labels)
        PeftModel.from_pretrained(model, adapters[task]).merge_and_unload().save_pretrained(
            dense.setdefault(task, tmp_path / f"{task}-dense"))
    examples = family_examples(bert_family, n=6)
    merged = {}
    for kind, sources in (("lora", adapters), ("dense", dense)):
        config = SuperMergeConfig(base=str(bert_family.base), method="regmean_plusplus",
                                  sources=[{"task": t, "path": str(p)} for t, p in sources.items()])
        merged[kind] = SuperMerger(config).fit(examples).merged_tensors
    for name, tensor in merged["dense"].items():
        torch.testing.assert_close(merged["lora"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_gpt2_conv1d_is_merged_in_its_orientation(gpt2_family):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    examples = family_examples(gpt2_family, n=4)
    merger = SuperMerger(config_for(gpt2_family, "regmean")).fit(examples)
    models = {t: GPT2LMHeadModel.from_pretrained(p).eval() for t, p in gpt2_family.sources.items()}
    grams = {t: hooked_grams(m, examples[t], (Conv1D,)) for t, m in models.items()}
    conv = linear_names(models["a"], (Conv1D,))
    assert len(conv) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    for module in conv:
        weights = [m.get_parameter(f"{module}.weight") for m in models.values()]  # (in, out): y = x W + b
        expected = formula([w.T for w in weights], [grams[t][module] for t in models], 0.9).T
        name = f"{module.removeprefix('transformer.')}.weight"
        torch.testing.assert_close(merger.merged_tensors[name].double(), expected, rtol=0, atol=1e-5, msg=name)
    tied = torch.stack([m.get_parameter("transformer.wte.weight") for m in models.values()]).mean(dim=0)
    torch.testing.assert_close(merger.merged_tensors["wte.weight"], tied)  # also the LM head: the mean


# ---- against fusion-bench, when installed --------------------------------------------------------------------


class Feeder:
    """What fusion-bench's `regmean_merging` reads of a Hugging Face Trainer: one batch of a task's inputs."""

    def __init__(self, examples: list[dict]) -> None:
        self.batches = [{"input_ids": torch.stack([ex["input_ids"] for ex in examples])}]
        self._train_batch_size = len(examples)

    def get_train_dataloader(self):
        return self.batches

    def _prepare_inputs(self, inputs):
        return inputs


def fusion_bench_plusplus():
    """fusion-bench's RegMean++ for a BertModel: the per-model hooks as its CLIP version (the running mean of xᵀx
    over rows), the embeddings merged first by the mean, then `encoder.layer` one layer at a time."""
    from fusion_bench.method.regmean_plusplus import RegMeanAlgorithmPlusPlus

    class BertRegMeanPlusPlus(RegMeanAlgorithmPlusPlus):
        def merge_embedding_layer(self, models_to_merge_dict):
            states = [m.state_dict() for m in models_to_merge_dict.values()]
            return {n: torch.stack([s[n] for s in states]).mean(dim=0) for n in states[0]
                    if n.startswith("embeddings.")}

        def get_input_for_first_layer(self, model, train_dataset):
            return [model.embeddings(input_ids=batch["input_ids"]) for batch in train_dataset]

        def get_layers(self, model):
            return model.encoder.layer

        def update_merged_params_dict(self, merged_params_dict, new_merged_params, layer_idx):
            return merged_params_dict | {f"encoder.layer.{layer_idx}.{k}": v for k, v in new_merged_params.items()}

        def layer_batches_forward(self, layer, batches_input):
            return [layer(batch) for batch in batches_input]

        def get_regmean_weights(self, model_name, layer, batches_input, linear_modules_to_merge):
            grams, counts = {}, {}

            def hook(name):
                def add(module, args, output):
                    x = args[0].detach().reshape(-1, args[0].shape[-1])
                    xtx = x.T @ x
                    if name not in grams:
                        grams[name], counts[name] = xtx / x.shape[0], x.shape[0]
                    else:
                        grams[name] = (grams[name] * counts[name] + xtx) / (counts[name] + x.shape[0])
                        counts[name] += x.shape[0]
                return add

            handles = [m.register_forward_hook(hook(n)) for n, m in linear_modules_to_merge.items()]
            self.layer_batches_forward(layer, batches_input)
            for handle in handles:
                handle.remove()
            return grams

    return BertRegMeanPlusPlus


def test_matches_fusion_bench(bert_family):
    # fusion-bench runs in float64 here: in float32 its inverse of Σ G̃ alone is 1e-5 off (ours solves in float64)
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.regmean.regmean import regmean_merging
    from fusion_bench.modelpool import BaseModelPool

    alpha, inputs = 0.9, equal_length_inputs(bert_family)
    ours = {m: SuperMerger(config_for(bert_family, m, method_kwargs={"alpha": alpha})).fit(unlabelled=inputs)
            for m in ("regmean", "regmean_plusplus")}

    _, sources = bodies(bert_family, torch.float64)
    with torch.no_grad():
        theirs = regmean_merging(list(sources.values()), [Feeder(inputs[t]) for t in sources], [],
                                 [len(inputs[t]) for t in sources], reduce_non_diagonal_ratio=alpha)
    diff = max(float((ours["regmean"].merged_tensors[n] - t).abs().max()) for n, t in theirs.items())  # 5e-7
    assert set(theirs) == set(ours["regmean"].merged_tensors) and diff < 1e-5, diff

    class Pool(BaseModelPool):
        def load_train_dataset(self, dataset_name, *args, **kwargs):
            return Feeder(inputs[dataset_name]).batches

    base, sources = bodies(bert_family, torch.float64)
    algorithm = fusion_bench_plusplus()(num_regmean_examples=len(inputs["sst"]), exclude_param_names_regex=[],
                                       reduce_non_diagonal_ratio=alpha, weight_transpose=True)
    merged = algorithm.run(Pool({"_pretrained_": base, **sources})).state_dict()
    compared = [n for n in ours["regmean_plusplus"].merged_tensors if not n.startswith("pooler.")]  # theirs: base
    diff = max(float((ours["regmean_plusplus"].merged_tensors[n] - merged[n]).abs().max()) for n in compared)  # 5e-7
    assert len(compared) == len(merged) - 2 and diff < 1e-5, diff
