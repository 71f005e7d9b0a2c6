"""`galatea generate`: continue a prompt, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from galatea.commands.common import (
    engine_arg,
    load_from_args,
    load_remote_from_args,
    model_args,
    sampling_args,
    sampling_params,
    speculative_arg,
)
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    model_args(p)
    sampling_args(p)
    speculative_arg(p)
    engine_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.engine.generate import stream_generate

    params = sampling_params(args)
    params.validate()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    remote = load_remote_from_args(args) if args.engine else None
    lm = remote.lm if remote is not None else load_from_args(args)
    ids = lm.tokenizer.encode(prompt, add_bos=False if args.no_bos else None)
    cancel = threading.Event()
    parts: list[str] = []
    last = None
    chunks = remote.generate_sync(ids, params, cancel) if remote is not None else \
        stream_generate(lm.model, lm.tokenizer, ids, params, cancel, speculative=not args.no_speculative)
    try:
        for chunk in chunks:
            parts.append(chunk.text)
            if not args.json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            last = chunk
    except KeyboardInterrupt:
        cancel.set()
        raise
    assert last is not None
    if last.error:  # a remote engine failed mid-way: what came is above, then the reason
        print(file=sys.stderr)
        raise GalateaError(last.error)
    if args.json:
        print(json.dumps({
            "text": "".join(parts), "tokens": last.generated_tokens, "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens, "prefill_tok_s": round(last.prefill_tok_s, 1),
            "decode_tok_s": round(last.decode_tok_s, 1), "seed": last.seed,
        }, ensure_ascii=False))
    else:
        print()
    return 0
