"""TSV-M, Iso-C, Iso-CTS and LiNeS against plain formulas written here, through SuperMerger, and (if installed)
against fusion-bench's implementations of the authors' code."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.methods import ISO_LAMBDA_GRID, LAMBDA_GRID, Hyperparameter, get_method, iso_c, iso_cts, lines, tsv_m
from supermerge_hf.plan import layer_depths
from supermerge_hf.spectral import iso_c_merge, iso_cts_merge, nearest_orthogonal, tsv_merge

from .conftest import family_examples

CASES = [((12, 8), 3), ((8, 12), 2), ((16, 16), 4), ((10, 7), 3)]  # (matrix shape, sources)


def random_deltas(shape: tuple[int, ...], num_sources: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_sources, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def polar(a: torch.Tensor) -> torch.Tensor:
    """A (AᵀA)^(-1/2) (tall) or (AAᵀ)^(-1/2) A (wide), from an eigendecomposition: no SVD."""
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T
    values, vectors = torch.linalg.eigh(gram)
    inv_sqrt = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    return a @ inv_sqrt if tall else inv_sqrt @ a


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


# ---- the spectral math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,num_sources", CASES)
def test_nearest_orthogonal_is_the_polar_factor(shape, num_sources):
    a = random_deltas(shape, 1)[0]
    q = nearest_orthogonal(a)
    close(q, polar(a))
    small = min(shape)
    close(q.T @ q if shape[0] >= shape[1] else q @ q.T, torch.eye(small, dtype=q.dtype))


def tsv_by_loop(deltas: torch.Tensor) -> torch.Tensor:
    """The paper's steps one task at a time: keep k = r // S triplets each, orthogonalise the stacks, U S Vᵀ."""
    k = min(deltas.shape[1:]) // deltas.shape[0]
    us, ss, vhs = [], [], []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, dim=0))


@pytest.mark.parametrize("shape,num_sources", CASES)
def test_tsv_m_equals_a_loop_over_tasks(shape, num_sources):
    deltas = random_deltas(shape, num_sources)
    close(tsv_merge(deltas), tsv_by_loop(deltas))
    weights = torch.linspace(0.5, 1.5, num_sources, dtype=torch.float64)
    close(tsv_m(deltas, weights=weights, lam=0.7), 0.7 * tsv_by_loop(deltas * weights[:, None, None]))


def test_tsv_m_of_orthogonal_tasks_is_their_truncated_sum():
    # tasks in disjoint coordinates keep their top k = 7 // 2 = 3 directions; none interferes with another
    deltas = torch.zeros(2, 7, 7, dtype=torch.float64)
    deltas[0, :4, :4] = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    deltas[1, 4:, 4:] = torch.diag(torch.tensor([5.0, 4.0, 0.5], dtype=torch.float64))
    close(tsv_merge(deltas), torch.diag(torch.tensor([4.0, 3.0, 2.0, 0.0, 5.0, 4.0, 0.5], dtype=torch.float64)))


def test_tsv_m_keeps_one_direction_each_when_sources_outnumber_the_rank():
    deltas = random_deltas((2, 5), 3)  # r = 2 < S = 3: the authors' code would give 0
    assert torch.linalg.matrix_rank(tsv_merge(deltas)) == 2


@pytest.mark.parametrize("shape,num_sources", CASES)
def test_iso_c_flattens_the_spectrum_of_the_sum(shape, num_sources):
    deltas = random_deltas(shape, num_sources)
    total = deltas.sum(dim=0)
    mean = torch.linalg.svdvals(total).mean()
    merged = iso_c_merge(deltas)
    close(torch.linalg.svdvals(merged), mean.expand(min(shape)))
    close(merged, mean * polar(total))  # the same singular vectors as the sum
    close(iso_c(deltas, lam=1.5), 1.5 * merged)


