"""`galatea bench engine --engine URL`: what Galatea costs in front of another engine. N clients
at once straight to the engine's `/v1/completions`, then the same N through `galatea serve
--engine URL` (its OpenAI route, served in this process on 127.0.0.1): aggregate tokens/s of
each and their ratio. The engine should have N slots (llama.cpp's `llama-server -np N`), or the
requests queue there either way. Every request asks for the same number of tokens
(`ignore_eos`), each with its own prompt and seed."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from galatea.engine.remote import load_remote
from galatea.errors import GalateaError
from galatea.server.app import create_app

PROMPT = "You: Tell me a long story about the {n}th dragon of the northern mountains.\nAria:"


def _round(url: str, model: str, streams: int, tokens: int) -> tuple[float, int]:
    """(seconds, tokens generated) for `streams` requests at once to `url`."""
    made = [0] * streams
    errors: list[str] = []

    def one(i: int) -> None:
        body = {"model": model, "prompt": PROMPT.format(n=i + 1), "max_tokens": tokens, "temperature": 0.8,
                "seed": 1000 + i, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        if r.status_code != 200:
            errors.append(f"{url}: HTTP {r.status_code} {r.text[:200]}")
            return
        made[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise GalateaError(errors[0])
    return time.perf_counter() - started, sum(made)


def bench_engine(url: str, model_path: Path, streams: int = 4, tokens: int = 64, repeats: int = 2) -> dict[str, Any]:
    engine = load_remote(url, model_path)
    app = create_app(engine)
    sock = socket.create_server(("127.0.0.1", 0))
    ours = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        _round(engine.url, engine.remote_model, streams, 4)  # warm both paths
        _round(ours, engine.name, streams, 4)
        direct, through = [], []
        for _ in range(repeats):  # interleaved: a noisy machine hits both alike
            s, n = _round(engine.url, engine.remote_model, streams, tokens)
            direct.append(n / s)
            s, n = _round(ours, engine.name, streams, tokens)
            through.append(n / s)
    finally:
        server.should_exit = True
        engine.close()
    best_direct, best_through = max(direct), max(through)
    return {"engine": engine.dialect.name, "url": engine.url, "streams": streams, "tokens_each": tokens,
            "direct_tok_s": round(best_direct, 2), "through_galatea_tok_s": round(best_through, 2),
            "ratio": round(best_through / best_direct, 3),
            "runs": {"direct": [round(x, 2) for x in direct], "through": [round(x, 2) for x in through]}}
