import pytest
import torch
from peft.utils import merge_utils

from supermerge_hf.methods import (
    METHODS,
    average,
    dare_linear,
    dare_ties,
    get_method,
    magnitude_prune,
    register_method,
    task_arithmetic,
    ties,
)
from supermerge_hf.sparsify import magnitude_thresholds

# Three sources, four entries. Trimmed to density 0.5 per tensor (k = 2 per source):
#   [[ 6,  0,  0, -3],
#    [-3,  4,  0,  0],
#    [ 0, -6,  4,  0]]
DELTAS = torch.tensor(
    [
        [6.0, -1.0, 0.5, -3.0],
        [-3.0, 4.0, -1.5, 1.0],
        [3.0, -6.0, 4.0, -1.0],
    ]
)
# A second tensor of the same task vectors, for whole-task trimming.
OTHER = torch.tensor([[10.0, 0.1], [0.2, 0.3], [-0.4, 7.0]])
DARE_MASK = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]])


def expect(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=1e-6)


def test_registry_lists_all_methods():
    learned = ["adamerging", "adamerging_plus", "supermerge"]
    data_free = ["average", "dare_linear", "dare_ties", "iso_c", "iso_cts", "lines", "magnitude_prune",
                 "task_arithmetic", "ties", "tsv_m"]
    statistics = ["regmean", "regmean_plusplus", "prodistill"]  # computed from the inputs, no coefficient table
    assert sorted(METHODS) == sorted(learned + data_free + statistics)
    assert all(get_method(name).kind == "learned" and get_method(name).merge is None for name in learned)
    assert all(get_method(name).kind == "data_free" and callable(get_method(name).merge) for name in data_free)
    assert all(get_method(name).kind == "statistics" and callable(get_method(name).merge) for name in statistics)
    assert get_method("ties").merge is ties
    assert get_method("ties").url == "https://arxiv.org/abs/2306.01708"
    assert get_method("supermerge").url == "https://arxiv.org/abs/2412.10416"


def test_unknown_method_lists_known_names():
    known = r"Known methods: \['adamerging', .*'ties', 'tsv_m'\]"
    with pytest.raises(ValueError, match=r"Unknown merge method 'tie'\. " + known):
        get_method("tie")


def test_register_twice_or_mismatched_kind_raises():
    with pytest.raises(ValueError, match="'ties' is already registered"):
        register_method("ties", description="", url="")(ties)
    with pytest.raises(TypeError, match=r"give a merge function \(data-free\) or an objective \(learned\), not both"):
        register_method("new_learned", description="", url="", objective="supervised")(ties)
    with pytest.raises(TypeError, match="not both"):  # a data-free method needs its merge function
        register_method("new_data_free", description="", url="")(None)
    assert "new_learned" not in METHODS and "new_data_free" not in METHODS


def test_average():
    expect(average(DELTAS), [2.0, -1.0, 1.0, -1.0])
    expect(average(DELTAS, weights=torch.tensor([1.0, 2.0, 1.0])), [0.75, 0.25, 0.375, -0.5])


def test_task_arithmetic():
    expect(task_arithmetic(DELTAS), [6.0, -3.0, 3.0, -3.0])
    expect(task_arithmetic(DELTAS, lam=0.5), [3.0, -1.5, 1.5, -1.5])
    expect(task_arithmetic(DELTAS, weights=torch.tensor([1.0, 2.0, 1.0])), [3.0, 1.0, 1.5, -2.0])


def test_magnitude_prune():
    expect(magnitude_prune(DELTAS, density=0.5), [3.0, -2.0, 4.0, -3.0])
    weights = torch.tensor([1.0, 0.0, 1.0])
    expect(magnitude_prune(DELTAS, density=0.5, lam=2.0, weights=weights), [12.0, -12.0, 8.0, -6.0])


def test_ties():
    expect(ties(DELTAS, density=0.5), [6.0, -6.0, 4.0, -3.0])
    expect(ties(DELTAS, density=0.5, lam=0.5), [3.0, -3.0, 2.0, -1.5])
    # signs of the trimmed entries per column: (+, -, 0), (0, +, -), (0, 0, +), (-, 0, 0): ties elect +1
    expect(ties(DELTAS, density=0.5, majority_sign_method="frequency"), [6.0, 4.0, 4.0, -3.0])
    # column 1: the unweighted sum 4 - 6 elects -, although the weighted one 8 - 3 would elect + (mergekit)
    expect(ties(DELTAS, density=0.5, weights=torch.tensor([1.0, 2.0, 0.5])), [6.0, -3.0, 2.0, -3.0])
    # no trimming: the disjoint mean divides by the number of agreeing sources
    expect(ties(DELTAS, density=1.0), [4.5, -3.5, 2.25, -2.0])


def test_whole_task_trimming_by_hand():
    # k = int(0.5 * 6) = 3 of the 6 entries per source: thresholds 3, 1.5 and 4
    threshold = magnitude_thresholds([DELTAS, OTHER], density=0.5)
    expect(threshold, [3.0, 1.5, 4.0])
    # source 1 now keeps -1.5 in column 2; per tensor it did not
    expect(magnitude_prune(DELTAS, density=0.5, trim_scope="task", threshold=threshold), [3.0, -2.0, 2.5, -3.0])
    expect(ties(DELTAS, density=0.5, trim_scope="task", threshold=threshold), [6.0, -6.0, 4.0, -3.0])
    expect(ties(OTHER, density=0.5, trim_scope="task", threshold=threshold), [10.0, 7.0])


