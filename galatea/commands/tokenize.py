"""`galatea tokenize`: the token ids of a text, as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tokenize", help="print the token ids of a text as JSON")
    p.add_argument("--model", help="GGUF file (a vocabulary-only one works) or HF folder")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(args.model))
    print(json.dumps({"ids": tok.encode(args.text, add_bos=False if args.no_bos else None)}))
    return 0
