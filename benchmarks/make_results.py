"""Write benchmarks/RESULTS.md (and its two PNGs) from results/text5.json and the SuperMerge cells.

    python benchmarks/make_results.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results"
BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # "encoder.layer.3.attention..." -> "encoder.layer.3"


def table_markdown(methods: dict, tasks: list[str]) -> str:
    head = "| method | " + " | ".join(tasks) + " | mean | normalized | merge s | peak RSS MB |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for name, row in methods.items():
        cells = " | ".join(f"{row['per_task'][t]['mean']:.3f} ± {row['per_task'][t]['std']:.3f}" for t in tasks)
        norm = f"{row['normalized']:.3f}" if row.get("normalized") is not None else "-"
        lines.append(f"| {name} | {cells} | {row['mean']:.3f} | {norm} | {row['merge_seconds']:.0f} | "
                     f"{row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _cell_row(paths: list[Path], reference: dict, tasks: list[str]) -> tuple[list[float], float, float]:
    """Per-task accuracy, mean and normalized mean of cells (the mean over their seeds)."""
    cells = [json.loads(path.read_text())["per_task"] for path in paths]
    acc = [sum(c[t] for c in cells) / len(cells) for t in tasks]
    return acc, sum(acc) / len(tasks), sum(a / reference[t]["mean"] for a, t in zip(acc, tasks)) / len(tasks)


SWEEP_UNLABELLED = (0, 64, 480)  # `--unlabelled-per-task`; a cell without `-u`: the rest of the pool (512 - k)
POOL = 512  # examples per task pool


def _sweep_cells(method: str, k: int, u: int | None) -> list[Path]:
    """The cells of `method` at k labelled and u unlabelled examples per task (any seed); u = 512 - k includes
    the cells run with the pool's rest (no `-u` in their name)."""
    names = [f"{method}-k{k}-u{u}"] if u is not None else []
    if u is None or u == POOL - k:
        names.append(f"{method}-k{k}")
    return sorted(p for n in names for p in (RESULTS / "cells").glob(f"{n}-seed*.json"))