def test_dare_with_given_mask():
    # dropped and rescaled by 1 / 0.5: [[12, 0, 1, 0], [0, 8, -3, 0], [6, -12, 0, -2]]
    expect(dare_linear(DELTAS, density=0.5, mask=DARE_MASK), [18.0, -4.0, -2.0, -2.0])
    expect(dare_ties(DELTAS, density=0.5, mask=DARE_MASK), [9.0, -12.0, -3.0, -2.0])
    expect(dare_ties(DELTAS, density=0.5, mask=DARE_MASK, lam=0.5), [4.5, -6.0, -1.5, -1.0])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match=r"`density` .* in \(0, 1\], got 1.5"):
        ties(DELTAS, density=1.5)
    with pytest.raises(ValueError, match=r"`density` .* got 0"):
        dare_linear(DELTAS, density=0)
    with pytest.raises(ValueError, match=r"`majority_sign_method` must be one of \['total', 'frequency'\], got 'sum'"):
        ties(DELTAS, majority_sign_method="sum")
    with pytest.raises(ValueError, match=r"`trim_scope` must be one of \['tensor', 'task'\], got 'layer'"):
        magnitude_prune(DELTAS, trim_scope="layer")
    with pytest.raises(ValueError, match='trim_scope="task" needs `threshold`'):
        ties(DELTAS, trim_scope="task")
    with pytest.raises(ValueError, match='only used with trim_scope="task"'):
        ties(DELTAS, threshold=torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3,\), got shape \(2,\)"):
        task_arithmetic(DELTAS, weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"shape of `deltas` \(3, 4\), got \(3, 2\)"):
        dare_linear(DELTAS, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="sum of `weights`, which is 0"):
        average(DELTAS, weights=torch.tensor([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="`delta_chunks` is empty"):
        magnitude_thresholds([], density=0.5)


# ---- agreement with peft.utils.merge_utils on random tensors ------------------------------------------------

SHAPES = [(7,), (13, 11), (4, 5, 6)]


@pytest.fixture(params=SHAPES, ids=str)
def random_case(request):
    generator = torch.Generator().manual_seed(len(request.param))
    deltas = torch.randn(3, *request.param, generator=generator)  # (S, *shape)
    weights = torch.rand(3, generator=generator) + 0.5  # (S,)
    return deltas, weights


def test_task_arithmetic_matches_peft(random_case):
    deltas, weights = random_case
    expected = merge_utils.task_arithmetic(list(deltas), weights)
    torch.testing.assert_close(task_arithmetic(deltas, weights=weights), expected)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_magnitude_prune_matches_peft(random_case, density):
    deltas, weights = random_case
    expected = merge_utils.magnitude_prune(list(deltas), weights, density)
    torch.testing.assert_close(magnitude_prune(deltas, weights=weights, density=density), expected)


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_ties_matches_peft(random_case, density, majority_sign_method):
    deltas, weights = random_case
    expected = merge_utils.ties(list(deltas), weights, density, majority_sign_method)
    actual = ties(deltas, weights=weights, density=density, majority_sign_method=majority_sign_method)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("peft_fn,ours", [(merge_utils.dare_linear, dare_linear), (merge_utils.dare_ties, dare_ties)])
def test_dare_matches_peft_with_same_seed(random_case, peft_fn, ours):
    deltas, weights = random_case
    torch.manual_seed(1234)  # peft draws its masks from the global generator, one source after the other
    expected = peft_fn(list(deltas), weights, 0.4)
    actual = ours(deltas, weights=weights, density=0.4, generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(actual, expected)


def test_dare_same_generator_seed_same_result(random_case):
    deltas, _ = random_case
    first = dare_ties(deltas, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, dare_ties(deltas, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(first, dare_ties(deltas, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("density", [0.1, 0.25, 0.6])
def test_whole_task_trimming_equals_trimming_the_concatenation(density):
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, *shape, generator=generator) * scale for shape, scale in zip(SHAPES, (0.1, 1.0, 3.0))]
    weights = torch.tensor([0.3, 1.0, 0.7])
    flat = torch.cat([chunk.flatten(1) for chunk in chunks], dim=1)  # (S, N)
    sizes = [chunk[0].numel() for chunk in chunks]
    threshold = magnitude_thresholds(chunks, density)  # (S,)
    torch.testing.assert_close(threshold, magnitude_thresholds([flat], density))
    for method in (ties, magnitude_prune):
        expected = method(flat, weights=weights, density=density).split(sizes)
        for chunk, chunk_expected in zip(chunks, expected):
            actual = method(chunk, weights=weights, density=density, trim_scope="task", threshold=threshold)
            torch.testing.assert_close(actual.flatten(), chunk_expected, rtol=0, atol=0)
    # and the concatenation trimmed per tensor is peft's trimming of the whole task vector
    expected = merge_utils.ties(list(flat), weights, density)
    torch.testing.assert_close(ties(flat, weights=weights, density=density), expected)
