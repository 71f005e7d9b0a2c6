"""The `galatea` command: a thin dispatcher. Each subcommand is a module of `galatea.commands`
with `add_parser(sub)` and `run(args)`; user mistakes end as one line `error: ...` on stderr
with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from galatea import __version__
from galatea.commands import (
    bench,
    characters,
    chat,
    chats,
    convert,
    eval,
    generate,
    inspect,
    lorebooks,
    models,
    prompt,
    quantize,
    serve,
    store,
    tokenize,
    train,
    xor,
)
from galatea.errors import GalateaError

# in the order `galatea --help` lists them
COMMANDS = (generate, tokenize, inspect, chat, serve, models, characters, lorebooks, chats, store, prompt, bench, xor,
            convert, quantize, train, eval)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GalateaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galatea",
                                     description="Self-hosted persona chat for LLaMA-architecture models.")
    parser.add_argument("--version", action="version", version=f"galatea {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser
