"""`galatea store`: where the chats are kept, and moving them between SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from galatea.commands.common import data_dir_arg, open_store


def add_parser(sub: Any) -> None:
    p = sub.add_parser("store", help="the chat store: where it is, and copying it to SQLite or PostgreSQL")
    ssub = p.add_subparsers(dest="action", required=True)
    c = ssub.add_parser("info", help="where the chats are, what they hold, the schema version")
    data_dir_arg(c)
    c = ssub.add_parser("copy", help="copy everything (characters, chats, lorebooks, presets) into another store")
    c.add_argument("to", help="postgresql://USER@HOST/DB, or an SQLite file (created if missing)")
    data_dir_arg(c)  # the store copied from
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.chat.database import is_url
    from galatea.chat.store import Store, copy_library

    src = open_store(args)
    if args.action == "info":
        print(f"{src.label}: {len(src.characters())} characters, {len(src.chats())} chats, "
              f"{len(src.lorebooks())} lorebooks, {len(src.presets())} presets (schema {src.schema_version()})")
        return 0
    dst = Store(args.to if is_url(args.to) else Path(args.to).expanduser())
    counts = copy_library(src, dst)
    print(f"copied {', '.join(f'{n} {what}' for what, n in counts.items())} from {src.label} to {dst.label}")
    return 0
