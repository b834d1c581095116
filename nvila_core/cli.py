"""The ``nvila`` command: demo, plugins, fit/validate (Lightning CLI), data, prune, eval, generate, plan,
bench, sweep.

User errors (bad specs, missing shards, broken plugins) print one paragraph and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nvila.core.errors import NvilaError

LIGHTNING_COMMANDS = ("fit", "validate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvila", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate data, train a tiny NVILA on the CPU, evaluate it")
    demo.add_argument("--out", default="nvila-demo", help="folder for data, logs and checkpoints")
    demo.add_argument("--train-samples", type=int, default=20000)
    demo.add_argument("--val-samples", type=int, default=500)

    plugins = sub.add_parser("plugins", help="list registered components, or describe one")
    plugins.add_argument("--describe", metavar="NAME", help="print a component's config fields")

    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"Lightning CLI `{name}` from a recipe (nvila {name} --help)", add_help=False)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic shapes task as webdataset shards")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=20000, help="training samples")
    synth.add_argument("--val", type=int, default=500, help="validation samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    convert = data_sub.add_parser("convert", help="convert LLaVA JSON plus a media folder into webdataset shards")
    convert.add_argument("--llava-json", required=True, help="LLaVA-style .json list (or .jsonl) of records")
    convert.add_argument("--media-root", required=True, help="folder the records' image/video paths are relative to")
    convert.add_argument("--out", required=True, help="folder for the shards and convert-report.json")
    convert.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    convert.add_argument("--source", default=None, help="data set name for records without one (default: file stem)")

    prune = sub.add_parser("prune", help="score every sample with a pruner and keep a fraction of each data set")
    prune.add_argument("--pruner", required=True,
                       help="pruner name (deltaloss, random) or spec, e.g. \"{name: random, seed: 3}\"")
    prune.add_argument("--keep", type=float, required=True, help="fraction kept within each source data set")
    prune.add_argument("--in", dest="inp", required=True, help="shards to prune (directory or file)")
    prune.add_argument("--out", required=True, help="folder for the kept shards and the report")
    prune.add_argument("--small-ckpt", help="checkpoint directory of the small model (deltaloss)")
    prune.add_argument("--large-ckpt", help="checkpoint directory of the large model (deltaloss)")
    prune.add_argument("--batch-size", type=int, default=32)
    prune.add_argument("--num-workers", type=int, default=1)
    prune.add_argument("--accelerator", default="auto")
    prune.add_argument("--devices", default="auto")
    prune.add_argument("--shard-size", type=int, default=1000)

    bench = sub.add_parser("bench", help="measure training memory and speed, data throughput or prefill time, "
                                         "configurations side by side; one Markdown and JSON report")
    bench.add_argument("suite", choices=["peft", "peft-large", "memory-savers", "memory-savers-long", "fp8", "data",
                                         "prefill"])
    bench.add_argument("--out", help="folder for the report: OUT/SUITE.md and OUT/SUITE.json")
    bench.add_argument("--only", action="append", default=[], metavar="TEXT",
                       help="run only the configurations whose name contains TEXT (repeatable)")
    bench.add_argument("--include-slow-bf16", action="store_true",
                       help="on a CPU without bf16 hardware, run the bf16 configurations (last) instead of skipping")
    bench.add_argument("--threads", type=int, default=None, help="torch threads for the measurements")

    ev = sub.add_parser("eval", help="answer held-out questions with a checkpoint and report accuracy")
    ev.add_argument("--ckpt", required=True, help="checkpoint directory (spec.yaml, model.safetensors)")
    ev.add_argument("--shards", required=True, help="directory of shards to evaluate on")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=32)

    plan = sub.add_parser("plan", help="tile grid, tokens, FLOPs and activation memory of an image or a video "
                                       "under a recipe (no weights needed)",
                          epilog="Override the recipe's model with dotted keys: --model.encoder.max_tiles=6")
    plan.add_argument("-c", "--config", required=True, help="recipe file or shipped recipe name (nvila-8b)")
    plan.add_argument("--image-size", metavar="HxW", default="1080x1920", help="image height x width in pixels")
    plan.add_argument("--frames", type=int, default=None, help="plan a video of N frames instead of an image")
    plan.add_argument("--text-tokens", type=int, default=0, help="text tokens in the prompt besides the media")
    plan.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")

    gen = sub.add_parser("generate", help="answer one question about one image")
    gen.add_argument("--ckpt", required=True)
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)

    sweep = sub.add_parser(
        "sweep", help="train every combination of a grid of spec values; one table of results",
        description="Train every combination of --grid values (each a plain `nvila fit` command line, run one "
                    "after the other) and write results.csv, results.md and accuracy_vs_tokens.png. Any other "
                    "--key=value is passed to every `nvila fit` (e.g. --trainer.max_steps=200). A grid over "
                    "SLOT.name (model.compressor.name) starts each swapped plugin from its own defaults.")
    sweep.add_argument("--config", "-c", required=True, help="base recipe (a file, or a shipped name like demo)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="values of one key; repeat for more keys; KEY=[yaml, list] for values with commas")
    sweep.add_argument("--out", default=None, help="results folder (default: sweeps/<date-time>)")
    sweep.add_argument("--dry-run", action="store_true", help="check every run, print its command, run nothing")
    sweep.add_argument("--collect", action="store_true",
                       help="run nothing; measure runs that a scheduler already ran into --out")
    sweep.add_argument("--eval-limit", type=int, default=200, help="held-out questions per run")
    return parser


def _plugins(describe: str | None) -> None:
    from nvila.core.plugins import default_plugins
    from nvila.core.registry import KINDS
    from nvila.core.specs import describe as describe_component

    loaded = default_plugins()
    if describe:
        found = loaded.registry.find(describe)
        if not found:
            from nvila.core.registry import did_you_mean

            names = sorted({c.name for c in loaded.registry})
            raise NvilaError(f"No component named '{describe}'.{did_you_mean(describe, names)} "
                             f"Registered: {', '.join(names)}.")
        print("\n\n".join(describe_component(c) for c in found))
        return
    for kind, what in KINDS.items():
        components = [c for c in loaded.registry if c.kind == kind]
        print(f"{kind} ({what}):")
        for c in components:
            origin = f"{c.distribution} {c.version}"
            print(f"  {c.name:<24} {origin:<22} {c.summary}")
        if not components:
            print("  (none registered)")
    for failure in loaded.failures:
        print(f"failed: {failure}")
    for name in loaded.blocked:
        print(f"disabled by NVILA_DISABLE_PLUGINS: {name}")


def _generate(args: argparse.Namespace) -> None:
    from PIL import Image, UnidentifiedImageError

    from nvila.core.checkpoint import load_checkpoint
    from nvila.core.processor import collate

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise NvilaError(f"Cannot read image '{args.image}': {exc}") from None
    model = load_checkpoint(args.ckpt)
    encoded = model.processor.encode([{"from": "human", "value": f"<image>\n{args.prompt}"}], [image],
                                     generation_prompt=True)
    batch = collate([encoded], model.tokenizer.pad_token_id, left_pad=True)
    ids = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixels"], batch["grids"],
                         max_new_tokens=args.max_new_tokens)
    print(model.tokenizer.decode(ids[0], skip_special_tokens=True).strip())


def _plan(args: argparse.Namespace, overrides: list[str]) -> None:
    from nvila.core.planning import Planner, format_plan, model_spec_from_recipe
    from nvila.workflows.cli import recipe_path

    bad = [o for o in overrides if not o.startswith("--model.") or "=" not in o]
    if bad:
        raise NvilaError(f"nvila plan: unrecognised argument(s) {' '.join(bad)}; recipe overrides look like "
                         "--model.encoder.max_tiles=6.")
    path = recipe_path(args.config)
    spec = model_spec_from_recipe(path, [o[2:] for o in overrides])
    planner = Planner(spec, dtype=args.dtype)
    if args.frames is not None:
        plan = planner.video(args.frames, text_tokens=args.text_tokens)
    else:
        try:
            height, width = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            raise NvilaError(f"--image-size takes HEIGHTxWIDTH in pixels, like 1080x1920; got "
                             f"'{args.image_size}'.") from None
        plan = planner.image(width, height, text_tokens=args.text_tokens)
    print(format_plan(plan, Path(args.config).stem))


def run(argv: list[str]) -> None:
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from nvila.workflows.cli import run_cli

        run_cli(argv)
        return
    if argv and argv[0] == "plan":
        args, overrides = _parser().parse_known_args(argv)
        _plan(args, overrides)
        return
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        from nvila.workflows.demo import run_demo

        run_demo(args.out, args.train_samples, args.val_samples)
    elif args.command == "plugins":
        _plugins(args.describe)
    elif args.command == "data" and args.data_command == "convert":
        from nvila.core.data.convert import REPORT_FILE, convert_llava

        report = convert_llava(args.llava_json, args.media_root, args.out, args.shard_size, args.source)
        print(report.summary())
        print(f"report: {Path(args.out) / REPORT_FILE}")
    elif args.command == "data":
        from nvila.core.data.synthetic import write_dataset

        splits = write_dataset(Path(args.out), args.train, args.val, args.seed, args.image_size)
        for split, shards in splits.items():
            print(f"{split}: {len(shards)} shard(s) in {Path(args.out) / split}")
    elif args.command == "prune":
        from nvila.workflows.prune import run_prune

        result = run_prune(args.pruner, args.keep, args.inp, args.out, small_ckpt=args.small_ckpt,
                           large_ckpt=args.large_ckpt, batch_size=args.batch_size, num_workers=args.num_workers,
                           accelerator=args.accelerator, devices=args.devices, shard_size=args.shard_size)
        if result is not None:
            print(result.summary())
    elif args.command == "eval":
        from nvila.core.checkpoint import load_checkpoint
        from nvila.core.data.shards import find_shards
        from nvila.workflows.evaluate import evaluate

        shards = find_shards(args.shards)
        result = evaluate(load_checkpoint(args.ckpt), shards, args.batch_size, args.limit)
        print(f"accuracy: {result.accuracy:.4f} on {len(result.answers)} questions")
    elif args.command == "bench":
        import shlex

        from nvila.workflows.bench import BenchOptions, run_bench

        run_bench(args.suite, BenchOptions(out=args.out, only=args.only, include_slow_bf16=args.include_slow_bf16,
                                           threads=args.threads, command=shlex.join(["nvila", *argv])))
    elif args.command == "generate":
        _generate(args)
    elif args.command == "sweep":
        from nvila.workflows.sweep import run_sweep

        if args.collect and not args.out:
            raise NvilaError("--collect reads the runs of an earlier sweep: give its --out folder.")
        runs = run_sweep(args.config, args.grid, args.out, dry_run=args.dry_run, collect_only=args.collect,
                         extra=extra, eval_limit=args.eval_limit)
        if not args.dry_run and all(r.status == "failed" for r in runs):
            raise NvilaError("every run of the sweep failed; see the error column of results.md")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # libraries with their own INFO handlers print once, not twice
        handler.setLevel(logging.WARNING)
    try:
        run(argv)
    except NvilaError as exc:
        if debug:
            raise
        print(f"nvila: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
