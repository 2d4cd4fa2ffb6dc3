"""The `supermerge` command: `merge RECIPE.yaml`, `estimate RECIPE.yaml`, `demo`, `methods`."""

import argparse
import dataclasses
import inspect
import logging
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from .config import SourceConfig, SuperMergeConfig
from .demo import add_arguments as add_demo_arguments
from .estimate import check_memory, configured_mode, parse_memory
from .hub import repo_url
from .methods import METHODS

logger = logging.getLogger("supermerge_hf")
DATA_ENTRY = "`data: {path: FILE.jsonl, text_field: ..., label_field: ...}`"
RECIPE_HELP = """\
A recipe is a YAML file holding a SuperMergeConfig (fields below); each source may also have a `data` entry: the
labelled examples of its task, a JSONL or CSV file tokenised with the base's tokenizer (keys: path, text_field,
label_field, text_pair_field, max_length; labels are integers or names of the fine-tune's label2id). Relative paths
are relative to the recipe file.

  base: sentence-transformers/all-MiniLM-L6-v2
  sources:
    - {task: bbc, path: ./finetunes/bbc, data: {path: bbc.jsonl, text_field: text, label_field: label}}
    - {task: tweets, path: org/minilm-tweets, revision: main, data: {path: tweets.csv, label_field: sentiment}}
  granularity: tensor
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


def _fold_source_parameters(raw: dict[str, Any], sources: list[dict[str, Any]]) -> None:
    """mergekit-style per-source `weight` / `density` (or `parameters: {weight, density}`) as the method's
    `weights` list and its one `density`; `ValueError` where the method has no such hyperparameter."""
    method = METHODS.get(raw.get("method", "supermerge"))
    given = [s.pop("parameters", None) or {} for s in sources]
    given = [g | {k: s.pop(k) for k in ("weight", "density") if k in s} for g, s in zip(given, sources)]
    kwargs = raw.setdefault("method_kwargs", {}) or {}
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
    raw["method_kwargs"] = kwargs


def read_recipe(path: str | Path, *, need_data: bool = True) -> tuple[SuperMergeConfig, dict[str, dict[str, Any]]]:
    """Split a recipe into the config and, per task, its `data` entry; raises `FileNotFoundError` for a missing recipe
    or (with `need_data`) examples file, `ValueError` for invalid YAML, a recipe of another shape, a `data` entry
    without `path`."""
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
    data = {}
    for source in sources:
        spec = source.pop("data", None)
        if spec is not None:
            if not isinstance(spec, dict) or "path" not in spec:
                raise ValueError(f"Source {source.get('task')!r} in {path} needs {DATA_ENTRY} with its examples.")
            file = path.parent / spec["path"]  # an absolute path stays as it is
            if need_data and not file.is_file():
                raise FileNotFoundError(f"Examples file {str(file)!r} of task {source.get('task')!r} does not exist.")
            data[source["task"]] = spec | {"path": file}
        if isinstance(source.get("path"), str):
            source["path"] = _beside(path, source["path"])
    _fold_source_parameters(raw, sources)
    if isinstance(raw.get("base"), str):
        raw["base"] = _beside(path, raw["base"])
    if isinstance(raw.get("output_dir"), str):  # relative to the recipe
        raw["output_dir"] = str(path.parent / raw["output_dir"])
    return SuperMergeConfig.from_dict(raw), data


def _say(message: str) -> None:
    """Print once, from the main process of a multi-process run."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def _accelerator(device: str | None):
    import torch
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here. Use --device cpu (or auto).")
    return None if device in (None, "auto") else Accelerator(cpu=device == "cpu")


def run_merge(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .card import metrics_table
    from .data import read_examples
    from .merger import SuperMerger

    config, data = read_recipe(args.recipe)
    overrides = {"output_dir": args.output, "steps": args.steps, "seed": args.seed, "dtype": args.dtype,
                 "max_shard_size": args.max_shard_size, "overwrite_output_dir": True if args.overwrite else None}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})  # re-validated
    if not config.output_dir:
        raise SystemExit("error: no output folder: set `output_dir` in the recipe or pass --output DIR.")
    merger = SuperMerger(config, token=args.token, accelerator=_accelerator(args.device))
    if args.max_memory:
        check_memory(merger.estimate_memory(), configured_mode(config), parse_memory(args.max_memory))
    if args.adapter_output or args.adapter_rank is not None:
        check_adapter_output(merger, args.adapter_output, args.adapter_rank)
    examples = {}
    if merger.needs_examples:
        missing = [t for t in config.tasks if t not in data]
        if missing:
            raise ValueError(f"Method {config.method!r} (with these method_kwargs) reads labelled examples: "
                             f"source(s) {missing} in {args.recipe} need {DATA_ENTRY}.")
        tokenizer = AutoTokenizer.from_pretrained(merger.resolved_base.path)
        for task in config.tasks:
            spec = dict(data[task])
            label2id = merger.plan.task_specs[task].config.label2id  # a LoRA adapter folder has no config.json
            examples[task] = read_examples(spec.pop("path"), tokenizer, label2id=label2id, **spec)
    merger.fit(examples, resume=args.resume)
    out = merger.save_pretrained(push_to_hub=bool(args.push_to_hub), repo_id=args.push_to_hub, private=args.private,
                                 token=args.token)
    _say(f"Merged model written to {out}")
    if merger.metrics:
        _say("Each task's fine-tune vs the merge, on its held-out labelled examples:\n" + metrics_table(merger.metrics))
    if args.adapter_output:
        adapter = merger.save_adapter(args.adapter_output, rank=args.adapter_rank,
                                      overwrite=config.overwrite_output_dir)
        _say(f"Combined LoRA adapter written to {adapter}")
    if args.push_to_hub:
        _say(f"Pushed to {repo_url(args.push_to_hub)}")


