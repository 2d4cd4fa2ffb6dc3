"""The `supermerge` command: `merge RECIPE.yaml`, `estimate RECIPE.yaml`, `demo`, `methods`."""

import argparse
import dataclasses
import inspect
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from .config import SourceConfig, SuperMergeConfig
from .demo import add_arguments as add_demo_arguments
from .estimate import parse_memory
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
    "\n\nEach source: " + inspect.cleandoc(SourceConfig.__doc__ or ""))  # fields documented once, in config.py


def _beside(recipe: Path, value: str) -> str:
    """A model path of the recipe: the folder relative to the recipe if it exists there (or starts with "."),
    else a Hub repo id."""
    local = recipe.parent / value
    if local.exists() or value.startswith("."):
        logger.info("%r in %s: the local folder %s", value, recipe.name, local)
        return str(local)
    logger.info("%r in %s: no such folder beside the recipe, read as a Hub repo id", value, recipe.name)
    return value


def read_recipe(path: str | Path) -> tuple[SuperMergeConfig, dict[str, dict[str, Any]]]:
    """Split a recipe into the config and, per task, its `data` entry; raises `FileNotFoundError` for a missing recipe
    or examples file, `ValueError` for invalid YAML, a recipe of another shape, a `data` entry without `path`."""
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
            if not file.is_file():
                raise FileNotFoundError(f"Examples file {str(file)!r} of task {source.get('task')!r} does not exist.")
            data[source["task"]] = spec | {"path": file}
        if isinstance(source.get("path"), str):
            source["path"] = _beside(path, source["path"])
    if isinstance(raw.get("base"), str):
        raw["base"] = _beside(path, raw["base"])
    if isinstance(raw.get("output_dir"), str):  # relative to the recipe
        raw["output_dir"] = str(path.parent / raw["output_dir"])
    return SuperMergeConfig.from_dict(raw), data


def run_merge(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .data import read_examples
    from .merger import SuperMerger

    config, data = read_recipe(args.recipe)
    overrides = {"output_dir": args.output, "steps": args.steps, "seed": args.seed,
                 "overwrite_output_dir": True if args.overwrite else None}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})  # re-validated
    if not config.output_dir:
        raise SystemExit("error: no output folder: set `output_dir` in the recipe or pass --output DIR.")
    merger = SuperMerger(config, token=args.token)
    if args.max_memory:
        check_memory(merger, parse_memory(args.max_memory))
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
    print(f"Merged model written to {merger.save_pretrained()}")
    if merger.coefficients is not None:
        print(merger.coefficients)
    if args.adapter_output:
        adapter = merger.save_adapter(args.adapter_output, rank=args.adapter_rank,
                                      overwrite=config.overwrite_output_dir)
        print(f"Combined LoRA adapter written to {adapter}")
    if args.push_to_hub:
        print(f"Pushed to {merger.push_to_hub(args.push_to_hub, private=args.private, token=args.token)}")


def check_adapter_output(merger, folder: str | None, rank: int | None) -> None:
    """Refuse, before learning, an adapter output that cannot be written."""
    from .checkpoint import check_output_dir
    from .export import check_adapter_export

    if not folder:
        raise ValueError(f"--adapter-rank {rank} compresses the adapter of --adapter-output DIR: give that folder too.")
    check_adapter_export(merger.plan, merger.config, merger.method)
    check_output_dir(folder, overwrite=merger.config.overwrite_output_dir)


def check_memory(merger, max_memory_mb: float) -> None:
    """Refuse, before loading any weight, a run whose estimated peak exceeds the limit."""
    from .estimate import configured_mode, format_estimates

    estimates = merger.estimate_memory()
    mode = configured_mode(merger.config)
    peak = next(max(e.host_mb, e.device_mb) for e in estimates if e.mode == mode)
    if peak > max_memory_mb:
        raise ValueError(f"A {mode} merge needs about {peak:.0f} MB, more than --max-memory {max_memory_mb:.0f} MB."
                         f"\n{format_estimates(estimates, max_memory_mb)}\nSet `streaming: true` or "
                         "`hierarchical: {group_size: 2}` in the recipe, or raise the limit.")


def run_estimate(args: argparse.Namespace) -> None:
    from .estimate import format_estimates
    from .merger import SuperMerger

    config, _ = read_recipe(args.recipe)
    merger = SuperMerger(config, token=args.token)
    limit = parse_memory(args.max_memory) if args.max_memory else None
    print(f"Estimated peak memory ({merger.plan.num_sources} sources, {len(merger.plan.merged)} merged tensors, "
          f"dtype {config.dtype}), from safetensors headers:")
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('supermerge_hf')}")
    sub = parser.add_subparsers(dest="command", required=True)

    recipe = argparse.ArgumentParser(add_help=False)  # what merge and estimate share
    recipe.add_argument("recipe", help="YAML recipe: a SuperMergeConfig plus a `data` entry per source.")
    recipe.add_argument("--token", help="Hub token (default: the logged-in token). Never logged or written.")
    recipe.add_argument("--max-memory", help="Memory limit (e.g. 8GB): `merge` refuses to start if its estimated "
                        "peak exceeds it, `estimate` also prints the mode that fits.")

    merge = sub.add_parser("merge", parents=[recipe], help="Merge the sources of a recipe.", description=RECIPE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("--output", help="Output folder (overrides the recipe's output_dir).")
    merge.add_argument("--overwrite", action="store_true", help="Replace an output folder that already holds files.")
    merge.add_argument("--resume", action="store_true", help="Continue a stopped run from the learning state saved "
                       "every `checkpoint_every` steps (a fresh start when there is none).")
    merge.add_argument("--steps", type=int, help="Number of coefficient-learning steps (overrides the recipe).")
    merge.add_argument("--seed", type=int, help="Random seed (overrides the recipe).")
    merge.add_argument("--push-to-hub", metavar="REPO_ID", help="Also push the merged model to this Hub repo.")
    merge.add_argument("--private", action="store_true", help="Create the Hub repo as private (with --push-to-hub).")
    merge.add_argument("--adapter-output", metavar="DIR", help="Also write the merge as one PEFT LoRA adapter of the "
                       "base (all sources LoRA adapters; exact, of rank the sum of the source ranks).")
    merge.add_argument("--adapter-rank", type=int, metavar="K", help="With --adapter-output: compress the adapter to "
                       "rank K by SVD; each module's relative error goes to DIR/supermerge_adapter.json.")
    merge.set_defaults(func=run_merge)

    estimate = sub.add_parser("estimate", parents=[recipe], help="Estimate peak memory of flat, hierarchical and "
                              "streaming runs.", description="Reads only configs and safetensors headers.")
    estimate.set_defaults(func=run_estimate)

    add_demo_arguments(sub.add_parser("demo", help="Built-in job: merge MiniLM classifiers of two real offline "
                                      "tasks.")).set_defaults(func=run_demo)
    sub.add_parser("methods", help="List the merge methods.").set_defaults(func=run_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
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
