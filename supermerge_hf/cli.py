"""The `supermerge` command: `merge RECIPE.yaml`, `add MERGED_DIR`, `estimate RECIPE.yaml`, `export`, `demo`,
`methods`."""

import argparse
import dataclasses
import logging
import os
import sys
from importlib.metadata import version


from .demo import add_arguments as add_demo_arguments
from .estimate import check_memory, configured_mode, parse_memory
from .hub import repo_url
from .methods import METHODS
from .recipe import DATA_ENTRY, RECIPE_HELP, read_recipe

logger = logging.getLogger("supermerge_hf")
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


def read_data(merger, data: dict[str, dict]) -> dict[str, list]:
    """Each task's examples file (`data` entries: path and `read_examples` options; of a generative task's model,
    `read_generative` options: format, fields, max_length), with the base's tokenizer."""
    from transformers import AutoTokenizer

    from .data import read_examples
    from .generative import read_generative

    tokenizer, out = AutoTokenizer.from_pretrained(merger.resolved_base.path), {}
    for task, spec in data.items():
        model, options = merger.plan.task_specs[task], {k: v for k, v in spec.items() if k != "path"}
        out[task] = read_generative(spec["path"], tokenizer, task=task, encoder_decoder=model.config.is_encoder_decoder,
                                    **options) if model.cls.can_generate() else \
            read_examples(spec["path"], tokenizer, label2id=model.config.label2id, **options)
    return out


def report(merger, out: str) -> None:
    from .card import metrics_table

    _say(f"Merged model written to {out}")
    if merger.metrics:
        _say("Each task's fine-tune vs the merge, on its held-out labelled examples:\n" + metrics_table(merger.metrics))


def run_add(args: argparse.Namespace) -> None:
    from .merger import SuperMerger

    task, _, path = args.source.partition("=")
    if not task or not path:
        raise ValueError(f"--source {args.source!r}: give TASK=PATH_OR_HUB_ID, e.g. --source austen=./austen.")
    files = dict(item.partition("=")[::2] if "=" in item else (task, item) for item in args.data)
    overrides = {"output_dir": args.output, "steps": args.steps, "overwrite_output_dir": args.overwrite,
                 "save_examples": args.save_examples}
    merger = SuperMerger.from_pretrained(args.merged_dir, token=args.token).add_source(
        task, path, revision=args.revision, cheap=args.cheap, **{k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(files) - set(merger.config.tasks))
    if unknown:
        raise ValueError(f"--data names task(s) {unknown}; the tasks are {merger.config.tasks} (TASK=FILE).")
    merger.fit(read_data(merger, {t: {"path": f, "max_length": args.max_length} for t, f in files.items()}))
    report(merger, merger.save_pretrained())


def run_merge(args: argparse.Namespace) -> None:
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
    if merger.needs_examples:
        missing = [t for t in config.tasks if t not in data["labelled"]  # statistics: any inputs will do
                   and not (merger.method.kind == "statistics" and t in data["unlabelled"])]
        if missing:
            raise ValueError(f"Method {config.method!r} (with these method_kwargs) reads labelled examples: "
                             f"source(s) {missing} in {args.recipe} need {DATA_ENTRY}.")
    unlabelled = {t: s | ({} if merger.plan.task_specs[t].cls.can_generate() else {"label_field": None})
                  for t, s in data["unlabelled"].items()}  # inputs only
    merger.fit(read_data(merger, data["labelled"]) if merger.needs_examples else {}, resume=args.resume,
               unlabelled=read_data(merger, unlabelled) if unlabelled else None)
    out = merger.save_pretrained(push_to_hub=bool(args.push_to_hub), repo_id=args.push_to_hub, private=args.private,
                                 token=args.token)
    report(merger, out)
    if args.adapter_output:
        adapter = merger.save_adapter(args.adapter_output, rank=args.adapter_rank,
                                      overwrite=config.overwrite_output_dir)
        _say(f"Combined adapter written to {adapter}")
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
    if args.llm:  # the demo's modules are imported only when asked
        from .demo.run_llm import run_llm_demo as demo
    else:
        from .demo.run import run_demo as demo
    demo(args)


def run_methods(args: argparse.Namespace) -> None:
    width = max(map(len, METHODS))
    for name in sorted(METHODS):
        method = METHODS[name]
        print(f"{name:<{width}}  {method.kind:<10}  {method.description}  {method.url}")
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
    merge.add_argument("--adapter-output", metavar="DIR", help="Also write the merge as one PEFT adapter of the "
                       "base (all sources LoRA adapters: exact, of rank the sum of the source ranks; or all IA³).")
    merge.add_argument("--adapter-rank", type=int, metavar="K", help="With --adapter-output: compress the adapter to "
                       "rank K by SVD; each module's relative error goes to DIR/supermerge_adapter.json.")
    merge.set_defaults(func=run_merge)

    add = sub.add_parser("add", parents=[verbose], help="Add a fine-tune to a saved merge without starting over.",
                         description="Learn a merge of MERGED_DIR's sources plus one more from its coefficients (the "
                         "new row fresh), or with --cheap from MERGED_DIR as one source beside the new fine-tune.")
    add.add_argument("merged_dir", help="A folder (or Hub repo id) written by `supermerge merge` or `add`.")
    add.add_argument("--source", required=True, metavar="TASK=PATH", help="The new task and its fine-tune or adapter.")
    add.add_argument("--revision", help="Revision of the new source when it is a Hub repo id.")
    add.add_argument("--data", nargs="+", required=True, metavar="[TASK=]FILE", help="Labelled examples (JSONL/CSV "
                     "with `text` and `label`): the new task's, and each old task's unless MERGED_DIR kept them.")
    add.add_argument("--max-length", type=int, default=128, help="Token limit per example (default 128).")
    add.add_argument("--output", required=True, help="The new merge's folder.")
    add.add_argument("--overwrite", action="store_true", default=None, help="Replace an output that holds files.")
    add.add_argument("--cheap", action="store_true", help="Merge MERGED_DIR as one source with the new one.")
    add.add_argument("--steps", type=int, help="Coefficient-learning steps (default: MERGED_DIR's).")
    add.add_argument("--save-examples", action="store_true", default=None, help="Keep the examples in the output.")
    add.add_argument("--token", help="Hub token (default: the logged-in token). Never logged or written.")
    add.set_defaults(func=run_add)

    estimate = sub.add_parser("estimate", parents=[recipe], help="Estimate peak memory of flat, hierarchical and "
                              "streaming runs.", description="Reads only configs and safetensors headers.")
    estimate.set_defaults(func=run_estimate)

    add_demo_arguments(sub.add_parser("demo", parents=[verbose], help="Built-in job: merge MiniLM classifiers of two "
                                      "real offline tasks.")).set_defaults(func=run_demo)
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
