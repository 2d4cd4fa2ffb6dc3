"""The model card of a merge: Hub metadata (`base_model_relation: merge`) and what was merged, how."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .merger import SuperMerger

TEMPLATE = """---
{card_data}
---

# {title}

This model merges {num_sources} fine-tunes of [`{base}`]({base_link}) with
[supermerge_hf](https://arxiv.org/abs/2412.10416) (method: `{method}`).

## Sources

| task | source | revision |
|---|---|---|
{source_rows}

## Recipe

```yaml
{recipe}```

{coefficients_section}
## Loading

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{name}")
```
{heads_section}"""


def _link(path: str) -> str:
    return f"https://huggingface.co/{path}" if not Path(path).exists() else path


def build_model_card(merger: SuperMerger, save_directory: str | Path) -> ModelCard:
    """A `ModelCard` whose metadata lists the sources as `base_model` with `base_model_relation: merge`."""
    cfg = merger.config
    data = ModelCardData(
        base_model=[s.path for s in cfg.sources],
        base_model_relation="merge",
        library_name="transformers",
        tags=["merge", "supermerge", cfg.method],
    )
    commits = merger.merge_info()["source_commits"]
    rows = "\n".join(f"| {s.task} | `{s.path}` | {commits.get(s.task) or s.revision or '-'} |" for s in cfg.sources)
    coefficients = ""
    if merger.coefficients is not None:
        lines = ["## Learned coefficients", "", "| task | mean | min | max |", "|---|---|---|---|"]
        for task, row in zip(merger.coefficients.tasks, merger.coefficients.values):
            lines.append(f"| {task} | {row.mean():.3f} | {row.min():.3f} | {row.max():.3f} |")
        lines += ["", f"Per group values ({len(merger.coefficients.groups)} groups): `coefficients.json`.", ""]
        coefficients = "\n".join(lines) + "\n"
    heads = [t for t, names in merger.plan.task_specific.items() if names]
    heads_section = ""
    if heads:
        heads_section = (
            "\nTasks with their own head ("
            + ", ".join(f"`{t}`" for t in heads)
            + ") load as complete models with:\n\n```python\nfrom supermerge_hf import load_task_model\n\n"
            + f'model = load_task_model("{Path(save_directory).name}", "{heads[0]}")\n```\n'
        )
    recipe = cfg.to_yaml_string()
    content = TEMPLATE.format(
        card_data=data.to_yaml(),
        title=f"Merge of {', '.join(cfg.tasks)}",
        num_sources=len(cfg.sources),
        base=cfg.base,
        base_link=_link(cfg.base),
        method=cfg.method,
        source_rows=rows,
        recipe=recipe,
        coefficients_section=coefficients,
        name=Path(save_directory).name,
        heads_section=heads_section,
    )
    return ModelCard(content)
