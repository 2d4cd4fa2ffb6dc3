"""Recipes: a `SuperMergeConfig` in YAML whose sources also name their labelled examples (`data`), read with
paths relative to the recipe; mergekit-style per-source `weight` / `density` become the method's."""

import inspect
import logging
from pathlib import Path
from typing import Any

import yaml

from .config import SourceConfig, SuperMergeConfig
from .methods import METHODS

logger = logging.getLogger(__name__)
DATA_ENTRY = "`data: {path: FILE.jsonl, text_field: ..., label_field: ...}`"
RECIPE_HELP = """\
A recipe is a YAML file holding a SuperMergeConfig (fields below); each source may also have a `data` entry: the
labelled examples of its task, a JSONL or CSV file tokenised with the base's tokenizer (keys: path, text_field,
label_field, text_pair_field, max_length; labels are integers or names of the fine-tune's label2id). A generative
task's (a causal or seq2seq LM) holds prompt/completion, messages, text or source/target records, answers labelled
(keys: path, format, fields, max_length; `generative.tokenize_examples`). An `unlabelled` entry (same keys, labels
never read) gives more inputs without labels, for SuperMerge's distillation (the default `objective: distill`,
or `both`) and AdaMerging.
Relative paths are relative to the recipe.

  base: sentence-transformers/all-MiniLM-L6-v2
  sources:
    - {task: bbc, path: ./finetunes/bbc, data: {path: bbc.jsonl, text_field: text, label_field: label}}
    - {task: tweets, path: org/minilm-tweets, revision: main, data: {path: tweets.csv, label_field: sentiment}}
    - {task: spam, path: ./finetunes/spam, data: {path: spam.jsonl}, unlabelled: {path: spam_inputs.jsonl}}
  output_dir: merged

SuperMergeConfig fields:""" + inspect.cleandoc(SuperMergeConfig.__doc__ or "").partition("Args:")[2] + (
    "\n\nEach source: " + inspect.cleandoc(SourceConfig.__doc__ or "") + " mergekit-style per-source `weight` and "
    "`density` (or `parameters: {weight, density}`) become the method's `weights` list and `density`."
    "\n\nMethods (`supermerge methods` lists their hyperparameters): " + ", ".join(sorted(METHODS)) + ".")
# fields documented once, in config.py


def _beside(recipe: Path, value: str) -> str:
    """A model path of the recipe: the folder relative to the recipe if it exists there (or starts with "."),
    else a Hub repo id."""
    local = recipe.parent / value
    if local.exists() or value.startswith("."):
        logger.info("%r in %s: the local folder %s", value, recipe.name, local)
        return str(local)
    logger.info("%r in %s: no such folder beside the recipe, read as a Hub repo id", value, recipe.name)
    return value


def _source_parameters(raw: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any]:
    """The recipe's `method_kwargs` with mergekit-style per-source `weight` / `density` (or `parameters: {weight,
    density}`, taken out of `sources`) as the method's `weights` list and its one `density`; `ValueError` where
    the method has no such hyperparameter."""
    method = METHODS.get(raw.get("method", "supermerge"))
    given = [s.pop("parameters", None) or {} for s in sources]
    given = [g | {k: s.pop(k) for k in ("weight", "density") if k in s} for g, s in zip(given, sources)]
    kwargs = dict(raw.get("method_kwargs") or {})
    for key, target in (("weight", "weights"), ("density", "density")):
        if not any(key in g for g in given) or method is None:
            continue
        if target not in method.hyperparameters or target in kwargs:
            raise ValueError(f"Per-source `{key}` is read by methods with a `{target}` hyperparameter "
                             f"({sorted(n for n, m in METHODS.items() if target in m.hyperparameters)}), and not "
                             f"beside `method_kwargs.{target}`; method {method.name!r} has "
                             f"{sorted(method.hyperparameters) or 'none'}.")
        values = [g.get(key, 1.0 if key == "weight" else None) for g in given]
        if key == "density" and len(set(values)) != 1:
            raise ValueError(f"Per-source densities {values} differ: {method.name!r} trims every source to one "
                             "density; give the same `density` to every source, or `method_kwargs.density`.")
        kwargs[target] = values if key == "weight" else values[0]
    return kwargs


def read_recipe(path: str | Path, *, need_data: bool = True) -> tuple[SuperMergeConfig, dict[str, dict[str, Any]]]:
    """Split a recipe into the config and its files of examples: `{"labelled": {task: its `data` entry},
    "unlabelled": {task: its `unlabelled` entry}}` (inputs without labels, for `objective: distill` and
    AdaMerging); raises `FileNotFoundError` for a missing recipe or (with `need_data`) examples file, `ValueError`
    for invalid YAML, a recipe of another shape, an entry without `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"Recipe {str(path)!r} is not valid YAML: {err}") from None
    sources = raw.get("sources", []) if isinstance(raw, dict) else None
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise ValueError(f"Recipe {str(path)!r} must be a mapping of config fields whose `sources` is a list of "
                         "{task, path} entries (see `supermerge merge --help`).")
    data: dict[str, dict[str, Any]] = {"labelled": {}, "unlabelled": {}}
    for source in sources:
        for key, kind in (("data", "labelled"), ("unlabelled", "unlabelled")):
            spec = source.pop(key, None)
            if spec is None:
                continue
            if not isinstance(spec, dict) or "path" not in spec:
                raise ValueError(f"Source {source.get('task')!r} in {path} needs " + (DATA_ENTRY if key == "data" else
                                 "`unlabelled: {path: FILE.jsonl, text_field: ...}`") + " with its examples.")
            file = path.parent / spec["path"]  # an absolute path stays as it is
            if need_data and not file.is_file():
                raise FileNotFoundError(f"Examples file {str(file)!r} of task {source.get('task')!r} does not exist.")
            data[kind][source["task"]] = spec | {"path": file}
        if isinstance(source.get("path"), str):
            source["path"] = _beside(path, source["path"])
    raw["method_kwargs"] = _source_parameters(raw, sources)
    if isinstance(raw.get("base"), str):
        raw["base"] = _beside(path, raw["base"])
    if isinstance(raw.get("chat_template"), str) and raw["chat_template"].endswith(".jinja"):
        raw["chat_template"] = str(path.parent / raw["chat_template"])  # relative to the recipe, as `data`
    if isinstance(raw.get("output_dir"), str):  # relative to the recipe
        raw["output_dir"] = str(path.parent / raw["output_dir"])
    return SuperMergeConfig.from_dict(raw), data
