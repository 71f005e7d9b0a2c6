"""`galatea quantize`: a pre-quantized folder that loads in seconds by mmap."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from galatea.progress import byte_bars


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="write a pre-quantized int4/int8 folder that loads in seconds by mmap")
    p.add_argument("src", type=Path, help="a Hugging Face model folder or a .gguf file")
    p.add_argument("dst", type=Path, help="the folder to write")
    p.add_argument("--quant", choices=("auto", "int4", "int8"), default="auto",
                   help="auto (default): a GGUF keeps every matrix in its own type, float weights become int4; "
                        "int4 (blocks of 32, GGUF Q4 blocks kept as they are) or int8")
    p.add_argument("--force", action="store_true", help="overwrite the destination")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.weights.quantize import quantize

    info = quantize(args.src, args.dst, args.quant, args.force, byte_bars(args.quiet))
    print(f"wrote {args.dst}: {info['modules']} {info['mode']} layers, {info['bytes'] / 1e6:.0f} MB; "
          f"load it with --model {args.dst}")
    return 0
