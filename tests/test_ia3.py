"""IA³ adapters as sources (method.md section 8): PEFT's own scaling, the merge in IA³ space, the exact gradient with
activations scaled (no merged weight formed), the dense save, the combined IA³ adapter, mixes and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, BertForSequenceClassification

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.data import as_examples
from supermerge_hf.functional import FunctionalMerge
from supermerge_hf.ia3 import IA3Spec
from supermerge_hf.results import Coefficients, transform
from supermerge_hf.sources import IncompatibleSourceError, ModelSpec

from .conftest import PAPER, classification_examples, family_examples

LABELS = {"sst": 2, "nli": 3}
VARIANTS = {  # family -> the IA³ configs of its two adapters (attention and feed-forward types, biases, Conv1D)
    "bert_family": [dict(task_type="SEQ_CLS", target_modules=["key", "value", "intermediate.dense", "output.dense"],
                         feedforward_modules=["output.dense"]),
                    dict(task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"],
                         feedforward_modules=["output.dense"])],
    "gpt2_family": [dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc", "mlp.c_proj"],
                         feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)] * 2,
    "llama_family": [dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                          feedforward_modules=["down_proj"])] * 2,
}


def task_model(base: Path, num_labels: int | None):
    if num_labels is not None:
        return BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    return AutoModelForCausalLM.from_pretrained(base)


def make_ia3(base: Path, out: Path, *, seed: int, num_labels: int | None = None, **ia3) -> PeftModel:
    """An IA³ adapter of `base` with every `ia3_l` moved away from ones by 0.3 * N(0, 1), saved to `out`."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(task_model(base, num_labels), IA3Config(**ia3))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out)
    return peft_model.eval()


def config(base: Path, sources: dict[str, Path], **kwargs) -> SuperMergeConfig:
    kwargs = {"steps": 2, "batch_size": 4, "learning_rate": 0.1, "holdout_fraction": 0.0, "granularity": "tensor",
              "method_kwargs": PAPER} | kwargs
    return SuperMergeConfig(base=str(base), sources=[{"task": t, "path": str(p)} for t, p in sources.items()],
                            **kwargs)


def table(merger: SuperMerger, values: torch.Tensor) -> Coefficients:
    return Coefficients.from_values(merger.plan.source_names, merger.plan.groups, values, merger.config.transform)


