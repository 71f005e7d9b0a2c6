"""`galatea lorebooks`: world info kept on its own (import, list, show, attach, detach, export, delete)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from galatea.commands.common import confirmed, data_dir_arg, open_store
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("lorebooks", help="world info: import SillyTavern files, attach them to characters or chats")
    lsub = p.add_subparsers(dest="action", required=True)
    c = lsub.add_parser("import", help="SillyTavern world-info JSON, a V3 lorebook, or a card's own book")
    c.add_argument("files", nargs="+")
    c.add_argument("--name", help="its name (default: the file's name)")
    lsub.add_parser("list")
    c = lsub.add_parser("show", help="its entries")
    c.add_argument("lorebook", help="name or id")
    for action, verb in (("attach", "use it in"), ("detach", "stop using it in")):
        c = lsub.add_parser(action, help=f"{verb} every chat with a character, or one chat")
        c.add_argument("lorebook", help="name or id")
        where = c.add_mutually_exclusive_group(required=True)
        where.add_argument("--character", help="name or id")
        where.add_argument("--chat", type=int, help="chat id (see `galatea chats list`)")
    c = lsub.add_parser("export", help="write it as SillyTavern world-info JSON")
    c.add_argument("lorebook", help="name or id")
    c.add_argument("out", help="file.json")
    c = lsub.add_parser("delete", help="remove it (asks first)")
    c.add_argument("lorebook", help="name or id")
    c.add_argument("--yes", "-y", action="store_true", help="do not ask (scripts)")
    for c in lsub.choices.values():
        data_dir_arg(c)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from galatea.chat.lorebooks import read_lorebook, to_world_info

    store = open_store(args)
    if args.action == "import":
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise GalateaError(f"{path}: no such file")
            book = read_lorebook(path.read_bytes(), where=str(path), name=args.name or path.stem)
            print(f"{store.add_lorebook(book)}\t{book.name}\t{len(book.entries)} entries")
    elif args.action == "list":
        names = dict(store.characters())
        for lid, book in store.lorebooks():
            links = store.lorebook_links(lid)
            used = [names.get(c, "?") for c in links["characters"]] + [f"chat {c}" for c in links["chats"]]
            print(f"{lid}\t{book.name}\t{len(book.entries)} entries\t{', '.join(used) or 'not attached'}")
    elif args.action == "show":
        lid, book = store.lorebook(args.lorebook)
        print(json.dumps({"id": lid, "name": book.name, **book.book}, indent=2, ensure_ascii=False))
    elif args.action in ("attach", "detach"):
        lid, book = store.lorebook(args.lorebook)
        character = store.character(args.character)[0] if args.character else None
        store.attach_lorebook(lid, character_id=character, chat_id=args.chat, attached=args.action == "attach")
        whom = f"every chat with {store.character(character)[1].name}" if character is not None else f"chat {args.chat}"
        print(f"{book.name}: {'used in' if args.action == 'attach' else 'no longer used in'} {whom}")
    elif args.action == "export":
        _, book = store.lorebook(args.lorebook)
        out = Path(args.out)
        out.write_text(json.dumps(to_world_info(book), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    elif args.action == "delete":
        lid, book = store.lorebook(args.lorebook)
        if not confirmed(args.yes, f"delete the lorebook {book.name} (id {lid})?",
                         f"deleting the lorebook {book.name} cannot be undone"):
            return 1
        store.delete_lorebook(lid)
        print(f"deleted {book.name}")
    return 0
