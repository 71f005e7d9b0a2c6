"""`galatea eval`: perplexity on a dataset's character replies (compare a fine-tune with its base)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from galatea.commands.common import load_from_args, model_args


def add_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="perplexity on a dataset's character replies (compare a fine-tune with its base)")
    model_args(e)
    e.add_argument("--data", required=True, help="dataset JSONL")
    e.add_argument("--split", choices=("auto", "validation", "train", "all"), default="auto",
                   help="auto: the validation split when there is one, else all")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.train.evaluate import perplexity

    lm = load_from_args(args)
    result = perplexity(lm, Path(args.data).expanduser(), args.split, args.batch_size)
    result = {"model": str(lm.path), "lora": args.lora, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['examples']} examples ({result['split']}), {result['reply_tokens']} reply tokens: "
              f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}")
    return 0
