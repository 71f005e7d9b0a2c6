"""`galatea serve`: the KoboldAI, KoboldCpp, OpenAI and Ollama APIs and the chat page on one port,
for one model or several (`--model` again, or `--models DIR`; loaded on first use within
`--memory-budget`, see engine/shelf.py)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from typing import Any

from galatea.commands.common import (
    checked_format,
    data_dir_arg,
    engine_arg,
    format_arg,
    load_from_args,
    load_remote_from_args,
    model_args,
    models_args,
    open_store,
    served_entries,
    shift_arg,
    speculative_arg,
)
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="KoboldAI / KoboldCpp, OpenAI and Ollama-compatible APIs on one port")
    model_args(p, several=True)
    models_args(p)
    p.add_argument("--memory-budget", type=float, metavar="GIB",
                   help="GiB the loaded models may hold together, weights and prompt caches; the least recently "
                        "used idle one is unloaded to make room (default: three quarters of the memory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5001, help="port (default 5001, KoboldCpp's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name requests may also be addressed to when serving on loopback (behind a "
                        "reverse proxy that passes the public name, e.g. nginx's `proxy_set_header Host $host`)")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    format_arg(p, "of OpenAI chat completions and of chats set to auto (default: auto)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one batched step (default 8); more wait in line")
    p.add_argument("--cache-slots", type=int, default=4,
                   help="prompt caches kept for different chats/clients, least recently used evicted (default 4)")
    p.add_argument("--cache-memory", type=float,
                   help="GiB the prompt cache slots may use (default: a quarter of the machine's memory)")
    shift_arg(p)
    speculative_arg(p)
    engine_arg(p)
    data_dir_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy
    from pathlib import Path

    import uvicorn

    from galatea.engine.scheduler import Scheduler
    from galatea.engine.shelf import Shelf
    from galatea.server.app import create_app

    if not 0 < args.port < 65536:
        raise GalateaError(f"--port {args.port}: must be between 1 and 65535")
    if args.cache_slots < 1 or args.max_batch < 1:
        raise GalateaError("--cache-slots and --max-batch must be at least 1")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise GalateaError(f"--memory-budget {args.memory_budget}: give a positive number of GiB")
    fmt = checked_format(args.format) or "auto"
    if args.engine:  # another engine runs the model; this process builds prompts and serves
        if len(args.model or []) > 1 or args.models:
            raise GalateaError("--engine serves the one model that engine runs; give a single --model")
        args.model = (args.model or [None])[0]
        engine: Any = load_remote_from_args(args)
        engine.chat_format = fmt
        shelf = Shelf.single(engine)
    else:
        def load_one(entry: Any, wake: threading.Event) -> Scheduler:
            one = copy.copy(args)
            one.model = str(entry.path)
            return Scheduler(load_from_args(one), args.max_context, name=entry.name, cache_slots=args.cache_slots,
                             cache_memory=int(args.cache_memory * 2**30) if args.cache_memory else None,
                             context_shift=not args.no_context_shift, max_batch=args.max_batch, start=False,
                             speculative=not args.no_speculative, wake=wake)

        entries = served_entries(args)
        if getattr(args, "lora", None):
            if len(entries) > 1:
                raise GalateaError("--lora merges an adapter into one model; serve that model alone with it")
            lora = Path(args.lora)
            entries[0].name += "+" + (lora.parent.name if lora.name == "adapter" else lora.name)
        budget = int(args.memory_budget * 2**30) if args.memory_budget else default_budget()
        shelf = Shelf(entries, load_one, budget)
        shelf.chat_format = fmt
        # the default model is read now, on this thread (see Scheduler: kernels are fastest on it)
        shelf.put(entries[0].name, load_one(entries[0], shelf.wake))
        engine = shelf.engine_if_loaded(entries[0].name)
    from galatea.server.guard import LOOPBACK_NAMES

    # served on loopback: only requests addressed to a loopback name (no DNS rebinding)
    hosts = LOOPBACK_NAMES | frozenset(args.allow_host) if args.host in LOOPBACK_NAMES else None
    app = create_app(shelf, open_store(args), api_key=args.api_key, hosts=hosts)
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
    if args.engine:
        print(f"galatea: serving {engine.name} through {engine.url} on http://{args.host}:{args.port}",
              file=sys.stderr, flush=True)
    else:
        others = f"; {len(shelf.entries) - 1} more model(s) load on first use within {shelf.budget / 2**30:.1f} GiB " \
            f"({', '.join(list(shelf.entries)[1:])})" if len(shelf.entries) > 1 else ""
        print(f"galatea: serving {engine.name} (context {engine.context}) on http://{args.host}:{args.port} "
              f"- KoboldAI at /api, OpenAI at /v1, Ollama at /api/chat; prompt cache: {engine.cache_slots} slot(s) of "
              f"{engine.slot_bytes / 2**20:.0f} MiB, context shift {'off' if args.no_context_shift else 'on'}, "
              f"batches of up to {engine.max_batch}{others}", file=sys.stderr, flush=True)
    stop = threading.Thread(target=lambda: (http.join(), shelf.close()), daemon=True)
    stop.start()  # the HTTP server ending (it failed) stops the engine too
    def terminate(*_: object) -> None:  # SIGTERM: stop accepting, cancel what runs, exit
        server.should_exit = True
        shelf.close()
        # A 7B reads a 256-token prompt chunk for seconds and is only cancelled after it: exit
        # anyway within the 2 s a service manager waits. Nothing acknowledged is lost (every
        # store change is its own committed transaction; a reply is stored when complete).
        watchdog = threading.Timer(1.5, lambda: os._exit(0))
        watchdog.daemon = True  # a clean exit before then does not wait for it
        watchdog.start()

    signal.signal(signal.SIGTERM, terminate)
    try:
        shelf.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=2)
        sock.close()
        app.state.replies.close()  # the page's replies, cancelled by the engine's close, are stored
    return 0


def default_budget() -> int:
    """Three quarters of the machine's memory for the loaded models."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4
    except (ValueError, OSError, AttributeError):
        return 16 << 30