def iso_cts_by_loop(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """The paper's Iso-CTS written out: common directions of the sum, then each task's own beyond them."""
    num_sources, rank = deltas.shape[0], min(deltas.shape[1:])
    common = int(rank * fraction)
    per_task = round((rank - common) / num_sources)
    common = rank - per_task * num_sources
    u, s, vh = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    projector = torch.eye(deltas.shape[1], dtype=deltas.dtype) - u[:, :common] @ u[:, :common].T
    for delta in deltas:
        ut, st, vht = torch.linalg.svd(projector @ delta, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    return torch.cat(ss).mean() * polar(torch.cat(us, dim=1)) @ polar(torch.cat(vhs, dim=0))


@pytest.mark.parametrize("fraction", [0.8, 0.5])
@pytest.mark.parametrize("shape,num_sources", CASES)
def test_iso_cts_equals_the_written_out_steps(shape, num_sources, fraction):
    deltas = random_deltas(shape, num_sources)
    merged = iso_cts_merge(deltas, fraction)
    close(merged, iso_cts_by_loop(deltas, fraction))
    spectrum = torch.linalg.svdvals(merged)
    close(spectrum, spectrum.mean().expand(min(shape)))  # flat
    rank = min(shape)
    common = rank - num_sources * round((rank - int(rank * fraction)) / num_sources)
    u_c = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)[0][:, :common]
    u_m = torch.linalg.svd(merged, full_matrices=False)[0]
    close(u_m @ (u_m.T @ u_c), u_c)  # the common subspace lies inside the merge's column space


def test_iso_cts_with_an_all_common_space_is_iso_c():
    deltas = random_deltas((12, 8), 3)
    close(iso_cts_merge(deltas, 1.0), iso_c_merge(deltas))


@pytest.mark.parametrize("method", [tsv_m, iso_c, iso_cts])
@pytest.mark.parametrize("shape", [(7,), (), (2, 3, 4)])
def test_other_tensors_take_the_mean(method, shape):
    deltas = random_deltas(shape, 3)
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    close(method(deltas, lam=2.0), 2.0 * deltas.mean(dim=0))
    close(method(deltas, weights=weights), (weights.view(-1, *[1] * len(shape)) * deltas).sum(dim=0) / 3)


@pytest.mark.parametrize("method", [tsv_m, iso_c, iso_cts])
def test_half_precision_is_merged_in_float32(method):
    deltas = random_deltas((12, 8), 3).to(torch.bfloat16)
    merged = method(deltas)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, method(deltas.float()).to(torch.bfloat16))


# ---- LiNeS and layer depths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0.0, 0.25, 1.0])
def test_lines_scales_by_depth(depth):
    deltas = random_deltas((5, 4), 3)
    close(lines(deltas, depth=depth, alpha=0.2, beta=0.6), (0.2 + 0.6 * depth) * deltas.sum(dim=0))
    close(lines(deltas, depth=depth, beta=0.6), (1 / 3 + 0.6 * depth) * deltas.sum(dim=0))  # α = 1 / S
    weights = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    close(lines(deltas, depth=depth, weights=weights, alpha=1.0, beta=1.0),
          (1.0 + depth) * (deltas[0] + 2 * deltas[2]))
    with pytest.raises(ValueError, match=r"`depth` .* must be in \[0, 1\], got 1.5"):
        lines(deltas, depth=1.5)


def test_layer_depths_ramp_per_stack():
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.2.output.dense.bias", "encoder.layer.4.output.LayerNorm.weight", "pooler.dense.weight",
             "decoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.1.DenseReluDense.wi.weight"]
    assert layer_depths(names) == {names[0]: 0.0, names[1]: 0.0, names[2]: 0.5, names[3]: 1.0, names[4]: 0.0,
                                   names[5]: 0.0, names[6]: 1.0}
    assert layer_depths(["h.0.attn.c_attn.weight", "wte.weight"]) == {"h.0.attn.c_attn.weight": 0.0,
                                                                     "wte.weight": 0.0}  # a stack of one block


