"""The ``nvila`` command: one table, :data:`COMMANDS`, of sub-command -> arguments and the function it runs.

User errors (bad specs, missing shards, broken plugins) print one paragraph and exit with status 2;
``--debug`` shows the traceback instead. Every command imports what it needs when it runs, so that
``nvila --help`` and ``nvila plugins`` stay quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nvila.core.errors import NvilaError


@dataclass(frozen=True)
class Command:
    """One ``nvila`` sub-command: its help line, its arguments, and the function that runs it.

    ``run(args, rest)`` gets the parsed arguments and, when ``passes_through``, the arguments argparse does
    not know (recipe overrides such as ``--model.compressor.ratio=3``), which it must check itself.
    """

    help: str
    run: Callable[[argparse.Namespace, list[str]], None]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    passes_through: bool = False
    description: str | None = None
    parses_itself: bool = False
    """The command parses (and helps with) all its own arguments: the Lightning CLI's fit and validate."""


# -- demo, plugins --------------------------------------------------------------------------------------------
def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="nvila-demo", help="folder for data, logs and checkpoints")
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--val-samples", type=int, default=500)


def _demo(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.workflows.demo import run_demo

    run_demo(args.out, args.train_samples, args.val_samples)


def _plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--describe", metavar="NAME", help="print a component's config fields")


def _plugins(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.core.plugins import default_plugins
    from nvila.core.registry import KINDS, did_you_mean
    from nvila.core.specs import describe as describe_component

    loaded = default_plugins()
    if args.describe:
        found = loaded.registry.find(args.describe)
        if not found:
            names = sorted({c.name for c in loaded.registry})
            raise NvilaError(f"No component named '{args.describe}'.{did_you_mean(args.describe, names)} "
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


# -- training (Lightning CLI) ---------------------------------------------------------------------------------
def _lightning(subcommand: str) -> Callable[[argparse.Namespace, list[str]], None]:
    def run(args: argparse.Namespace, rest: list[str]) -> None:
        from nvila.workflows.cli import run_cli

        run_cli([subcommand, *rest])

    return run


# -- data -----------------------------------------------------------------------------------------------------
def _data_arguments(parser: argparse.ArgumentParser) -> None:
    data_sub = parser.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic shapes task as webdataset shards")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=20000, help="training samples")
    synth.add_argument("--val", type=int, default=500, help="validation samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a finished shard set in --out written with other settings (refused otherwise)")
    convert = data_sub.add_parser("convert", help="convert LLaVA JSON plus a media folder into webdataset shards")
    convert.add_argument("--llava-json", required=True, help="LLaVA-style .json list (or .jsonl) of records")
    convert.add_argument("--media-root", required=True, help="folder the records' image/video paths are relative to")
    convert.add_argument("--out", required=True, help="folder for the shards and convert-report.json")
    convert.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    convert.add_argument("--source", default=None, help="data set name for records without one (default: file stem)")
    convert.add_argument("--allow-outside-media-root", action="store_true",
                         help="read media paths leaving --media-root (../, absolute paths, links); refused otherwise")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a finished shard set in --out (refused otherwise)")


def _data(args: argparse.Namespace, rest: list[str]) -> None:
    if args.data_command == "convert":
        from nvila.core.data.convert import REPORT_FILE, convert_llava

        report = convert_llava(args.llava_json, args.media_root, args.out, args.shard_size, args.source,
                               allow_outside_media_root=args.allow_outside_media_root, overwrite=args.overwrite)
        print(report.summary())
        print(f"report: {Path(args.out) / REPORT_FILE}")
        return
    from nvila.core.data.synthetic import write_dataset

    splits = write_dataset(Path(args.out), args.train, args.val, args.seed, args.image_size, overwrite=args.overwrite)
    for split, shards in splits.items():
        print(f"{split}: {len(shards)} shard(s) in {Path(args.out) / split}")


# -- prune ----------------------------------------------------------------------------------------------------
def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pruner", required=True,
                        help="pruner name (deltaloss, random) or spec, e.g. \"{name: random, seed: 3}\"")
    parser.add_argument("--keep", type=float, required=True, help="fraction kept within each source data set")
    parser.add_argument("--in", dest="inp", required=True, help="shards to prune (directory or file)")
    parser.add_argument("--out", required=True, help="folder for the kept shards and the report")
    parser.add_argument("--small-ckpt", help="checkpoint directory of the small model (deltaloss)")
    parser.add_argument("--large-ckpt", help="checkpoint directory of the large model (deltaloss)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--shard-size", type=int, default=1000)


def _prune(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.workflows.prune import run_prune

    result = run_prune(args.pruner, args.keep, args.inp, args.out, small_ckpt=args.small_ckpt,
                       large_ckpt=args.large_ckpt, batch_size=args.batch_size, num_workers=args.num_workers,
                       accelerator=args.accelerator, devices=args.devices, shard_size=args.shard_size)
    if result is not None:
        print(result.summary())


# -- bench ----------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse turns the error into a usage message)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, got '{text}'")
    return int(text)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    # no `choices`: listing the suites imports torch, and every `nvila` command builds this parser
    parser.add_argument("suite", help="peft, peft-large, memory-savers, memory-savers-long, fp8, data, prefill, "
                                      "serve, quant-ttft, quant-decode, quant-peer, quant-quality, qlora or attention "
                                      "(nvila.workflows.bench.suites.SUITES)")
    parser.add_argument("--out", help="folder for the report: OUT/SUITE.md and OUT/SUITE.json")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the configurations whose name contains TEXT (repeatable)")
    parser.add_argument("--include-slow-bf16", action="store_true",
                        help="on a CPU without bf16 hardware, run the bf16 configurations (last) instead of skipping")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the measurements")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="timed rounds of quant-ttft, quant-decode, quant-peer and attention, whose best is kept "
                             "(more on a noisy shared machine; default: each suite's own)")
    parser.add_argument("--ckpt", help="quant-quality: a trained checkpoint instead of random weights")
    parser.add_argument("--calib", metavar="SHARDS", help="quant-quality: shards to calibrate AWQ on")
    parser.add_argument("--held-out", metavar="SHARDS", help="quant-quality: held-out shards to compare answers on")


def _bench(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.workflows.bench import BenchOptions, run_bench

    run_bench(args.suite, BenchOptions(out=args.out, only=args.only, include_slow_bf16=args.include_slow_bf16,
                                       threads=args.threads, rounds=args.rounds, command=args.command_line,
                                       ckpt=args.ckpt,
                                       calib=args.calib, held_out=args.held_out))


# -- eval, generate -------------------------------------------------------------------------------------------
def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory: nvila's (spec.yaml, model.safetensors) "
                                                      "or a released NVILA one (config.json, llm/, vision_tower/)")
    parser.add_argument("--shards", required=True, help="directory of shards to evaluate on")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)


def _eval(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.core.data.shards import find_shards
    from nvila.workflows.evaluate import evaluate
    from nvila.workflows.pretrained import load_model

    shards = find_shards(args.shards)
    result = evaluate(load_model(args.ckpt), shards, args.batch_size, args.limit)
    print(f"accuracy: {result.accuracy:.4f} on {len(result.answers)} questions")
    if result.skipped:
        print(result.skip_summary())


# -- generate, convert, serve, chat: commands whose module holds add_arguments(parser) and run(args) ----------
def _in_module(module: str) -> tuple[Callable[[argparse.Namespace, list[str]], None],
                                     Callable[[argparse.ArgumentParser], None]]:
    """``(run, arguments)`` of a command that lives in ``module``, imported only when the command is used."""

    def run(args: argparse.Namespace, rest: list[str]) -> None:
        importlib.import_module(module).run(args)

    def arguments(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).add_arguments(parser)

    return run, arguments


# -- quantize -------------------------------------------------------------------------------------------------
def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="full-precision checkpoint directory (written by nvila fit)")
    parser.add_argument("--out", required=True, help="directory for the quantized checkpoint")
    spec = "quantizer name (w8a8, w4a16) or inline spec, e.g. \"{name: w4a16, method: rtn}\""
    parser.add_argument("--vision", "--encoder", dest="encoder", metavar="SPEC", help=f"vision tower: {spec}")
    parser.add_argument("--projector", metavar="SPEC",
                        help=f"projector: {spec}; default w16a16 when --vision is given (16 bits where the machine "
                             "computes them fast, as the quantized parts around it do), 'none' to keep it as trained")
    parser.add_argument("--llm", metavar="SPEC", help=f"language model: {spec}")
    parser.add_argument("--calib", metavar="SHARDS", help="shards to draw calibration samples from (AWQ needs them)")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration samples drawn from --calib")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")


