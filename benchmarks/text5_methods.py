"""The methods of the text-5 benchmark: one function per method name, run on one `Cell`.

`RUNNERS[name](cell)` merges and evaluates through the package's public API (`SuperMergeConfig`, `SuperMerger`,
`SuperMerger.evaluate`) and returns an `Outcome`: the test accuracy per task, the merge time, and details
(chosen λ, selected step, learned coefficients). `run_text5.py` runs the cells; to add a method, add a
function here with `@runner(name)` and its name to `METHOD_ORDER`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from build_data import HERE
from finetune_all import FINETUNES
from multitask import MULTITASK
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.demo.finetune import evaluate_accuracy

METHOD_ORDER = ["pretrained", "average", "task_arithmetic", "ties", "dare_ties", "tsv_m", "iso_c", "iso_cts", "lines",
                "regmean", "regmean_plusplus", "prodistill", "adamerging", "supermerge_paper", "supermerge_none",
                "supermerge_block", "supermerge_distill", "supermerge_both", "supermerge_row", "supermerge_row_distill",
                "supermerge_singular", "supermerge_start_ties", "supermerge_start_tsv_m", "supermerge_refit",
                "supermerge", "individual", "multitask"]  # fmt: skip
# memory modes of SuperMerge (issue 6), run on request (`--methods`): not part of the main table by default
MEMORY_MODES = ["supermerge_hier2", "supermerge_hier3", "supermerge_streaming"]
TASK_VECTORS = {"start": "constant", "refit_heads": 0}  # learning over the task vectors, the fine-tunes' heads
DISTILL = {"objective": "distill", "temperature": 2.0} | TASK_VECTORS  # the distillation cells' method_kwargs
PAPER = {"granularity": "tensor", "transform": "tanh",
         "method_kwargs": {"objective": "labels"} | TASK_VECTORS}  # arXiv 2412.10416
QUICK_METHODS = ["pretrained", "average", "task_arithmetic", "ties", "supermerge", "individual"]
QUICK = {"tasks": ["bbc", "spam"], "seeds": [0], "test_size": 100, "finetune_steps": 30, "learn_steps": 10}


@dataclass(frozen=True)
class Settings:
    """What a run computes; a cached cell is reused only when its settings are these."""

    tasks: list[str]
    seeds: list[int]
    examples_per_task: int = 32
    unlabelled_per_task: int | None = None  # inputs without labels beyond the labelled ones; None: the pool's rest
    test_size: int | None = None  # None: each task's whole test split
    finetune_steps: int = 300  # of each individual fine-tune; multitask takes tasks x this
    learn_steps: int | None = None  # of the learned methods; None: the package default
    quick: bool = False
    lora: bool = False  # the LoRA variant: PEFT LoRA fine-tunes (r=8) as the sources
    code: str = ""  # fingerprint of the supermerge_hf sources when the run started ("" to ignore code changes)

    @property
    def cache(self) -> Path:
        return HERE / "cache" / "quick" if self.quick else HERE / "cache"

    @property
    def results(self) -> Path:
        root = HERE / "results" / "quick" if self.quick else HERE / "results"
        return root / "lora" if self.lora else root

    def finetune_dir(self, task: str) -> Path:
        if self.lora:
            return self.cache / "lora_finetunes" / task
        return self.cache / "finetunes" / task if self.quick else FINETUNES / task

    @property
    def multitask_dir(self) -> Path:
        return self.cache / "multitask" if self.quick else MULTITASK


@dataclass
class Cell:
    """Everything one method run may use."""

    settings: Settings
    seed: int
    base: Path
    finetunes: dict[str, Path]
    labelled: dict[str, list[dict]]  # tokenised, `labels` included: the only labels a method may read
    test: dict[str, list[dict]]  # tokenised test examples, `labels` included, for evaluation only
    test_text: dict[str, list[dict]]  # the same, as {"text", "label"}, for models evaluated as plain HF models
    unlabelled: dict[str, list[dict]] = field(default_factory=dict)  # the rest of the pool, inputs only

    @property
    def tasks(self) -> list[str]:
        return self.settings.tasks


@dataclass
class Outcome:
    per_task: dict[str, float]  # test accuracy
    merge_seconds: float
    details: dict = field(default_factory=dict)  # chosen hyperparameters, selected step, ...


RUNNERS: dict[str, Callable[[Cell], Outcome]] = {}
USES_EXAMPLES: dict[str, bool] = {}


def runner(name: str, *, uses_examples: bool = True):
    """Register the function that runs method `name` on a cell."""

    def register(fn: Callable[[Cell], Outcome]) -> Callable[[Cell], Outcome]:
        RUNNERS[name], USES_EXAMPLES[name] = fn, uses_examples
        return fn

    return register


# ---- the methods --------------------------------------------------------------------------------------------


def make_config(cell: Cell, **overrides) -> SuperMergeConfig:
    learn_steps = cell.settings.learn_steps
    steps = {"steps": learn_steps, "eval_every": max(1, learn_steps // 2)} if learn_steps else {}
    return SuperMergeConfig(
        base=str(cell.base),
        sources=[{"task": t, "path": str(p)} for t, p in cell.finetunes.items()],
        examples_per_task=cell.settings.examples_per_task,
        seed=cell.seed,
        **steps,
        **overrides,
    )


def test_accuracy(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Accuracy per task, from `SuperMerger.evaluate`'s metrics."""
    return {task: m["accuracy"] for task, m in metrics.items()}


