"""The `galatea` command. Each subcommand is a small function; user mistakes end as one line
`error: ...` on stderr with exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from galatea import __version__
from galatea.errors import GalateaError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _model_args(p)
    _sampling_args(p)
    _speculative_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", help="print the token ids of a text as JSON")
    p.add_argument("--model", help="GGUF file (a vocabulary-only one works) or HF folder")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("inspect", help="describe a checkpoint without loading its weights")
    p.add_argument("path", nargs="?", help="GGUF file or HF folder (default: the embedded model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("chat", help="chat with a character in the terminal")
    _model_args(p)
    p.add_argument("--character", help="library name, card file or bundled name (default: aria)")
    p.add_argument("--chat", type=int, help="open this chat (default: the character's last chat)")
    p.add_argument("--new", action="store_true", help="start a new chat")
    p.add_argument("--user", help="your name in the chat (default: You, as Pygmalion was trained)")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    p.add_argument("--max-new-tokens", "-n", type=int, help="reply length limit (default 160)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    _shift_arg(p)
    _speculative_arg(p)
    _data_dir_arg(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="KoboldAI / KoboldCpp and OpenAI-compatible APIs on one port")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5001, help="port (default 5001, KoboldCpp's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one batched step (default 8); more wait in line")
    p.add_argument("--cache-slots", type=int, default=4,
                   help="prompt caches kept for different chats/clients, least recently used evicted (default 4)")
    p.add_argument("--cache-memory", type=float,
                   help="GiB the prompt cache slots may use (default: a quarter of the machine's memory)")
    _shift_arg(p)
    _speculative_arg(p)
    _data_dir_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("characters", help="the character library: import, list, show, export, delete")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("import", help="add cards (JSON, PNG, YAML; any supported format)")
    c.add_argument("files", nargs="+")
    c = csub.add_parser("list")
    c = csub.add_parser("show")
    c.add_argument("character", help="name or id")
    c = csub.add_parser("export", help="write a card as V2 JSON or PNG (by the file's extension)")
    c.add_argument("character", help="name or id")
    c.add_argument("out", help="file.json or file.png")
    c = csub.add_parser("delete", help="remove a character and its chats")
    c.add_argument("character", help="name or id")
    for c in csub.choices.values():
        _data_dir_arg(c)
    p.set_defaults(func=cmd_characters)

    p = sub.add_parser("chats", help="saved chats: list, show, export, import")
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
    for c in csub.choices.values():
        _data_dir_arg(c)
    p.set_defaults(func=cmd_chats)

    p = sub.add_parser("prompt", help="print the exact Pygmalion prompt a message would send")
    p.add_argument("--model", help="GGUF file or HF folder: its tokenizer and context size are used")
    p.add_argument("--character", help="card file (JSON, PNG, YAML) or bundled name (default: aria)")
    p.add_argument("--message", help="the user's new message (default: none, the reply to the greeting)")
    p.add_argument("--user", default="You", help="the user's display name (Pygmalion was trained on 'You')")
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="reply budget kept free in the context")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    p.add_argument("--chat", type=int, help="the prompt for this saved chat (its character and history)")
    p.add_argument("--json", action="store_true", help="also print token counts and what was dropped")
    _data_dir_arg(p)
    p.set_defaults(func=cmd_prompt)

    p = sub.add_parser("bench", help="measure prefill and decode speed, as JSON")
    _model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--xor", action="store_true",
                   help="instead: XOR apply throughput vs the original codec's algorithm, on random files")
    p.add_argument("--size-mb", type=int, default=1024, help="with --xor: size of the file pair in MiB")
    p.add_argument("--dir", help="with --xor: where to write the temporary files (default: the system's temp)")
    p.add_argument("--chat-turn", action="store_true",
                   help="instead: time to first token of a new chat turn at full context, recompute vs "
                        "prefix reuse vs context shift")
    p.add_argument("--context", type=int, default=2048, help="with --chat-turn: the context size (default 2048)")
    p.add_argument("--suite", action="store_true",
                   help="every scenario (load, prefill/decode, new chat turn, 1/4/8 streams) as JSON and a "
                        "table, next to llama.cpp when llama-cpp-python is available")
    p.add_argument("--llama-cpp-python", metavar="PYTHON",
                   help="with --suite: an interpreter that has llama_cpp (default: this one, if it does)")
    p.add_argument("--out", help="with --suite: also write the JSON to this file")
    p.add_argument("--train", action="store_true",
                   help="instead: LoRA training tokens/s (batches of 4x128), next to transformers + peft when "
                        "they are installed")
    p.add_argument("--concurrent", action="store_true",
                   help="instead: aggregate tokens/s of 1, 4 and 8 simultaneous requests (batched)")
    p.add_argument("--replay", metavar="SESSION.jsonl",
                   help="instead: replay a recorded front-end session (e.g. shared/data/sillytavern-session/"
                        "seraphina.jsonl) through the Kobold API, with and without speculative decoding")
    p.add_argument("--replay-max-length", type=int, metavar="N",
                   help="with --replay: reply length instead of the recorded one")
    p.add_argument("--replay-temperature", type=float, metavar="T",
                   help="with --replay: this temperature instead of the recorded one (0: greedy)")
    _speculative_arg(p)
    p.set_defaults(func=cmd_bench)

    from galatea.weights.commands import add_parsers as add_weights_parsers

    add_weights_parsers(sub)
    from galatea.train.commands import add_parsers as add_train_parsers

    add_train_parsers(sub, _model_args)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: bfloat16 where the CPU/GPU has it, else float32)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the physical cores; on a 2-core machine "
                                               "whose other core is kept busy by another program, 1 is faster)")
    p.add_argument("--quant", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="weights in memory; auto keeps the file's precision (GGUF Q4 -> int4, Q5-Q8 -> int8)")
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter folder (PEFT layout, e.g. from `galatea train`), "
                                                 "merged into the weights at load")
    p.add_argument("--kernels", choices=("auto", "avx512", "avx2", "torch"),
                   help="what multiplies quantized weights: the native library's AVX-512 VNNI or AVX2 path, or "
                        "PyTorch's kernels (default: $GALATEA_KERNELS, else auto = the best this CPU has)")
    p.add_argument("--kv-cache", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="KV cache entries (auto: float16 with the native kernels, else float32 on CPU)")


def _speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-speculative", action="store_true",
                   help="do not draft tokens from the text so far and verify them in the same step "
                        "(speculative decoding: the same replies, sooner when the chat repeats itself)")


def _shift_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-context-shift", action="store_true",
                   help="when old turns drop out of the window, recompute the prompt exactly instead of "
                        "moving the cached turns (slower, no drift)")


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where chats are kept (default: $GALATEA_DATA_DIR or the platform's "
                                      "user data folder)")


def _store(args: argparse.Namespace) -> Any:
    from galatea.chat.store import Store

    return Store.open_default(args.data_dir)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: PygmalionAI's recommended settings)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--tfs", type=float, default=1.0)
    g.add_argument("--top-a", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--repetition-penalty-range", type=int, default=1024)
    g.add_argument("--repetition-penalty-slope", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS")
    g.add_argument("--ban-token", action="append", type=int, default=[], metavar="ID")
    g.add_argument("--ban-eos", action="store_true", help="never stop on EOS")
    g.add_argument("--sampler-order", default="6,0,1,3,4,2,5",
                   help="KoboldAI ids: 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen")
    g.add_argument("--seed", type=int, help="makes a run reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace) -> Any:
    from galatea.engine.sampling import SamplingParams

    bias = {}
    for item in args.logit_bias:
        tok, sep, value = item.partition("=")
        try:
            bias[int(tok)] = float(value)
        except ValueError:
            raise GalateaError(f"--logit-bias {item!r}: expected ID=BIAS, e.g. 2=-100") from None
        if not sep:
            raise GalateaError(f"--logit-bias {item!r}: expected ID=BIAS, e.g. 2=-100")
    try:
        order = tuple(int(x) for x in args.sampler_order.split(",") if x.strip())
    except ValueError:
        raise GalateaError(f"--sampler-order {args.sampler_order!r}: expected ids like 6,0,1,3,4,2,5") from None
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, typical_p=args.typical_p, tfs=args.tfs, top_a=args.top_a,
        repetition_penalty=args.repetition_penalty, repetition_penalty_range=args.repetition_penalty_range,
        repetition_penalty_slope=args.repetition_penalty_slope, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=bias, banned_tokens=tuple(args.ban_token),
        ban_eos=args.ban_eos, sampler_order=order, seed=args.seed, stop=tuple(s.encode().decode("unicode_escape")
                                                                           for s in args.stop),
    )


def _load(args: argparse.Namespace) -> Any:
    import torch

    from galatea.model.checkpoint import load

    if args.threads is not None:
        if args.threads < 1:
            raise GalateaError(f"--threads {args.threads}: give at least 1")
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GalateaError("--device cuda: no CUDA device is available; use --device cpu")
    lm = load(args.model, dtype=dtype, device=args.device, quant=args.quant, lora=getattr(args, "lora", None),
              kernels=args.kernels, kv_cache=args.kv_cache)
    print(f"galatea: {lm.kernels_note}", file=sys.stderr)
    return lm


def cmd_generate(args: argparse.Namespace) -> int:
    from galatea.engine.generate import stream_generate

    params = _sampling_params(args)
    params.validate()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    lm = _load(args)
    ids = lm.tokenizer.encode(prompt, add_bos=False if args.no_bos else None)
    cancel = threading.Event()
    parts: list[str] = []
    last = None
    try:
        for chunk in stream_generate(lm.model, lm.tokenizer, ids, params, cancel,
                                     speculative=not args.no_speculative):
            parts.append(chunk.text)
            if not args.json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            last = chunk
    except KeyboardInterrupt:
        cancel.set()
        raise
    assert last is not None
    if args.json:
        print(json.dumps({
            "text": "".join(parts), "tokens": last.generated_tokens, "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens, "prefill_tok_s": round(last.prefill_tok_s, 1),
            "decode_tok_s": round(last.decode_tok_s, 1), "seed": last.seed,
        }, ensure_ascii=False))
    else:
        print()
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(args.model))
    print(json.dumps({"ids": tok.encode(args.text, add_bos=False if args.no_bos else None)}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from galatea.model.checkpoint import resolve_model_path
    from galatea.model.inspect import describe

    info = describe(resolve_model_path(args.path))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} x{v}" for k, v in value.items())
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from galatea.chat.cards import load_character
    from galatea.chat.prompt import Turn, build_prompt
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path
    from galatea.model.inspect import describe

    user = args.user
    if args.chat is not None:
        store = _store(args)
        info = store.chat(args.chat)
        char = store.character(info.character_id)[1]
        history = [Turn(m.is_user, m.text) for m in store.messages(args.chat)]
        user = info.user_name if args.user == "You" else args.user
    else:
        char = load_character(args.character)
        history = [Turn(False, char.first_mes)] if char.first_mes.strip() else []
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    context = args.max_context or int(describe(path)["context_length"])
    result = build_prompt(char, history, args.message, tok, context, args.max_new_tokens, user=user)
    if args.json:
        print(json.dumps({"prompt": result.text, **{k: v for k, v in asdict(result).items() if k != "text"},
                          "context": context, "max_new_tokens": args.max_new_tokens}, ensure_ascii=False))
    else:
        print(result.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from galatea.chat.session import ChatSession
    from galatea.chat.tui import TerminalChat, open_chat

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    store = _store(args)
    chat_id = open_chat(store, args.character, args.chat, args.new, args.user)
    lm = _load(args)
    overrides = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                   ("seed", args.seed)) if v is not None}
    session = ChatSession(store, lm, chat_id, overrides, max_context=args.max_context,
                          context_shift=not args.no_context_shift, speculative=not args.no_speculative)
    TerminalChat(session).loop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from galatea.server.app import create_app
    from galatea.server.engine import Engine

    if not 0 < args.port < 65536:
        raise GalateaError(f"--port {args.port}: must be between 1 and 65535")
    lm = _load(args)
    if args.cache_slots < 1 or args.max_batch < 1:
        raise GalateaError("--cache-slots and --max-batch must be at least 1")
    engine = Engine(lm, args.max_context, cache_slots=args.cache_slots,
                    cache_memory=int(args.cache_memory * 2**30) if args.cache_memory else None,
                    context_shift=not args.no_context_shift, max_batch=args.max_batch, start=False,
                    speculative=not args.no_speculative)
    from galatea.server.guard import LOOPBACK_NAMES

    # served on loopback: only requests addressed to a loopback name (no DNS rebinding)
    hosts = LOOPBACK_NAMES if args.host in LOOPBACK_NAMES else None
    app = create_app(engine, _store(args), api_key=args.api_key, hosts=hosts)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:  # e.g. the port is taken
        raise GalateaError(f"cannot serve on {args.host}:{args.port} ({e.strerror}); pick another --port") from None
    # timeout_graceful_shutdown: on SIGTERM, connections get a second to end (their
    # generations are cancelled at once) before they are closed
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    # The HTTP server on a thread, the model on this one (see Engine: kernels are fastest on the
    # thread that loaded the model).
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="galatea-http", daemon=True)
    http.start()
    print(f"galatea: serving {engine.name} (context {engine.context}) on http://{args.host}:{args.port} "
          f"- KoboldAI at /api, OpenAI at /v1; prompt cache: {engine.cache_slots} slot(s) of "
          f"{engine.slot_bytes / 2**20:.0f} MiB, context shift {'off' if args.no_context_shift else 'on'}, "
          f"batches of up to {engine.max_batch}", file=sys.stderr, flush=True)
    stop = threading.Thread(target=lambda: (http.join(), engine.close()), daemon=True)
    stop.start()  # the HTTP server ending (it failed) stops the engine too
    def terminate(*_: object) -> None:  # SIGTERM: stop accepting, cancel what runs, exit
        server.should_exit = True
        engine.close()
        # A 7B reads a 256-token prompt chunk for seconds and is only cancelled after it: exit
        # anyway within the 2 s a service manager waits. Nothing acknowledged is lost (every
        # store change is its own committed transaction; a reply is stored when complete).
        watchdog = threading.Timer(1.5, lambda: os._exit(0))
        watchdog.daemon = True  # a clean exit before then does not wait for it
        watchdog.start()

    signal.signal(signal.SIGTERM, terminate)
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=2)
        sock.close()
    return 0


def cmd_characters(args: argparse.Namespace) -> int:
    from pathlib import Path

    from galatea.chat.cards import read_card

    store = _store(args)
    if args.action == "import":
        for f in args.files:
            path = Path(f)
            if not path.is_file():
                raise GalateaError(f"{path}: no such file")
            char = read_card(path.read_bytes(), where=str(path))
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
        store.delete_character(cid)
        print(f"deleted {char.name} and its chats")
    return 0


def cmd_chats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from galatea.chat import chatfiles

    store = _store(args)
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
        text = path.read_text(encoding="utf-8-sig")
        is_textgen = text.lstrip().startswith("{") and ("\"internal\"" in text or "\"visible\"" in text) \
            and "\"mes\"" not in text
        chat_id = chatfiles.import_textgen(store, text, cid, where=str(path)) if is_textgen else \
            chatfiles.import_sillytavern(store, text, cid, where=str(path))
        print(f"imported as chat {chat_id}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from galatea.engine.bench import bench

    if args.xor:
        from galatea.weights.bench import bench_xor

        if args.size_mb < 1:
            raise GalateaError("bench: --size-mb must be >= 1")
        print(json.dumps(bench_xor(args.size_mb, args.dir)))
        return 0
    if args.train:
        from galatea.train.bench import bench_train

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(bench_train(args.model)))
        return 0
    if args.prompt_tokens < 16 or args.gen_tokens < 1:
        raise GalateaError("bench: --prompt-tokens must be >= 16 and --gen-tokens >= 1")
    t = time.perf_counter()
    lm = _load(args)
    load_s = time.perf_counter() - t
    if args.suite:
        from galatea.engine.bench_suite import format_table, run_suite

        result = run_suite(lm, load_s, args.context, args.prompt_tokens, args.gen_tokens, args.llama_cpp_python)
        print(format_table(result), file=sys.stderr)
        print(json.dumps(result))
        if args.out:
            from pathlib import Path

            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    if args.replay:
        from pathlib import Path

        from galatea.server.replay import format_table, read_session, replay

        turns = read_session(Path(args.replay))
        if args.replay_temperature is not None:
            if not 0 <= args.replay_temperature <= 100:
                raise GalateaError("bench: --replay-temperature must be between 0 and 100")
            turns = [{**t, "body": {**t["body"], "temperature": args.replay_temperature}} for t in turns]
        on = replay(lm, turns, speculative=True, max_length=args.replay_max_length)
        off = replay(lm, turns, speculative=False, max_length=args.replay_max_length)
        print(format_table(on, off), file=sys.stderr)
        print(json.dumps({"speculative": on, "plain": off}))
        return 0
    if args.concurrent:
        from galatea.engine.bench import bench_concurrent

        print(json.dumps(bench_concurrent(lm, gen_tokens=args.gen_tokens if args.gen_tokens != 128 else 64,
                                          speculative=not args.no_speculative)))
        return 0
    if args.chat_turn:
        from galatea.engine.bench import bench_chat_turn

        if not 256 <= args.context <= lm.config.max_position_embeddings:
            raise GalateaError(f"bench: --context must be between 256 and the model's "
                               f"{lm.config.max_position_embeddings}")
        print(json.dumps(bench_chat_turn(lm, args.context)))
        return 0
    print(json.dumps(bench(lm, args.prompt_tokens, args.gen_tokens)))
    return 0