def sweep_markdown(reference: dict, tasks: list[str]) -> str | None:
    """Cells at 8, 32, 128 labelled examples per task (ties, the paper's SuperMerge, the default, the previous
    default, the TSV-M start without the head refit) and, for the last three, 0 / 64 / 480 (or the rest of the
    pool) unlabelled inputs; each row the mean over its seeds."""
    lines = ["| method | labelled per task | unlabelled per task | seeds | " + " | ".join(tasks) +
             " | mean | normalized |", "|" + "---|" * (len(tasks) + 6)]
    for method in ("ties", "supermerge_paper", "supermerge", "supermerge_row_distill", "supermerge_start_tsv_m"):
        for k in (8, 32, 128):
            sizes = sorted({u for u in SWEEP_UNLABELLED if u <= POOL - k} | {POOL - k})
            for u in (sizes if method not in ("ties", "supermerge_paper") else [None]):
                paths = _sweep_cells(method, k, u)
                if not paths:
                    continue
                acc, mean, norm = _cell_row(paths, reference, tasks)
                unlabelled = "-" if u is None else f"{u} (the rest)" if u == POOL - k else str(u)
                seeds = ", ".join(sorted(p.stem.rsplit("seed", 1)[1] for p in paths))
                lines.append(f"| {method} | {k} | {unlabelled} | {seeds} | " + " | ".join(f"{a:.3f}" for a in acc) +
                             f" | {mean:.3f} | {norm:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else None


def speed_markdown(speed: dict) -> str:
    step, ties = speed["step_time"], speed["ties_vs_mergekit"]
    return "\n".join([
        "| measurement | supermerge_hf | reference | ratio |", "|---|---|---|---|",
        f"| one step, {step['batch']} | coefficient step {step['coefficient_step_s']:.3f} s "
        f"({step['trained_numbers']['coefficients']} numbers trained) | fine-tuning step {step['finetune_step_s']:.3f} s "
        f"({step['trained_numbers']['finetune']:,} parameters) | {step['ratio_coefficient_over_finetune']:.2f} |",
        f"| TIES on the 5 fine-tunes (density {ties['density']}, λ {ties['lambda']}): wall s | "
        f"{ties['supermerge_hf']['wall_s']:.1f} | mergekit-pytorch {ties['mergekit_pytorch']['wall_s']:.1f} | "
        f"{ties['wall_ratio_ours_over_mergekit']:.2f} |",
        f"| same: peak RSS MB | {ties['supermerge_hf']['peak_rss_mb']:.0f} | {ties['mergekit_pytorch']['peak_rss_mb']:.0f} "
        f"| {ties['rss_ratio_ours_over_mergekit']:.2f} |",
        "", f"Max |difference| between the two TIES merges: {ties['max_abs_difference']:.2e}.",
    ])  # fmt: skip


def memory_markdown(memory: dict) -> str:
    lines = ["| mode | K sources | model MB | peak RSS MB | estimate MB | estimate error | RSS / model | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in memory["scaling"]:
        error = row["estimated_mb"] / row["peak_rss_mb"] - 1
        lines.append(f"| {row['mode']} | {row['num_sources']} | {row['model_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['estimated_mb']:.0f} | {error:+.1%} | {row['peak_rss_mb'] / row['model_mb']:.2f} | "
                     f"{row['seconds']:.0f} |")
    lines += ["", "Targets: " + "; ".join(f"{name}: {t['value']} (target {t['target']}, "
                                          f"{'met' if t['met'] else 'not met'})"
                                          for name, t in memory.get("targets", {}).items())]
    return "\n".join(lines)


def tuning_markdown(tuning: dict) -> str:
    lines = ["| variant (one knob changed) | seed | validation accuracy (mean of 5 tasks) | vs baseline | selected step "
             "| seconds |", "|---|---|---|---|---|---|"]
    baseline = {key.split("|")[2]: row["mean"] for key, row in tuning.items() if key.split("|")[1] == "baseline"}
    for key, row in tuning.items():
        _, variant, seed = key.split("|")
        delta = f"{row['mean'] - baseline[seed]:+.3f}" if seed in baseline and variant != "baseline" else ""
        lines.append(f"| {variant} | {seed.removeprefix('seed')} | {row['mean']:.3f} | {delta} | "
                     f"{row['selected_step']} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def bar_chart(methods: dict, tasks: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks)), 4))
    width = 0.8 / len(methods)
    for i, (name, row) in enumerate(methods.items()):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [row["per_task"][t]["mean"] for t in tasks], width,
               yerr=[row["per_task"][t]["std"] for t in tasks], label=name)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def coefficient_heatmap(coefficients: dict, path: Path) -> None:
    """Sources x blocks heatmap of a cell's learned coefficients, each block the mean of its tensors' values."""
    blocks: dict[str, list[int]] = {}  # a tensor's block: its name up to the first number, else its top module
    for g, name in enumerate(coefficients["groups"]):
        match = BLOCK.match(name)
        blocks.setdefault(match[1] if match else name.split(".", 1)[0], []).append(g)
    values = [[sum(row[g] for g in idx) / len(idx) for idx in blocks.values()] for row in coefficients["values"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(blocks) + 2.5), 1.2 + 0.45 * len(values)))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")  # tanh: within [-1, 1]
    ax.set_xticks(range(len(blocks)), list(blocks), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(values)), coefficients["tasks"])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title("learned coefficients c(w), mean per block", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ABLATION = ["supermerge_paper", "supermerge_distill", "supermerge_both", "supermerge_row", "supermerge_row_distill",
            "supermerge_singular", "supermerge_start_ties", "supermerge_start_tsv_m", "supermerge_refit", "supermerge"]


def ablation_markdown(tasks: list[str]) -> str | None:
    """One row per (cell, seed) of the learned merge's knobs (issue 15): the paper's setting, each knob alone, rows
    + distillation, the options on top of it, and the default (all of them but `_singular` and `_start_ties`)."""
    individual = RESULTS / "cells" / "individual-k32-seed0.json"
    if not individual.is_file():
        return None
    reference = json.loads(individual.read_text())["per_task"]
    rows = []
    for method in ABLATION:
        for path in sorted((RESULTS / "cells").glob(f"{method}-k32-seed*.json")):
            cell = json.loads(path.read_text())
            normalized = sum(cell["per_task"][t] / reference[t] for t in tasks) / len(tasks)
            rows.append(f"| {method} | {cell['seed']} | " + " | ".join(f"{cell['per_task'][t]:.3f}" for t in tasks)
                        + f" | **{normalized:.3f}** | {cell['details'].get('selected_step')} | "
                        f"{cell['merge_seconds']:.0f} | {cell['peak_rss_mb']:.0f} |")
    if len(rows) < 2:
        return None
    head = "| cell | seed | " + " | ".join(tasks) + " | normalized | selected step | merge s | peak RSS MB |"
    return "\n".join([
        "`supermerge_paper`: the paper (one tanh coefficient per tensor over the task vectors, from c = 0.3, "
        "cross-entropy on the 32 labels, the fine-tunes' heads). Knobs: `_distill` (KL to each task's fine-tune at "
        "T = 2 on its inputs: the labelled ones and the rest of its pool, 480 without labels; never the test "
        "split), `_both` (half labels, half distillation), `_row` (one coefficient per row of each block matrix, "
        "labels). `_row_distill`: rows + distillation (the default of earlier versions). On top of it: `_singular` "
        "(one coefficient per singular direction instead of per row), `_start_ties` / `_start_tsv_m` (learning "
        "starts from that merge, over its components), `_refit` (each head refit by distillation, 200 steps). "
        "`supermerge`, the default: `_start_tsv_m` + `_refit`. "
        "`merge s` is wall time on the 2 cores, often shared with other jobs (see the main table's note).", "",
        head, "|---|---|" + "---|" * len(tasks) + "---|---|---|---|", *rows])


def gen5_markdown(lora: dict, ia3: dict | None) -> str:
    """The gen-5 tables: rank-classification accuracy per adapter type, then greedy exact match of the individual
    adapters and of the SuperMerge merge (every method that has it, in fact), and the fine-tuning recipes."""
    tasks = list(next(iter(lora["methods"].values()))["per_task"])
    protocol = lora["protocol"]
    settings = protocol["settings"]
    text = [f"SmolLM2-135M-Instruct (PyPI `{protocol['base'].get('package')}`, dequantized; sha256 "
            f"`{protocol['base']['model_sha256'][:16]}…`), the text-5 tasks as chat instructions answered by "
            f"the label name; one adapter per task; rank-classification accuracy over the label names on "
            f"{settings['test_size']} test examples per task, mean ± std over seeds {settings['seeds']} of "
            f"{settings['examples_per_task']} labelled examples per task (`python benchmarks/gen5.py`).", ""]
    for title, data in (("LoRA sources (r 8, attention and MLP projections)", lora), ("IA³ sources", ia3)):
        if data:
            text += [f"### {title}", "", table_markdown(data["methods"], tasks), ""]
    lines = ["| sources | method | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 3)]
    for name, data in (("LoRA", lora), ("IA³", ia3)):
        for method, row in (data or {"methods": {}})["methods"].items():
            if "exact_match" in row and method in ("pretrained", "supermerge", "individual"):
                match = row["exact_match"]
                cells = " | ".join(f"{match['per_task'][t]['mean']:.3f}" for t in tasks)
                lines.append(f"| {name} | {method} | {cells} | {match['mean']:.3f} |")
    text += ["### Greedy exact match (the label name, then end of turn)", "", "\n".join(lines), ""]
    for name, data in (("LoRA", lora), ("IA³", ia3)):
        if data:
            recipe = data["protocol"]["recipe"]
            seconds = data["protocol"]["preparation_seconds"]["finetune_seconds"]
            text.append(f"{name} recipe: {json.dumps(recipe['peft'])}, {data['protocol']['settings']['finetune_steps']}"
                        f" steps of batch {recipe['batch_size']}, AdamW lr {recipe['learning_rate']}, answer tokens "
                        f"only; fine-tuning seconds: " + ", ".join(f"{t} {s:.0f}" for t, s in seconds.items()) + ".")
    return "\n".join(text)


def incremental_markdown(data: dict) -> str:
    forms = [f for f in ("scratch", "incremental", "cheap") if f in data]
    tasks = list(data[forms[0]]["per_task"])
    lines = ["Add the fifth task (austen) to a saved four-task SuperMerge (`benchmarks/incremental.py`): `scratch` "
             "merges all five anew; `incremental` = `from_pretrained(four).add_source(...)`, learning from the saved "
             "coefficients; `cheap` = `add_source(..., cheap=True)`, the four-task merge as one source. Same 32 "
             "labelled examples per task, seeds " + ", ".join(map(str, data[forms[0]]["seeds"])) + ". `scratch` "
             "learns 100 steps; `add_source` learns twice the step the four-task merge selected (its default: 40, "
             "80, 40 steps on these seeds). Seconds: construction (or `from_pretrained` + `add_source`) + `fit`, "
             "loading included (wall; CPU: process time), one torch thread, the machine otherwise idle but for "
             "short test runs.", "",
             "| form | " + " | ".join(tasks) + " | normalized | wall s | CPU s |",
             "|---|" + "---|" * len(tasks) + "---|---|---|"]
    for form in forms:
        row = data[form]
        lines.append(f"| {form} | " + " | ".join(f"{row['per_task'][t]:.3f}" for t in tasks)
                     + f" | **{row['normalized']:.3f}** ± {row['normalized_std']:.3f} | {row['seconds']:.0f} | "
                     f"{row.get('cpu_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    data = json.loads((RESULTS / "text5.json").read_text())
    methods = data["methods"]
    tasks = list(next(iter(methods.values()))["per_task"])
    bar_chart(methods, tasks, HERE / "text5_accuracy.png")
    cells = sorted((RESULTS / "cells").glob("supermerge-k32-seed0*.json"))
    if cells:
        coefficients = json.loads(cells[0].read_text())["details"]["coefficients"]
        coefficient_heatmap(coefficients, HERE / "text5_coefficients.png")
    protocol = json.dumps(data.get("protocol", {}), indent=1)
    text = [
        "# Benchmark results: text-5",
        "",
        "Generated by `python benchmarks/make_results.py` from `results/text5.json` (written by "
        "`python benchmarks/run_text5.py`). MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned per task with the recipe of "
        "`supermerge_hf.demo.finetune.finetune_classifier`; test accuracy, mean ± std over the seeds of the 32 "
        "labelled examples per task; `normalized` = mean over tasks of accuracy / the individual fine-tune's.",
        "",
        table_markdown(methods, tasks),
        "",
        "![Per-task test accuracy](text5_accuracy.png)",
        "",
    ]
    if cells:
        text += ["Learned SuperMerge coefficients (seed 0), sources x blocks (mean over each block's tensors):",
                 "", "![SuperMerge coefficients](text5_coefficients.png)", ""]
    sections = [
        ("Labelled and unlabelled examples per task (mean over the seeds run)",
         sweep_markdown(methods["individual"]["per_task"], tasks) if "individual" in methods else None),
        ("Flat vs hierarchical vs streaming SuperMerge, the paper's setting (seed 0)",
         table_markdown({m: r for m, r in d["methods"].items() if m.startswith("supermerge") and m not in
                         ("supermerge_none", "supermerge_block") or m == "individual"}, tasks)
         if (d := load("text5_memory_modes.json")) else None),
        ("LoRA variant (LoRA fine-tunes r=8 as sources)",
         table_markdown(d["methods"], tasks) if (d := load("lora/text5.json")) else None),
        ("Speed", speed_markdown(d) if (d := load("speed.json")) else None),
        ("Peak memory of learning (random BERT-large, `benchmarks/memory.py`)",
         memory_markdown(d) if (d := load("memory.json")) else None),
        ("Tuning SuperMerge's defaults (validation examples of the pool, `benchmarks/tune_supermerge.py`)",
         tuning_markdown(d) if (d := load("tuning.json")) else None),
        ("The learned merge, knob by knob (issue 15, per cell)", ablation_markdown(tasks)),
        ("Adding a task to a deployed merge (issue 16)",
         incremental_markdown(d) if (d := load("incremental.json")) else None),
        ("gen-5: merging adapters of an LLM (SmolLM2-135M-Instruct, issue 14.5)",
         gen5_markdown(d, load("gen5_ia3.json")) if (d := load("gen5.json")) else None),
    ]
    for title, body in sections:
        if body:
            text += [f"## {title}", "", body, ""]
    text += ["## Protocol", "", "```json", protocol, "```", ""]
    extra = HERE / "RESULTS_notes.md"
    if extra.is_file():
        text += [extra.read_text()]
    (HERE / "RESULTS.md").write_text("\n".join(text))
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