def merge_and_evaluate(cell: Cell, *, unlabelled: bool = False, **overrides) -> Outcome:
    """Merge with `SuperMerger` (fit on the cell's labelled examples, and with `unlabelled` the rest of the pool's
    inputs) and evaluate every task's test split."""
    start = time.perf_counter()
    merger = SuperMerger(make_config(cell, **overrides))
    merger.fit(cell.labelled, unlabelled=cell.unlabelled if unlabelled else None)
    seconds = time.perf_counter() - start
    details = {"chosen": merger.chosen, "selected_step": merger.selected_step, "history": merger.history}
    if merger.coefficients is not None:  # "tasks": the key of the committed cells (make_results.py reads it)
        details["coefficients"] = {"tasks": merger.coefficients.sources, "groups": merger.coefficients.groups,
                                   "values": merger.coefficients.values.tolist()}  # fmt: skip
    return Outcome(test_accuracy(merger.evaluate(cell.test)), seconds, details)


@runner("pretrained", uses_examples=False)
def run_pretrained(cell: Cell) -> Outcome:
    # The base body with each task's own (fine-tuned) head: task arithmetic with λ = 0, not timed.
    merger = SuperMerger(make_config(cell, method="task_arithmetic", method_kwargs={"lam": 0.0}))
    merger.fit(cell.labelled)  # data-free with a fixed λ: the examples are not read
    return Outcome(test_accuracy(merger.evaluate(cell.test)), 0.0)


@runner("individual", uses_examples=False)
def run_individual(cell: Cell) -> Outcome:
    # Each fine-tune on its own task (its source alone, with its own head).
    return Outcome(test_accuracy(SuperMerger(make_config(cell)).evaluate(cell.test, finetunes=True)), 0.0)


@runner("average", uses_examples=False)
def run_average(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="average")


@runner("task_arithmetic")
def run_task_arithmetic(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="task_arithmetic", method_kwargs={"lam": "auto"})


@runner("ties")
def run_ties(cell: Cell) -> Outcome:
    # Trimmed over each whole task vector, as the TIES paper (and fusion-bench); λ from the grid.
    return merge_and_evaluate(cell, method="ties", method_kwargs={"lam": "auto", "density": 0.2, "trim_scope": "task"})


@runner("dare_ties")
def run_dare_ties(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="dare_ties", method_kwargs={"lam": "auto", "density": 0.5})


@runner("tsv_m")
def run_tsv_m(cell: Cell) -> Outcome:
    # data-free (method.md section 10); its scale λ picked on the labelled examples like every baseline's
    return merge_and_evaluate(cell, method="tsv_m", method_kwargs={"lam": "auto"})


@runner("iso_c")
def run_iso_c(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="iso_c", method_kwargs={"lam": "auto"})


@runner("iso_cts")
def run_iso_cts(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="iso_cts", method_kwargs={"lam": "auto"})


@runner("lines")
def run_lines(cell: Cell) -> Outcome:
    # α = 1/S for the summed task vectors (the paper's), β picked on the labelled examples
    return merge_and_evaluate(cell, method="lines", method_kwargs={"beta": "auto"})


@runner("regmean")
def run_regmean(cell: Cell) -> Outcome:
    # Each linear layer from the Gram matrices of its inputs through each fine-tune (method.md section 10), on the
    # same inputs as distillation: the 32 labelled examples' and the rest of the pool's (labels unread); α = 0.9.
    return merge_and_evaluate(cell, unlabelled=True, method="regmean")


@runner("regmean_plusplus")
def run_regmean_plusplus(cell: Cell) -> Outcome:
    # RegMean block by block, each block's inputs taken through the blocks merged before it
    return merge_and_evaluate(cell, unlabelled=True, method="regmean_plusplus")


@runner("prodistill")
def run_prodistill(cell: Cell) -> Outcome:
    # element-wise coefficients block by block (method.md section 9): each task's first 64 inputs (its 32 labelled
    # ones' and 32 of the pool's, labels unread), Adam at 1e-2, 100 steps per block
    return merge_and_evaluate(cell, unlabelled=True, method="prodistill")


@runner("adamerging")
def run_adamerging(cell: Cell) -> Outcome:
    # Per-tensor ("layer-wise") coefficients, entropy of the predictions on the examples (labels unused).
    return merge_and_evaluate(cell, method="adamerging", granularity="tensor")


