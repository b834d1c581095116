"""``nvila convert``: a checkpoint from one layout to the other (released NVILA <-> nvila), through the same
loader and writer as :class:`nvila.workflows.pretrained.NVILA`."""

from __future__ import annotations

import argparse
from pathlib import Path

from nvila.core.errors import NvilaError

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=["official", "nvila"],
                        help="official: the released NVILA layout (config.json, llm/, vision_tower/, mm_projector/) "
                             "that NVlabs/VILA, SGLang and vLLM read; nvila: spec.yaml, model.safetensors, tokenizer/")
    parser.add_argument("--in", dest="inp", required=True, help="checkpoint directory, in either layout")
    parser.add_argument("--out", required=True, help="directory to write (must not hold a checkpoint already)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights' dtype in the output (default: the release's for official, as loaded for nvila)")


def convert(inp: str | Path, out: str | Path, to: str, dtype: str | None = None) -> Path:
    """Load ``inp`` (either layout) and write it to ``out`` in layout ``to``; returns ``out``."""
    import torch

    from nvila.workflows.pretrained import NVILA

    inp, out = Path(inp), Path(out)
    if out.exists() and any(out.iterdir()):
        raise NvilaError(f"--out '{out}' is not empty; choose a new directory.")
    if out.resolve() == inp.resolve():
        raise NvilaError("--out must differ from --in.")
    model = NVILA.from_pretrained(inp)
    return model.save_pretrained(out, layout=to, dtype=getattr(torch, dtype) if dtype else None)


def run(args: argparse.Namespace) -> None:
    out = convert(args.inp, args.out, args.to, args.dtype)
    print(f"wrote {out} ({args.to} layout)")
