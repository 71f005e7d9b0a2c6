"""`galatea chat`: chat with a character in the terminal."""

from __future__ import annotations

import argparse
from typing import Any

from galatea.commands.common import (
    checked_format,
    data_dir_arg,
    engine_arg,
    format_arg,
    load_from_args,
    load_remote_from_args,
    model_args,
    open_store,
    shift_arg,
    speculative_arg,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat with a character in the terminal")
    model_args(p)
    p.add_argument("--character", help="library name, card file or bundled name (default: aria)")
    p.add_argument("--chat", type=int, help="open this chat (default: the character's last chat)")
    p.add_argument("--new", action="store_true", help="start a new chat")
    p.add_argument("--user", help="your name in the chat (default: You, as Pygmalion was trained)")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    p.add_argument("--max-new-tokens", "-n", type=int, help="reply length limit (default: the Pygmalion preset's 160)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    format_arg(p, "for this session (default: the chat's setting, else auto)")
    shift_arg(p)
    speculative_arg(p)
    engine_arg(p)
    data_dir_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from galatea.chat.session import ChatSession
    from galatea.chat.tui import TerminalChat, open_chat

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    store = open_store(args)
    chat_id = open_chat(store, args.character, args.chat, args.new, args.user)
    overrides = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                   ("seed", args.seed), ("format", checked_format(args.format))) if v is not None}
    if args.engine:
        remote = load_remote_from_args(args)
        session = ChatSession(store, remote.lm, chat_id, overrides, max_context=remote.context,
                              generate=remote.generate_sync)
    else:
        session = ChatSession(store, load_from_args(args), chat_id, overrides, max_context=args.max_context,
                              context_shift=not args.no_context_shift, speculative=not args.no_speculative)
    TerminalChat(session).loop()
    return 0