def check_adapter_output(merger, folder: str | None, rank: int | None) -> None:
    """Refuse, before learning, an adapter output that cannot be written."""
    from .checkpoint import check_output_dir
    from .export import check_adapter_export

    if not folder:
        raise ValueError(f"--adapter-rank {rank} compresses the adapter of --adapter-output DIR: give that folder too.")
    check_adapter_export(merger.plan, merger.config, merger.method)
    check_output_dir(folder, overwrite=merger.config.overwrite_output_dir)


def run_estimate(args: argparse.Namespace) -> None:
    from .estimate import format_estimates
    from .merger import SuperMerger

    config, _ = read_recipe(args.recipe, need_data=False)
    if args.dtype:
        config = dataclasses.replace(config, dtype=args.dtype)
    merger = SuperMerger(config, token=args.token)
    limit = parse_memory(args.max_memory) if args.max_memory else None
    print(f"Estimated peak memory ({merger.plan.num_sources} sources, {len(merger.plan.merged)} merged tensors, "
          f"learning in {str(merger.dtype).removeprefix('torch.')}), from safetensors headers:")
    print(format_estimates(merger.estimate_memory(), limit))


def run_demo(args: argparse.Namespace) -> None:
    from .demo.run import run_demo as demo  # imports the demo's data helpers only when asked

    demo(args)


def run_methods(args: argparse.Namespace) -> None:
    width = max(map(len, METHODS))
    for name in sorted(METHODS):
        method = METHODS[name]
        print(f"{name:<{width}}  {method.kind:<9}  {method.description}  {method.url}")
        for key, spec in method.hyperparameters.items():
            allowed = list(spec.choices) if spec.choices else spec.kind.__name__ + (" or auto" if spec.auto else "")
            print(f"{'':<{width}}    {key}: {allowed}, default {spec.default!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supermerge", description="Merge fine-tunes of one base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log at DEBUG level (default: INFO).")
    verbose = argparse.ArgumentParser(add_help=False)  # -v also after the subcommand
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="Log at DEBUG level (default: INFO).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('supermerge_hf')}")
    sub = parser.add_subparsers(dest="command", required=True)

    recipe = argparse.ArgumentParser(add_help=False, parents=[verbose])  # what merge and estimate share
    recipe.add_argument("recipe", help="YAML recipe: a SuperMergeConfig plus a `data` entry per source.")
    recipe.add_argument("--token", help="Hub token (default: the logged-in token). Never logged or written.")
    recipe.add_argument("--max-memory", help="Memory limit (e.g. 8GB): `merge` refuses to start if its estimated "
                        "peak exceeds it, `estimate` also prints the mode that fits.")
    recipe.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="dtype the merge is saved "
                        "in (overrides the recipe; auto: the sources' dtype, learning in float32).")

    merge = sub.add_parser("merge", parents=[recipe], help="Merge the sources of a recipe.", description=RECIPE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("--output", help="Output folder (overrides the recipe's output_dir).")
    merge.add_argument("--overwrite", action="store_true", help="Replace an output folder that already holds files.")
    merge.add_argument("--resume", action="store_true", help="Continue a stopped run from the learning state saved "
                       "every `checkpoint_every` steps (a fresh start when there is none).")
    merge.add_argument("--steps", type=int, help="Number of coefficient-learning steps (overrides the recipe).")
    merge.add_argument("--seed", type=int, help="Random seed (overrides the recipe).")
    merge.add_argument("--max-shard-size", help="Largest safetensors shard written, e.g. 2GB (overrides the recipe).")
    merge.add_argument("--device", choices=["auto", "cpu", "cuda"], help="Where learning runs (default auto: the GPU "
                       "if there is one). Several processes or GPUs: launch with `accelerate launch` or `torchrun`.")
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="Also push the merged model to this Hub repo (the "
                       "output folder is then written for it: no local paths in its card or config).")
    merge.add_argument("--private", action="store_true", help="Create the Hub repo as private (with --push-to-hub).")
    merge.add_argument("--adapter-output", metavar="DIR", help="Also write the merge as one PEFT LoRA adapter of the "
                       "base (all sources LoRA adapters; exact, of rank the sum of the source ranks).")
    merge.add_argument("--adapter-rank", type=int, metavar="K", help="With --adapter-output: compress the adapter to "
                       "rank K by SVD; each module's relative error goes to DIR/supermerge_adapter.json.")
    merge.set_defaults(func=run_merge)

    estimate = sub.add_parser("estimate", parents=[recipe], help="Estimate peak memory of flat, hierarchical and "
                              "streaming runs.", description="Reads only configs and safetensors headers.")
    estimate.set_defaults(func=run_estimate)

    add_demo_arguments(sub.add_parser("demo", parents=[verbose], help="Built-in job: merge MiniLM classifiers of two real offline "
                                      "tasks.")).set_defaults(func=run_demo)
    sub.add_parser("methods", parents=[verbose], help="List the merge methods and their hyperparameters.").set_defaults(
        func=run_methods)
    export = sub.add_parser("export", parents=[verbose], help="Write a saved merge as a `mergekit-yaml` recipe.")
    export.add_argument("merged_dir", help="A folder written by `supermerge merge` (or `save_pretrained`).")
    export.add_argument("--format", choices=["mergekit"], required=True, help="The recipe format.")
    export.add_argument("--output", required=True, help="The YAML file to write.")
    export.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    export.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> None:
    from .mergekit_recipe import save_mergekit_recipe
    print(f"Recipe written to {save_mergekit_recipe(args.merged_dir, args.output, overwrite=args.overwrite)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-process run logs once, from the main process
        level = logging.WARNING
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
