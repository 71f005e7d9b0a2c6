"""`galatea xor ...` and `galatea convert`: the weights subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from galatea.errors import GalateaError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("xor", help="rebuild a model from an XOR release (Pygmalion 7B), verify it, make one")
    xsub = p.add_subparsers(dest="action", required=True)

    x = xsub.add_parser("apply", help="payload XOR base -> the fine-tuned model")
    x.add_argument("payload", type=Path, help="folder of XOR files (e.g. xor_encoded_files)")
    x.add_argument("base", type=Path, help="the base model folder (e.g. LLaMA-7B converted to HF format)")
    x.add_argument("out", type=Path, help="folder to write the rebuilt model to")
    x.add_argument("--force", action="store_true", help="overwrite files already in the output folder")
    x.add_argument("--manifest", help="built-in name, manifest file, or 'none' (default: the payload's "
                                      "xor-manifest.json, else a built-in release with the same files)")
    x.add_argument("--skip-base-check", action="store_true", help="do not verify the base before applying")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_xor_apply)

    x = xsub.add_parser("verify", help="check a folder against published checksums")
    x.add_argument("dir", type=Path)
    x.add_argument("--manifest", help="built-in name or manifest file (default: the release with the same files)")
    x.add_argument("--base", action="store_true", help="check DIR as the base a payload needs, not as the result")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_xor_verify)

    x = xsub.add_parser("create", help="fine-tune XOR base -> a payload to share, with its manifest")
    x.add_argument("finetune", type=Path, help="the fine-tuned model folder")
    x.add_argument("base", type=Path, help="the base model folder it was trained from")
    x.add_argument("out", type=Path, help="folder to write the payload to")
    x.add_argument("--compress", action="store_true", help="gzip the payload files (the codec's --compress)")
    x.add_argument("--name", help="release name stored in the manifest (default: the fine-tune folder's name)")
    x.add_argument("--force", action="store_true", help="overwrite files already in the output folder")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_xor_create)

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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write a pre-quantized int4/int8 folder that loads in seconds by mmap")
    p.add_argument("src", type=Path, help="a Hugging Face model folder or a .gguf file")
    p.add_argument("dst", type=Path, help="the folder to write")
    p.add_argument("--quant", choices=("auto", "int4", "int8"), default="auto",
                   help="auto (default): a GGUF keeps every matrix in its own type, float weights become int4; "
                        "int4 (blocks of 32, GGUF Q4 blocks kept as they are) or int8")
    p.add_argument("--force", action="store_true", help="overwrite the destination")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)


def progress_bars(quiet: bool) -> Any:
    if quiet:
        return None
    from tqdm import tqdm

    def factory(label: str, total: int) -> Any:
        return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                    dynamic_ncols=True, leave=True)
    return factory


def cmd_xor_apply(args: argparse.Namespace) -> int:
    from galatea.weights.manifest import format_table
    from galatea.weights.xor import apply

    result = apply(args.payload, args.base, args.out, force=args.force, manifest=args.manifest,
                   check_base=not args.skip_base_check, log=lambda s: print(s, file=sys.stderr),
                   progress_factory=progress_bars(args.quiet))
    if result.base_checks:
        print(format_table(f"base {args.base} against {result.manifest.name}:", result.base_checks))
        if not all(c.ok for c in result.base_checks):
            raise GalateaError("the base differs from the one this release was made against; nothing was written "
                               "(fix the files named above, or --skip-base-check to try anyway)")
    print(f"wrote {len(result.written)} files to {args.out}")
    if result.output_checks:
        name = result.manifest.name if result.manifest else "the payload"
        print(format_table(f"{args.out} against {name}:", result.output_checks))
        if not all(c.ok for c in result.output_checks):
            print("error: the rebuilt files do not match; see the table above", file=sys.stderr)
            return 1
    return 0


def cmd_xor_verify(args: argparse.Namespace) -> int:
    from galatea.weights.manifest import choose_manifest, format_table, verify_folder

    if not args.dir.is_dir():
        raise GalateaError(f"{args.dir}: folder not found")
    names = [p.name for p in args.dir.iterdir() if p.is_file()]
    manifest = choose_manifest(args.manifest, names) if args.manifest != "none" else None
    if manifest is None:
        raise GalateaError(f"{args.dir}: no built-in manifest lists these files; pass --manifest NAME|FILE")
    expected = manifest.base if args.base else manifest.output
    if not expected:
        raise GalateaError(f"manifest {manifest.name} has no {'base' if args.base else 'output'} checksums")
    factory = progress_bars(args.quiet)
    total = sum((args.dir / n).stat().st_size for n in expected if (args.dir / n).is_file())
    bar = factory("hashing", total) if factory else None
    try:
        checks = verify_folder(args.dir, expected, manifest.base_hint if args.base else "",
                               progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    what = "base of" if args.base else ""
    print(format_table(f"{args.dir} against {what} {manifest.name}:".replace("  ", " "), checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_xor_create(args: argparse.Namespace) -> int:
    from galatea.weights.manifest import MANIFEST_NAME
    from galatea.weights.xor import create

    manifest = create(args.finetune, args.base, args.out, compress=args.compress, force=args.force,
                      name=args.name, progress_factory=progress_bars(args.quiet))
    print(f"wrote {len(manifest.output)} payload files and {MANIFEST_NAME} to {args.out}")
    print(f"rebuild with: galatea xor apply {args.out} BASE_DIR OUT_DIR (it checks the base and the result "
          f"against {MANIFEST_NAME})")
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


def cmd_convert(args: argparse.Namespace) -> int:
    from galatea.weights import convert as cv

    kind = cv.open_source(args.src)
    bars = progress_bars(args.quiet)
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


def cmd_quantize(args: argparse.Namespace) -> int:
    from galatea.weights.quantize import quantize

    info = quantize(args.src, args.dst, args.quant, args.force, progress_bars(args.quiet))
    print(f"wrote {args.dst}: {info['modules']} {info['mode']} layers, {info['bytes'] / 1e6:.0f} MB; "
          f"load it with --model {args.dst}")
    return 0