def test_registry_declares_the_new_methods():
    assert get_method("lines").needs_depth and not any(get_method(m).needs_depth for m in ("tsv_m", "iso_c"))
    assert get_method("iso_c").hyperparameters["lam"].grid == ISO_LAMBDA_GRID and max(ISO_LAMBDA_GRID) == 3.0
    assert get_method("lines").hyperparameters["beta"].grid == LAMBDA_GRID
    assert get_method("tsv_m").url == "https://arxiv.org/abs/2412.00081"
    with pytest.raises(ValueError, match="`auto` hyperparameter needs the `grid`"):
        Hyperparameter(float, 1.0, auto=True)


# ---- through SuperMerger ------------------------------------------------------------------------------------


def config_for(family, method, **kwargs) -> SuperMergeConfig:
    return SuperMergeConfig(base=str(family.base), sources=family.source_list(), method=method, **kwargs)


def task_vectors(family, names):
    base = load_file(family.base / "model.safetensors")
    sources = [{k.removeprefix("bert."): v for k, v in load_file(p / "model.safetensors").items()}
               for p in family.sources.values()]
    return base, {n: torch.stack([s[n] - base[n] for s in sources]) for n in names}


@pytest.mark.parametrize("method,kwargs", [("tsv_m", {"lam": 0.8}), ("iso_c", {"lam": 1.5}),
                                           ("iso_cts", {"common_space_fraction": 0.5}),
                                           ("lines", {"alpha": 0.5, "beta": 0.25})])
def test_merge_is_base_plus_method(method, kwargs, bert_family):
    merger = SuperMerger(config_for(bert_family, method, method_kwargs=kwargs)).fit()
    base, deltas = task_vectors(bert_family, merger.plan.merged)
    lam = kwargs.get("lam", 1.0)
    for n, d in deltas.items():
        if method == "lines":  # two blocks: layer 0 at depth 0, layer 1 at depth 1; the rest scaled like layer 0
            expected = (0.5 + 0.25 * n.startswith("encoder.layer.1.")) * d.sum(dim=0)
        elif d.dim() != 3:
            expected = lam * d.mean(dim=0)
        else:
            matrix = {"tsv_m": tsv_merge, "iso_c": iso_c_merge}.get(method, lambda x: iso_cts_merge(x, 0.5))
            expected = lam * matrix(d)
        torch.testing.assert_close(merger.result.merged[n], base[n] + expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,key,grid", [("iso_c", "lam", ISO_LAMBDA_GRID), ("lines", "beta", LAMBDA_GRID)])
def test_auto_picks_from_the_method_grid(method, key, grid, bert_family, tmp_path):
    merger = SuperMerger(config_for(bert_family, method, method_kwargs={key: "auto"}, output_dir=str(tmp_path / "m")))
    merger.fit(family_examples(bert_family, n=4))
    scores = merger.result.grid_scores
    assert list(scores) == [f"{key}={v}" for v in grid]  # `lines` has no λ: only β is reported
    assert merger.chosen == {key: float(max(scores, key=scores.get).split("=")[1])}
    rebuilt = SuperMerger.from_pretrained(merger.save_pretrained())  # the choice is a hyperparameter of the method
    for name, tensor in merger.merged_tensors.items():
        assert torch.equal(rebuilt.merged_tensors[name], tensor), name


# ---- against fusion-bench (the authors' code), when installed -------------------------------------------------


@pytest.mark.parametrize("shape,num_sources", CASES)
def test_matches_fusion_bench(shape, num_sources):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fb_iso_c
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts as fb_iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    deltas, bias = random_deltas(shape, num_sources), random_deltas(shape[:1], num_sources, seed=1)
    state_dicts = [{"w": d.clone(), "b": b.clone()} for d, b in zip(deltas, bias)]
    ours = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}
    theirs = {"tsv_m": compute_and_sum_svd_mem_reduction(state_dicts, accelerator="cpu"),
              "iso_c": fb_iso_c(state_dicts, accelerator="cpu"),
              "iso_cts": fb_iso_cts(state_dicts, common_space_fraction=0.8, accelerator="cpu")}
    for name, merged in theirs.items():
        close(ours[name](deltas), merged["w"])
        close(ours[name](bias), merged["b"])