def random_c(merger: SuperMerger, seed: int = 0) -> torch.Tensor:
    S, G = merger.plan.num_sources, len(merger.plan.groups)
    return torch.rand(S, G, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8  # (S, G) in (-0.8, 0.8)


def batches_for(family, tasks: list[str], n: int = 6) -> dict[str, list[dict]]:
    if family.num_labels is not None:
        return {t: as_examples(t, classification_examples(LABELS[t], n, seed=i)) for i, t in enumerate(tasks)}
    examples = family_examples(family, n)
    return {t: as_examples(t, examples[s]) for t, s in zip(tasks, family.sources)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


@pytest.fixture(scope="module")
def adapters(request, tmp_path_factory) -> dict[str, tuple]:
    """Per family: (family, {task: adapter folder}, {task: PEFT's merge_and_unload() of it})."""
    out = {}
    for family_name, configs in VARIANTS.items():
        family = request.getfixturevalue(family_name)
        root = tmp_path_factory.mktemp(f"ia3_{family_name}")
        folders, merged = {}, {}
        for i, (task, ia3) in enumerate(zip(LABELS, configs)):
            labels = LABELS[task] if family.num_labels is not None else None
            make_ia3(family.base, root / task, seed=i + 1, num_labels=labels, **ia3)
            reloaded = PeftModel.from_pretrained(task_model(family.base, labels), root / task)
            folders[task], merged[task] = root / task, reloaded.merge_and_unload().eval()
        out[family_name] = (family, folders, merged)
    return out


# ---------------------------------------------------------------- the task vector is PEFT's
@pytest.mark.parametrize("family_name", sorted(VARIANTS))
def test_task_vector_equals_peft_merge_and_unload(family_name, adapters):
    """l - 1 scaling the base gives merge_and_unload() - base for every tensor: weights of both types, biases."""
    family, folders, merged = adapters[family_name]
    base = ModelSpec.from_folder(family.base)
    spec = IA3Spec(folders["sst"], base)
    state = merged["sst"].state_dict()
    scaled = 0
    for name in base.shapes:
        theta = base.read_tensor(name)
        part = spec.delta(name, theta)
        delta = torch.zeros_like(theta) if part is None else part.dense()
        expected = state[spec.param_names[name]] - theta
        assert max_diff(delta, expected) < 1e-6, name
        scaled += part is not None
    assert scaled == len(spec.vectors) > 0
    if family_name != "llama_family":  # attention-type layers with a bias: it follows its weight
        assert spec.follows and all(spec.vectors[b][0] == spec.vectors[w][0] for b, w in spec.follows.items())


# ---------------------------------------------------------------- one-hot coefficients are the adapter itself
@pytest.mark.parametrize("family_name", sorted(VARIANTS))
def test_one_hot_equals_merge_and_unload(family_name, adapters):
    family, folders, merged = adapters[family_name]
    merger = SuperMerger(config(family.base, folders, transform="none"))
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    assert fm.scaled, "IA³ layers run as activation scales"
    inputs = {"input_ids": torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(0))}
    for i, task in enumerate(folders):
        c = torch.zeros(merger.plan.num_sources, len(merger.plan.groups))
        c[i] = 1.0
        params = fm.params(c)
        assert all(params[n] is fm.base[n] for layer in fm.scaled.values() for n in layer.names)  # no dense delta
        with torch.no_grad():
            expected = merged[task](**inputs).logits
            hooked = fm.forward(task, params, inputs, c).logits
            dense = fm.forward(task, fm.params(c, dense=True), inputs).logits
        assert max_diff(hooked, expected) < 2e-6 and max_diff(dense, expected) < 2e-6, task


# ---------------------------------------------------------------- merged == l = 1 + sum_i c_i (l_i - 1)
def test_merge_is_in_ia3_space(adapters):
    family, folders, _ = adapters["bert_family"]
    merger = SuperMerger(config(family.base, folders))
    c = random_c(merger)
    merger.apply_coefficients(table(merger, c))
    base, plan, specs = load_file(family.base / "model.safetensors"), merger.plan, merger.plan.sources
    for name, tensor in merger.result.merged.items():
        g, expected = plan.group_index[name], base[name].clone()
        for i, spec in enumerate(specs):
            if name in spec.vectors:
                _, dim, _ = spec.vectors[name]
                l_i = load_file(spec.folder / "adapter_model.safetensors")[spec.vectors[name][0]].flatten()
                shape = [-1 if d == dim else 1 for d in range(tensor.dim())]
                expected += c[i, g] * (l_i - 1).view(shape) * base[name]
        assert max_diff(tensor, expected) < 1e-6, name
    for bias, weight in specs[0].follows.items():  # one coefficient per IA³ vector: the bias is in its group
        assert plan.group_index[bias] == plan.group_index[weight] and bias not in plan.groups


# ---------------------------------------------------------------- analytic gradient == autograd
@pytest.mark.parametrize("family_name,granularity", [("bert_family", "tensor"), ("bert_family", "block"),
                                                     ("bert_family", "row"), ("gpt2_family", "tensor")])
def test_gradient_equals_autograd(family_name, granularity, adapters):
    """Hooked IA³ layers (tensor, block; row: an IA³-scaled layer keeps one coefficient per vector, the others get
    one per row) give dL/dw = c'(w) dL/dc equal to autograd through theta_m(c(w)) written out."""
    family, folders, _ = adapters[family_name]
    merger = SuperMerger(config(family.base, folders, granularity=granularity))
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    assert fm.scaled and all(isinstance(merger.plan.group_index[n], int) for n in fm.scaled)
    plan, scale = merger.plan, {"sst": 1.0, "nli": 0.5}
    batches = batches_for(family, list(folders))
    w = (2 * random_c(merger, seed=3)).requires_grad_()  # (S, G)
    c = transform(w, "tanh")  # (S, G)
    reference_params = {}
    for name, stack in fm.deltas.items():  # theta_p + sum_i c_i tau_i, tau_i = (l_i - 1) * theta_p densified
        cg = c[:, plan.group_index[name]]  # (S,) or (S, R)
        taus = stack.dense()  # (S, *shape)
        reference_params[name] = fm.base[name] + (cg.view(*cg.shape, *[1] * (taus.dim() - cg.dim())) * taus).sum(0)
    loss = sum(scale[t] * fm.forward(t, reference_params, batch).loss for t, batch in batches.items())
    (reference,) = torch.autograd.grad(loss, [w])
    grad_c, losses = fm.coefficient_grad(c.detach(), batches, scale)
    analytic = (1 - torch.tanh(w.detach()) ** 2) * grad_c
    torch.testing.assert_close(analytic, reference, rtol=1e-4, atol=1e-9)
    assert reference.abs().max() > 1e-6 and float((analytic - reference).norm() / reference.norm()) < 1e-5
    assert abs(sum(scale[t] * float(v) for t, v in losses.items()) - float(loss)) < 1e-5


# ---------------------------------------------------------------- exports: dense, and one IA³ adapter
def test_dense_save_reloads_to_the_same_logits(adapters, tmp_path):
    family, folders, _ = adapters["bert_family"]
    merger = SuperMerger(config(family.base, folders)).fit({t: classification_examples(k, 8, seed=i)
                                                            for i, (t, k) in enumerate(LABELS.items())})
    c, out = merger.coefficients.values, merger.save_pretrained(tmp_path / "merged")
    fm = FunctionalMerge(merger.plan, dtype=torch.float32)
    inputs = {"input_ids": torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(0))}
    for task in folders:
        with torch.no_grad():
            reloaded = load_task_model(out, task)(**inputs).logits
            learned = fm.forward(task, fm.params(c), inputs, c).logits
        assert max_diff(reloaded, learned) < 2e-6, task


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("family_name", sorted(VARIANTS))
def test_combined_ia3_adapter_equals_dense_merge(family_name, granularity, adapters, tmp_path):
    """The combined adapter is PEFT's IA³ format; its outputs and its merge_and_unload() are the dense merge (with
    `row`, the default, too: IA³-scaled layers keep one coefficient per IA³ vector)."""
    family, folders, _ = adapters[family_name]
    merger = SuperMerger(config(family.base, folders, granularity=granularity))
    merger.apply_coefficients(table(merger, random_c(merger, seed=1)))
    merger.save_pretrained(tmp_path / "merged")
    merger.save_adapter(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and set(saved["feedforward_modules"]) <= set(saved["target_modules"])
    auto = AutoModel if family.num_labels is not None else AutoModelForCausalLM
    dense = auto.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(auto.from_pretrained(family.base), tmp_path / "adapter").eval()
    x = torch.randint(1, 64, (2, 8))
    with torch.no_grad():
        out = lambda m: m(x).last_hidden_state if family.num_labels is not None else m(x).logits  # noqa: E731
        assert max_diff(out(peft_model), out(dense)) < 2e-6
        assert max_diff(out(dense), out(auto.from_pretrained(family.base).eval())) > 1e-3
    unloaded = peft_model.merge_and_unload().state_dict()
    assert max(max_diff(unloaded[k], v) for k, v in dense.state_dict().items()) < 1e-6


# ---------------------------------------------------------------- mixes
def test_ia3_with_a_full_finetune_and_lora(adapters, tmp_path):
    """IA³ + full fine-tune + LoRA of one base merge in dense form where they meet; one adapter cannot hold it."""
    family, folders, _ = adapters["bert_family"]
    torch.manual_seed(5)
    lora = get_peft_model(BertForSequenceClassification.from_pretrained(family.base, num_labels=2),
                          LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "key"],
                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    sources = {"sst": family.sources["sst"], "nli": folders["nli"], "lora": tmp_path / "lora"}
    merger = SuperMerger(config(family.base, sources))
    c = random_c(merger, seed=2)
    merger.apply_coefficients(table(merger, c))
    base = load_file(family.base / "model.safetensors")
    full = {k.removeprefix("bert."): v for k, v in load_file(sources["sst"] / "model.safetensors").items()}
    plan = merger.plan
    for name, tensor in merger.result.merged.items():
        g = plan.group_index[name]
        expected = base[name] + c[0, g] * (full[name] - base[name])
        for i in (1, 2):
            part = plan.sources[i].delta(name, base[name])
            expected = expected + (0 if part is None else c[i, g] * (part if torch.is_tensor(part) else part.dense()))
        assert max_diff(tensor, expected) < 1e-6, name
    fm = FunctionalMerge(plan, dtype=torch.float32)
    assert not fm.scaled and fm.lowrank  # IA³ meets the full fine-tune everywhere: dense; LoRA stays low-rank
    batches = {"sst": batches_for(family, ["sst"])["sst"], "nli": batches_for(family, ["sst", "nli"])["nli"]}
    grad_c, _ = fm.coefficient_grad(c, batches, {"sst": 1.0, "nli": 1.0})
    assert torch.isfinite(grad_c).all() and grad_c[1].abs().max() > 0
    with pytest.raises(IncompatibleSourceError, match=r"here sources \{'sst': 'full fine-tune', 'lora': 'LoRA "
                                                      r"adapter'\} are not IA³ adapters.*save_pretrained"):
        merger.save_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- clear refusals
def test_refusals(adapters, tmp_path):
    family, folders, _ = adapters["bert_family"]
    # the saved vectors contradict feedforward_modules: PEFT could not load them
    broken = tmp_path / "broken"
    broken.mkdir()
    saved = json.loads((folders["sst"] / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(saved | {"feedforward_modules": []}))
    (broken / "adapter_model.safetensors").write_bytes((folders["sst"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(IncompatibleSourceError, match=r"the IA³ vector of '.*output.dense' has shape \(1, \d+\), "
                                                      r"but by its feedforward_modules \[\] the layer is of attention"):
        SuperMerger(config(family.base, {"sst": folders["nli"], "broken": broken}))
    # an adapter type that is neither LoRA nor IA³
    (broken / "adapter_config.json").write_text(json.dumps(saved | {"peft_type": "LOHA"}))
    with pytest.raises(IncompatibleSourceError, match=r"is a 'LOHA' adapter; the adapters read are \['IA3', 'LORA'\]"):
        SuperMerger(config(family.base, {"sst": folders["nli"], "broken": broken}))
    # a layer whose weight is tied to another module's (GPT-2's LM head and input embedding)
    gpt2 = adapters["gpt2_family"][0]
    make_ia3(gpt2.base, tmp_path / "head", seed=8, task_type="CAUSAL_LM", target_modules=["lm_head"],
             feedforward_modules=[])
    with pytest.raises(IncompatibleSourceError, match=r"scales 'lm_head', whose weight is tied to another module's"):
        SuperMerger(config(gpt2.base, {"a": gpt2.sources["a"], "head": tmp_path / "head"}))
    # one layer scaled on its input by one source and on its output by the other: merged densely, no IA³ adapter
    make_ia3(family.base, tmp_path / "out", seed=7, num_labels=3, task_type="SEQ_CLS",
             target_modules=["output.dense"], feedforward_modules=[])
    merger = SuperMerger(config(family.base, {"sst": folders["sst"], "nli": tmp_path / "out"}))
    merger.apply_coefficients(table(merger, random_c(merger)))
    assert "encoder.layer.0.output.dense.weight" not in FunctionalMerge(merger.plan, dtype=torch.float32).scaled
    with pytest.raises(IncompatibleSourceError, match=r"on the input \(feed-forward type\) by some sources and on "
                                                      r"the output by others, e.g. '.*output.dense.weight'"):
        merger.save_adapter(tmp_path / "unused")
    # a LoRA rank: refused before anything is written
    merger = SuperMerger(config(family.base, folders))
    merger.apply_coefficients(table(merger, random_c(merger)))
    with pytest.raises(ValueError, match=r"rank=4 compresses a combined LoRA adapter"):
        merger.save_adapter(tmp_path / "rank", rank=4)
    assert not any((tmp_path / d).exists() for d in ("unused", "rank"))