def _quantize(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.core.specs import parse_inline
    from nvila.workflows.quantize import quantize_checkpoint, serving_mix

    named = {part: getattr(args, part) for part in ("encoder", "projector", "llm") if getattr(args, part)}
    quant = serving_mix({part: None if text.strip().lower() == "none" else parse_inline(text)
                         for part, text in named.items()})
    report = quantize_checkpoint(args.ckpt, args.out, quant, args.calib, args.calib_samples, args.seed)
    print(report.summary())


# -- plan -----------------------------------------------------------------------------------------------------
def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, action="append",
                        help="recipe file or shipped recipe name (nvila-8b); repeat to stack fragments, as in fit")
    parser.add_argument("--image-size", metavar="WxH", default="1920x1080",
                        help="image width x height in pixels, as PIL's Image.size and ffmpeg write it")
    parser.add_argument("--frames", type=int, default=None, help="plan a video of N frames instead of an image")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens in the prompt besides the media")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")


def parse_image_size(text: str) -> tuple[int, int]:
    """``"1920x1080"`` -> ``(1920, 1080)``: width first, as PIL's ``Image.size``, ffmpeg and ImageMagick write it."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise NvilaError(f"--image-size takes WIDTHxHEIGHT in pixels, like 1920x1080 (1920 wide, 1080 high); "
                         f"got '{text}'.")
    return int(parts[0]), int(parts[1])


def _plan(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.core.planning import Planner, format_plan
    from nvila.workflows.cli import model_spec, read_recipe

    bad = [o for o in rest if not o.startswith("--") or "=" not in o]
    if bad:
        raise NvilaError(f"nvila plan: unrecognised argument(s) {' '.join(bad)}; recipe overrides look like "
                         "--model.encoder.max_tiles=6, as in nvila fit.")
    config = read_recipe([arg for recipe in args.config for arg in ("--config", recipe)] + rest)
    planner = Planner(model_spec(config), dtype=args.dtype)
    if args.frames is not None:
        plan = planner.video(args.frames, text_tokens=args.text_tokens)
    else:
        width, height = parse_image_size(args.image_size)
        plan = planner.image(width, height, text_tokens=args.text_tokens)
    print(format_plan(plan, " + ".join(Path(c).stem for c in args.config)))


# -- sweep ----------------------------------------------------------------------------------------------------
def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="base recipe (a file, or a shipped name like demo)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="values of one key; repeat for more keys; KEY=[yaml, list] for values with commas")
    parser.add_argument("--out", default=None, help="results folder (default: sweeps/<date-time>)")
    parser.add_argument("--dry-run", action="store_true", help="check every run, print its command, run nothing")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing; measure runs that a scheduler already ran into --out")
    parser.add_argument("--eval-limit", type=int, default=200, help="held-out questions per run")


def _sweep(args: argparse.Namespace, rest: list[str]) -> None:
    from nvila.workflows.sweep import run_sweep

    if args.collect and not args.out:
        raise NvilaError("--collect reads the runs of an earlier sweep: give its --out folder.")
    runs = run_sweep(args.config, args.grid, args.out, dry_run=args.dry_run, collect_only=args.collect,
                     extra=rest, eval_limit=args.eval_limit)
    if not args.dry_run and all(r.status == "failed" for r in runs):
        raise NvilaError("every run of the sweep failed; see the error column of results.md")


COMMANDS: dict[str, Command] = {
    "demo": Command("generate data, train a tiny NVILA on the CPU, evaluate it", _demo, _demo_arguments),
    "plugins": Command("list registered components, or describe one", _plugins, _plugins_arguments),
    "fit": Command("Lightning CLI `fit` from a recipe (nvila fit --help)", _lightning("fit"), parses_itself=True),
    "validate": Command("Lightning CLI `validate` from a recipe (nvila validate --help)", _lightning("validate"),
                        parses_itself=True),
    "data": Command("data tools", _data, _data_arguments),
    "prune": Command("score every sample with a pruner and keep a fraction of each data set", _prune,
                     _prune_arguments),
    "bench": Command("measure training memory and speed, data throughput, prefill time or quantized inference, "
                     "configurations side by side; one Markdown and JSON report", _bench, _bench_arguments),
    "eval": Command("answer held-out questions with a checkpoint and report accuracy", _eval, _eval_arguments),
    "plan": Command("tile grid, tokens, FLOPs and activation memory of an image or a video under a recipe "
                    "(no weights needed)", _plan, _plan_arguments, passes_through=True,
                    description="Override the recipe as in nvila fit: --model.encoder.max_tiles=6"),
    "quantize": Command("quantize a checkpoint for serving: W8A8 vision tower, W4A16 language model (AWQ)",
                        _quantize, _quantize_arguments),
    "generate": Command("answer a question about images or a video, streaming the answer token by token",
                        *_in_module("nvila.workflows.generate")),
    "convert": Command("convert a checkpoint between the released NVILA layout and nvila's",
                       *_in_module("nvila.workflows.convert")),
    "serve": Command("serve a checkpoint behind an OpenAI-compatible HTTP API (streaming, batched)",
                     *_in_module("nvila.workflows.serving.cli")),
    "chat": Command("chat with a checkpoint in the terminal, with images and videos, streaming",
                    *_in_module("nvila.workflows.chat")),
    "sweep": Command("train every combination of a grid of spec values; one table of results", _sweep,
                     _sweep_arguments, passes_through=True,
                     description="Train every combination of --grid values (each a plain `nvila fit` command line, "
                                 "run one after the other) and write results.csv, results.md and "
                                 "accuracy_vs_tokens.png. Any other --key=value is passed to every `nvila fit` (e.g. "
                                 "--trainer.max_steps=200). A grid over SLOT.name (model.compressor.name) starts each "
                                 "swapped plugin from its own defaults."),
}
"""Every ``nvila`` sub-command. Third-party tools add their own commands as plugins of their own, not here."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvila", description="Efficient visual language models, NVILA-style.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.description,
                                         add_help=not command.parses_itself))
    return parser


def run(argv: list[str]) -> None:
    """Run one ``nvila`` command line (without the program name)."""
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.parses_itself:
        command.run(argparse.Namespace(), argv[1:])
        return
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if rest and not command.passes_through:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.command_line = shlex.join(["nvila", *argv])  # what reports quote as the command that made them
    command.run(args, rest)


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
    except KeyboardInterrupt:
        if debug:
            raise
        print("nvila: interrupted", file=sys.stderr)  # what was written whole stays; see docs/reliability.md
        return 130
    except BrokenPipeError:  # `nvila plugins | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
