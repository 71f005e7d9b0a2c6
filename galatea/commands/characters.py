"""`galatea characters`: the character library (import, list, show, export, delete)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from galatea.commands.common import confirmed, data_dir_arg, open_store
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("characters", help="the character library: import, list, show, export, delete")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("import", help="add cards (JSON, PNG, YAML; any supported format)")
    c.add_argument("files", nargs="+")
    c.add_argument("--copy", action="store_true", help="add a card even when the same card is already there")
    c = csub.add_parser("list")
    c = csub.add_parser("show")
    c.add_argument("character", help="name or id")
    c = csub.add_parser("export", help="write a card as V2 JSON or PNG (by the file's extension)")
    c.add_argument("character", help="name or id")
    c.add_argument("out", help="file.json or file.png")
    c = csub.add_parser("delete", help="remove a character and its chats (asks first)")
    c.add_argument("--yes", "-y", action="store_true", help="do not ask (scripts)")
    c.add_argument("character", help="name or id")
    for c in csub.choices.values():
        data_dir_arg(c)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from galatea.chat.cards import read_card

    store = open_store(args)
    if args.action == "import":
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise GalateaError(f"{path}: no such file")
            char = read_card(path.read_bytes(), where=str(path))
            existing = None if args.copy else store.find_character(char)
            if existing is not None:
                print(f"{existing}\t{char.name}\t(already in the library: the same card; --copy adds another)")
                continue
            print(f"{store.add_character(char)}\t{char.name}\t({char.source_format} from {path.name})")
    elif args.action == "list":
        for cid, name in store.characters():
            print(f"{cid}\t{name}")
    elif args.action == "show":
        cid, char = store.character(args.character)
        print(json.dumps({"id": cid, **char.to_v2()["data"]}, indent=2, ensure_ascii=False))
    elif args.action == "export":
        _, char = store.character(args.character)
        out = Path(args.out)
        data = char.to_png() if out.suffix.lower() == ".png" else \
            json.dumps(char.to_v2(), indent=2, ensure_ascii=False).encode("utf-8")
        out.write_bytes(data)
        print(f"wrote {out}")
    elif args.action == "delete":
        cid, char = store.character(args.character)
        n = len(store.chats(cid))
        if not confirmed(args.yes, f"delete {char.name} (id {cid}) and its {n} chat{'s' if n != 1 else ''}?",
                         f"deleting {char.name} also deletes its {n} chats"):
            return 1
        store.delete_character(cid)
        print(f"deleted {char.name} and its {n} chats")
    return 0
