"""`galatea xor`: rebuild a model from an XOR release (Pygmalion 7B), verify one, make one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from galatea.errors import GalateaError
from galatea.progress import byte_bars


def add_parser(sub: Any) -> None:
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

    x = xsub.add_parser("verify", help="check a folder against published checksums")
    x.add_argument("dir", type=Path)
    x.add_argument("--manifest", help="built-in name or manifest file (default: the release with the same files)")
    x.add_argument("--base", action="store_true", help="check DIR as the base a payload needs, not as the result")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    x = xsub.add_parser("create", help="fine-tune XOR base -> a payload to share, with its manifest")
    x.add_argument("finetune", type=Path, help="the fine-tuned model folder")
    x.add_argument("base", type=Path, help="the base model folder it was trained from")
    x.add_argument("out", type=Path, help="folder to write the payload to")
    x.add_argument("--compress", action="store_true", help="gzip the payload files (the codec's --compress)")
    x.add_argument("--name", help="release name stored in the manifest (default: the fine-tune folder's name)")
    x.add_argument("--force", action="store_true", help="overwrite files already in the output folder")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return {"apply": xor_apply, "verify": xor_verify, "create": xor_create}[args.action](args)


def xor_apply(args: argparse.Namespace) -> int:
    from galatea.weights.manifest import format_table
    from galatea.weights.xor import apply

    result = apply(args.payload, args.base, args.out, force=args.force, manifest=args.manifest,
                   check_base=not args.skip_base_check, log=lambda s: print(s, file=sys.stderr),
                   progress_factory=byte_bars(args.quiet))
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


def xor_verify(args: argparse.Namespace) -> int:
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
    factory = byte_bars(args.quiet)
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


def xor_create(args: argparse.Namespace) -> int:
    from galatea.weights.manifest import MANIFEST_NAME
    from galatea.weights.xor import create

    manifest = create(args.finetune, args.base, args.out, compress=args.compress, force=args.force,
                      name=args.name, progress_factory=byte_bars(args.quiet))
    print(f"wrote {len(manifest.output)} payload files and {MANIFEST_NAME} to {args.out}")
    print(f"rebuild with: galatea xor apply {args.out} BASE_DIR OUT_DIR (it checks the base and the result "
          f"against {MANIFEST_NAME})")
    return 0
