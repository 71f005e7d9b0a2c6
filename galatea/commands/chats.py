"""`galatea chats`: saved chats (list, show, export, import, rename, delete, search)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from galatea.commands.common import confirmed, data_dir_arg, open_store
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chats", help="saved chats: list, show, export, import, rename, delete, search")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("list")
    c.add_argument("--character", help="only this character's chats")
    c = csub.add_parser("show")
    c.add_argument("chat", type=int)
    c = csub.add_parser("export", help="SillyTavern JSONL (.jsonl) or text-generation-webui history (.json)")
    c.add_argument("chat", type=int)
    c.add_argument("out")
    c = csub.add_parser("import", help="a SillyTavern .jsonl or text-generation-webui .json history")
    c.add_argument("file")
    c.add_argument("--character", required=True, help="the library character the chat is with")
    c = csub.add_parser("rename")
    c.add_argument("chat", type=int)
    c.add_argument("title")
    c = csub.add_parser("delete", help="remove a chat (asks first)")
    c.add_argument("chat", type=int)
    c.add_argument("--yes", "-y", action="store_true", help="do not ask (scripts)")
    c = csub.add_parser("search", help="messages containing some text (any swipe, any case)")
    c.add_argument("text")
    c.add_argument("--character", help="only this character's chats")
    for c in csub.choices.values():
        data_dir_arg(c)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from galatea.chat import chatfiles

    store = open_store(args)
    if args.action == "list":
        cid = store.character(args.character)[0] if args.character else None
        names = dict(store.characters())
        for info in store.chats(cid):
            print(f"{info.id}\t{names.get(info.character_id, '?')}\t{info.messages} messages\t{info.title}")
    elif args.action == "show":
        for i, m in enumerate(store.messages(store.chat(args.chat).id), 1):
            swipe = f" [{m.active + 1}/{len(m.swipes)}]" if len(m.swipes) > 1 else ""
            print(f"#{i} {m.name}: {m.text}{swipe}")
    elif args.action == "export":
        out = Path(args.out)
        text = chatfiles.export_textgen(store, args.chat) if out.suffix.lower() == ".json" else \
            chatfiles.export_sillytavern(store, args.chat)
        out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}")
    elif args.action == "import":
        path = Path(args.file)
        if not path.is_file():
            raise GalateaError(f"{path}: no such file")
        cid, _ = store.character(args.character)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise GalateaError(f"{path}: not a chat file (binary data, e.g. a PNG card); chats are SillyTavern .jsonl "
                               "or text-generation-webui .json files, and cards go to `galatea characters import`") \
                from None
        chat_id = chatfiles.import_chat(store, text, cid, where=str(path))
        print(f"imported as chat {chat_id}")
        said, name = chatfiles.character_name(text), store.character(cid)[1].name
        if said is not None and said.strip().lower() != name.strip().lower():
            print(f"warning: this chat was with {said!r}, not {name!r}; it was imported for {name} anyway",
                  file=sys.stderr)
    elif args.action == "rename":
        store.rename_chat(args.chat, args.title)
        print(f"chat {args.chat}: {args.title}")
    elif args.action == "delete":
        info = store.chat(args.chat)
        if not confirmed(args.yes, f"delete chat {info.id} '{info.title}' ({info.messages} messages)?",
                         f"deleting chat {info.id} ({info.messages} messages) cannot be undone"):
            return 1
        store.delete_chat(info.id)
        print(f"deleted chat {info.id}")
    elif args.action == "search":
        cid = store.character(args.character)[0] if args.character else None
        for chat_id, position, text in store.search(args.text, cid):
            print(f"chat {chat_id} #{position + 1}: {' '.join(text.split())[:160]}")
    return 0
