"""`galatea bench --replay SESSION.jsonl`: a recorded front-end session replayed against the
server, request by request as the front end sent it (tests/data/sillytavern-session has one
from SillyTavern 1.12.6), through the real HTTP API on 127.0.0.1 with the model on this thread,
as `galatea serve` runs it.

Per turn: the tokens the server read against the tokens really new (those of the prompt that a
difflib diff does not find in the previous prompt; the previous reply, generated here, counts
as new), the time to the first streamed token, the reply's tokens/s, and speculative drafts
drafted/accepted. Run once with speculative decoding and once without."""

from __future__ import annotations

import difflib
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from galatea.chat.store import Store
from galatea.engine.scheduler import Scheduler
from galatea.errors import GalateaError
from galatea.model.checkpoint import LoadedModel
from galatea.server.app import create_app


def read_session(path: Path) -> list[dict[str, Any]]:
    try:
        turns = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise GalateaError(f"{path}: not a recorded session ({e}); pass a JSONL file of requests") from None
    if not turns or not all("path" in t and "body" in t for t in turns):
        raise GalateaError(f"{path}: every line needs the request's `path` and `body`")
    return turns


def really_new(previous: list[int], prompt: list[int]) -> int:
    matcher = difflib.SequenceMatcher(None, previous, prompt, autojunk=False)
    return len(prompt) - sum(b.size for b in matcher.get_matching_blocks())


def replay(lm: LoadedModel, turns: list[dict[str, Any]], speculative: bool = True,
           max_length: int | None = None) -> dict[str, Any]:
    """Every turn's figures, the server serving on a thread, the engine on this one."""
    engine = Scheduler(lm, max_context=None, cache_slots=1, max_batch=1, start=False, speculative=speculative)
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(engine, Store(Path(tmp) / "replay.db"))
        sock = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        http.start()
        rows: list[dict[str, Any]] = []
        failure: list[BaseException] = []
        client = threading.Thread(target=_client, args=(url, turns, lm, max_length, rows, failure, engine))
        client.start()
        engine.run()  # until the client closes it
        client.join()
        server.should_exit = True
        http.join(timeout=10)
        sock.close()
    if failure:
        raise GalateaError(f"replay failed: {failure[0]}")
    later = rows[1:]
    total_read, total_new = sum(r["read"] for r in later), sum(r["really_new"] for r in later)
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    return {"speculative": speculative, "turns": rows,
            "read_tokens_from_turn_2": total_read, "really_new_tokens_from_turn_2": total_new,
            "read_vs_really_new": round(total_read / max(total_new, 1), 2),
            "mean_ttft_s": round(sum(r["ttft_s"] for r in rows) / len(rows), 3),
            "reply_tok_s": round(sum(r["reply_tokens"] for r in rows) / max(sum(r["reply_s"] for r in rows), 1e-9), 1),
            "draft_acceptance": round(accepted / drafted, 3) if drafted else None}


def _client(url: str, turns: list[dict[str, Any]], lm: LoadedModel, max_length: int | None,
            rows: list[dict[str, Any]], failure: list[BaseException], engine: Scheduler) -> None:
    try:
        previous: list[int] | None = None
        with httpx.Client(timeout=3600) as http:
            for turn in turns:
                body = dict(turn["body"])
                if max_length:
                    body["max_length"] = max_length
                t0 = time.perf_counter()
                first = None
                with http.stream(turn.get("method", "POST"), url + turn["path"], json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data:") and first is None:
                            first = time.perf_counter()
                end = time.perf_counter()
                perf = http.get(url + "/api/extra/perf").json()
                prompt = lm.tokenizer.encode(body.get("prompt", ""))
                read = perf["last_recomputed_count"]
                rows.append({
                    "turn": turn.get("turn", len(rows) + 1), "prompt_tokens": perf["last_input_count"], "read": read,
                    "really_new": really_new(previous, prompt) if previous is not None else len(prompt),
                    "moved": perf["last_shifted_count"], "ttft_s": round((first or end) - t0, 3),
                    "reply_tokens": perf["last_token_count"], "reply_s": round(end - (first or end), 3),
                    "drafted": perf["last_drafted_count"], "accepted": perf["last_accepted_count"]})
                previous = prompt
    except BaseException as e:  # reported by replay(), after the engine stops
        failure.append(e)
    finally:
        engine.close()


def format_table(on: dict[str, Any], off: dict[str, Any]) -> str:
    lines = [f"{'turn':>4} {'prompt':>6} {'read':>5} {'new':>5} {'moved':>5} | {'TTFT s':>7} {'tok/s':>6} "
             f"{'drafts':>9} | {'TTFT s':>7} {'tok/s':>6}   (speculative | plain)"]
    for a, b in zip(on["turns"], off["turns"], strict=True):
        rate = lambda r: r["reply_tokens"] / r["reply_s"] if r["reply_s"] > 0 else 0.0  # noqa: E731
        lines.append(f"{a['turn']:>4} {a['prompt_tokens']:>6} {a['read']:>5} {a['really_new']:>5} {a['moved']:>5} | "
                     f"{a['ttft_s']:>7.2f} {rate(a):>6.1f} {a['accepted']:>4}/{a['drafted']:<4} | "
                     f"{b['ttft_s']:>7.2f} {rate(b):>6.1f}")
    lines.append(f"from turn 2: read {on['read_tokens_from_turn_2']} tokens for {on['really_new_tokens_from_turn_2']} "
                 f"really new ({on['read_vs_really_new']}x); reply {on['reply_tok_s']} tok/s speculative vs "
                 f"{off['reply_tok_s']} plain ({on['reply_tok_s'] / max(off['reply_tok_s'], 1e-9):.2f}x), "
                 f"draft acceptance {on['draft_acceptance']}")
    return "\n".join(lines)