@runner("supermerge")
def run_supermerge(cell: Cell) -> Outcome:
    # the package's default: one coefficient per row of each block matrix over each source's TSV-M component
    # (`start: auto` on full fine-tunes), learned by distilling each fine-tune on its task's inputs (the labelled
    # ones and the rest of the pool, labels unread; the labelled hold-out selects), then each task's classifier
    # refit on the merged body by distillation from its fine-tune (`refit_heads: 200`)
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge")


@runner("supermerge_row_distill")
def run_supermerge_row_distill(cell: Cell) -> Outcome:
    # the default of sessions 18-21: per row, distillation, over the task vectors from c = 0.3, the fine-tunes' heads
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge", method_kwargs=TASK_VECTORS)


@runner("supermerge_singular")
def run_supermerge_singular(cell: Cell) -> Outcome:
    # `supermerge_row_distill` with one coefficient per singular direction of each source's task vector of a block
    # matrix instead of per row (method.md section 9): U_i diag(c_i S_i) V_i^T
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge", granularity="singular",
                              method_kwargs=TASK_VECTORS)


@runner("supermerge_start_ties")
def run_supermerge_start_ties(cell: Cell) -> Outcome:
    # `supermerge_row_distill` learning from the TIES merge (top 20 % of each whole task vector, elected sign, λ
    # picked on the labelled examples as the `ties` cell picks it) over each source's TIES component
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge", method_kwargs={"start": "ties",
                                                                                          "refit_heads": 0})


@runner("supermerge_start_tsv_m")
def run_supermerge_start_tsv_m(cell: Cell) -> Outcome:
    # the default without the head refit: learning from the TSV-M merge over each source's TSV-M component
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge", method_kwargs={"start": "tsv_m",
                                                                                          "refit_heads": 0})


@runner("supermerge_refit")
def run_supermerge_refit(cell: Cell) -> Outcome:
    # the default learning over the task vectors from c = 0.3 instead of the TSV-M components, heads refit
    # (200 full-batch Adam steps on the labelled and unlabelled inputs' cached features)
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge", method_kwargs={"start": "constant",
                                                                                          "refit_heads": 200})


@runner("supermerge_paper")
def run_supermerge_paper(cell: Cell) -> Outcome:
    # the paper: one tanh coefficient per tensor, cross-entropy on the labelled examples
    return merge_and_evaluate(cell, method="supermerge", **PAPER)


@runner("supermerge_none")
def run_supermerge_none(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="supermerge", **PAPER | {"transform": "none"})


@runner("supermerge_block")
def run_supermerge_block(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="supermerge", **PAPER | {"granularity": "block"})


@runner("supermerge_distill")
def run_supermerge_distill(cell: Cell) -> Outcome:
    # Beyond the paper (method.md section 9): each fine-tune's outputs on its task's inputs (the 32 labelled ones
    # and the rest of the pool, labels unread) are the target; the labelled hold-out still selects the step.
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge", **PAPER | {"method_kwargs": DISTILL})


@runner("supermerge_both")
def run_supermerge_both(cell: Cell) -> Outcome:
    # half the labels' cross-entropy, half the distillation loss
    return merge_and_evaluate(cell, unlabelled=True, method="supermerge",
                              **PAPER | {"method_kwargs": DISTILL | {"objective": "both"}})


@runner("supermerge_row")
def run_supermerge_row(cell: Cell) -> Outcome:
    # the same capacity learned from the 32 labels alone: what distillation adds to it
    return merge_and_evaluate(cell, method="supermerge", **PAPER | {"granularity": "row"})


@runner("supermerge_hier2")
def run_supermerge_hier2(cell: Cell) -> Outcome:
    # groups of 2 by cosine similarity of the task vectors, then the group results merged (method.md section 4)
    return merge_and_evaluate(cell, method="supermerge", hierarchical={"group_size": 2}, **PAPER)


@runner("supermerge_hier3")
def run_supermerge_hier3(cell: Cell) -> Outcome:
    return merge_and_evaluate(cell, method="supermerge", hierarchical={"group_size": 3}, **PAPER)


@runner("supermerge_streaming")
def run_supermerge_streaming(cell: Cell) -> Outcome:
    # task vectors and base re-read from disk tensor by tensor: the same merge as `supermerge`, less memory
    return merge_and_evaluate(cell, method="supermerge", streaming=True, **PAPER)


@runner("multitask", uses_examples=False)
def run_multitask(cell: Cell) -> Outcome:
    # One body with one head per task (benchmarks/multitask.py, trained before the cells): a plain HF model.
    folder = cell.settings.multitask_dir
    recipe = json.loads((folder / "multitask.json").read_text())
    accuracy = {}
    for task in cell.tasks:
        model = AutoModelForSequenceClassification.from_pretrained(folder / task, dtype=torch.float32)
        accuracy[task] = evaluate_accuracy(model, AutoTokenizer.from_pretrained(folder / task), cell.test_text[task])
    return Outcome(accuracy, recipe["train_seconds"], {"recipe": recipe, "merge_seconds": "training time"})
