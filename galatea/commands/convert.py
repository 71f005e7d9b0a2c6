"""`galatea convert`: HF .bin -> safetensors, GGUF -> HF folder, HF folder -> GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from galatea.errors import GalateaError
from galatea.progress import byte_bars


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="HF .bin -> safetensors, GGUF -> HF folder, HF folder -> GGUF")
    p.add_argument("src", type=Path, help="a Hugging Face model folder or a .gguf file")
    p.add_argument("dst", type=Path, help="the folder (safetensors) or .gguf file to write")
    p.add_argument("--to", choices=("safetensors", "gguf"), required=True)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="safetensors: tensor dtype (default: the source's; from a quantized GGUF, float16)")
    p.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0", "q4_0", "q4_1"),
                   help="gguf: tensor type of the weight matrices (default f16; norms stay f32)")
    p.add_argument("--shard-size", default="5GB", help="safetensors: largest shard (default 5GB, as transformers)")
    p.add_argument("--force", action="store_true", help="overwrite the destination")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.weights import convert as cv

    kind = cv.open_source(args.src)
    bars = byte_bars(args.quiet)
    dtype = cv.DTYPES[args.dtype] if args.dtype else None
    if args.to == "safetensors":
        shard = _size(args.shard_size)
        if kind == "hf":
            names = cv.hf_to_safetensors(args.src, args.dst, dtype, shard, args.force, bars)
        else:
            names = cv.gguf_to_hf(args.src, args.dst, dtype, shard, args.force, bars)
        print(f"wrote {args.dst}: {len(names)} safetensors file{'s' if len(names) > 1 else ''}, config and tokenizer")
        return 0
    if kind == "gguf":
        raise GalateaError(f"{args.src}: already GGUF; to change its type, convert it to safetensors first, "
                           "then that folder to GGUF")
    if args.dtype:
        raise GalateaError("--dtype is for safetensors output; GGUF output takes --type")
    counts = cv.hf_to_gguf(args.src, args.dst, args.type, args.force, bars)
    print(f"wrote {args.dst}: " + ", ".join(f"{n} {k} tensors" for k, n in sorted(counts.items())))
    return 0


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    raise GalateaError(f"--shard-size {text!r}: write a size such as 5GB or 500MB")
