"""`galatea inspect`: describe a checkpoint without loading its weights."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint without loading its weights")
    p.add_argument("path", nargs="?", help="GGUF file or HF folder (default: the embedded model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.chat import formats
    from galatea.errors import GalateaError
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path
    from galatea.model.inspect import describe

    path = resolve_model_path(args.path)
    info = describe(path)
    try:  # what `--format auto` picks for this model
        fmt = formats.choose("auto", load_tokenizer(path))
        info["prompt_format"] = fmt.name if fmt.name != formats.TEMPLATE else "template (the model's chat template)"
    except GalateaError:
        info["prompt_format"] = "unknown (no tokenizer)"
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} x{v}" for k, v in value.items())
            print(f"{key:<{width}}  {value}")
    return 0
