"""`galatea prompt`: print the exact Pygmalion prompt a message would send."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from galatea.commands.common import checked_format, data_dir_arg, format_arg, open_store
from galatea.engine.sampling import PYGMALION_PRESET


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prompt", help="print the exact Pygmalion prompt a message would send")
    p.add_argument("--model", help="GGUF file or HF folder: its tokenizer and context size are used")
    p.add_argument("--character", help="library name or id, card file (JSON, PNG, YAML) or bundled name "
                                       "(default: aria)")
    p.add_argument("--message", help="the user's new message (default: none, the reply to the greeting)")
    p.add_argument("--user", default="You", help="the user's display name (Pygmalion was trained on 'You')")
    p.add_argument("--max-new-tokens", "-n", type=int, default=PYGMALION_PRESET["max_new_tokens"],
                   help="reply budget kept free in the context (default: the chat's, 160)")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    format_arg(p, "(default: the chat's setting with --chat, else auto)")
    p.add_argument("--chat", type=int, help="the prompt for this saved chat (its character and history)")
    p.add_argument("--recall-tokens", type=int, help="with --chat: room for recalled old messages (default: the "
                                                     "chat's recall_tokens; 0: none, as training examples have)")
    p.add_argument("--json", action="store_true", help="also print token counts and what was dropped")
    data_dir_arg(p)
    p.set_defaults(func=run)


def library_or_card(args: argparse.Namespace) -> Any:
    """--character as `galatea chat` reads it: a character of the library by name or id, else
    a card file or a bundled name (default: the bundled Aria)."""
    from galatea.chat.cards import load_character
    from galatea.errors import GalateaError

    if args.character and not Path(args.character).expanduser().is_file():  # a file never opens the store
        try:
            return open_store(args).character(args.character)[1]
        except GalateaError:
            pass
    return load_character(args.character)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from galatea.chat import formats
    from galatea.chat.lorebooks import with_lorebooks
    from galatea.chat.prompt import Turn, build_prompt
    from galatea.chat.recall import asked, memories, query_terms
    from galatea.chat.settings import resolve
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path
    from galatea.model.inspect import describe

    user = args.user
    fmt_name = checked_format(args.format)
    if args.chat is not None:
        store = open_store(args)
        info = store.chat(args.chat)
        # with the lorebooks attached to the chat or its character, as the chat reads them
        char = with_lorebooks(store.character(info.character_id)[1], [b for _, b in store.chat_lorebooks(args.chat)])
        msgs = store.messages(args.chat)
        history = [Turn(m.is_user, m.text) for m in msgs]
        user = info.user_name if args.user == "You" else args.user
        fmt_name = fmt_name or info.settings.get("format")
        # recall, as the chat does: its messages that match the newest user message
        recall_tokens = int(resolve(store.default_settings(), info.settings)[0]["recall_tokens"]) \
            if args.recall_tokens is None else max(0, args.recall_tokens)
        found = memories(store, args.chat, msgs, query_terms(asked(msgs, args.message))) if recall_tokens > 0 else []
    else:
        char = library_or_card(args)
        history = [Turn(False, char.first_mes)] if char.first_mes.strip() else []
        found, recall_tokens = [], 0
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    context = args.max_context or int(describe(path)["context_length"])
    result = build_prompt(char, history, args.message, tok, context, args.max_new_tokens, user=user,
                          fmt=formats.choose(fmt_name, tok), memories=found, memory_tokens=recall_tokens)
    if args.json:
        print(json.dumps({"prompt": result.text, **{k: v for k, v in asdict(result).items() if k != "text"},
                          "context": context, "max_new_tokens": args.max_new_tokens}, ensure_ascii=False))
    else:
        print(result.text)
    return 0
