"""Galatea driving an engine that is not its own (issue 14, point 1): llama-cpp-python's
OpenAI-compatible server (built from PyPI's sdist by `make test`) serving the embedded SmolLM2,
behind `galatea serve --engine`. The request bodies for vLLM, aphrodite-engine and llama.cpp's
server are checked against the fields their OpenAI protocol documents (they cannot run here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from galatea.engine.remote import APHRODITE, LLAMA_CPP, LLAMA_CPP_PYTHON, VLLM, approximations, request_body
from galatea.engine.sampling import SamplingParams
from galatea.errors import GalateaError
from galatea.model.checkpoint import embedded_model_path
from tests.checkpoints import ROOT, shared_vocab
from tests.helpers import Server, free_port

STORY = "You: Tell me a long story about a dragon and a knight.\nAria:"


def test_request_bodies_speak_each_engines_fields():
    p = SamplingParams(temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1, repetition_penalty_range=512,
                       seed=3, stop=["\nYou:"], ban_eos=True)
    # vLLM's CompletionRequest: OpenAI's fields plus its sampling extras (top_k, min_p,
    # repetition_penalty, ignore_eos, skip_special_tokens), token ids accepted as the prompt;
    # it has no repetition range: a penalty with one applies over its whole window (said at start)
    ranged = request_body(VLLM, "m", [1, 2, 3], p, 64)
    assert approximations(VLLM) and "whole window" in approximations(VLLM)[0] and not approximations(LLAMA_CPP)
    p.repetition_penalty_range = 0
    assert ranged == request_body(VLLM, "m", [1, 2, 3], p, 64) == {
        "model": "m", "prompt": [1, 2, 3], "max_tokens": 64, "stream": True, "temperature": 0.7, "stop": ["\nYou:"],
        "seed": 3, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
        "skip_special_tokens": False}
    # llama.cpp's server: its native names on /v1/completions, the prompt cache kept
    p.repetition_penalty_range = 512
    assert request_body(LLAMA_CPP, "m", [1, 2], p, 8) == {
        "model": "m", "prompt": [1, 2], "max_tokens": 8, "stream": True, "temperature": 0.7, "stop": ["\nYou:"],
        "seed": 3, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.1, "repeat_last_n": 512, "ignore_eos": True,
        "cache_prompt": True}
    # aphrodite-engine (PygmalionAI's own): vLLM's fields and the samplers persona chat uses
    mirostat = SamplingParams(temperature=1.0, mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2, tfs=0.95, top_a=0.1)
    assert request_body(APHRODITE, "m", [1], mirostat, 4) == {
        "model": "m", "prompt": [1], "max_tokens": 4, "stream": True, "temperature": 1.0, "tfs": 0.95, "top_a": 0.1,
        "mirostat_mode": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "skip_special_tokens": False}
    for dialect, sampler, value in ((VLLM, "mirostat", 2), (LLAMA_CPP_PYTHON, "dry_multiplier", 0.8),
                                    (LLAMA_CPP, "top_a", 0.2)):
        with pytest.raises(GalateaError, match=f"the {dialect.name} has no {sampler.replace('_', ' ')}"):
            request_body(dialect, "m", "x", SamplingParams(**{sampler: value}), 4)


LLAMA_TOOLS = Path.home() / ".cache" / "galatea" / "llama-cpp-tools-0.3.36" / "bin"
ENGINES = ["llama-cpp-python", "llama-server"]


def start_engine(kind: str, log_path, *extra: str) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's server, or llama.cpp's own `llama-server` (built by `make test` from the
    same sources), on the embedded model on a loopback port (its chatty log to a file)."""
    port = free_port()
    if kind == "llama-server":
        binary = LLAMA_TOOLS / "llama-server"
        if not binary.exists():
            raise AssertionError(f"{binary} is missing; `make test` builds it from the llama-cpp-python sdist")
        cmd = [str(binary), "-m", str(embedded_model_path()), "--host", "127.0.0.1", "--port", str(port),
               "-c", "4096", "-np", "1", *extra]
    else:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as e:
            raise AssertionError(f"llama-cpp-python[server] is needed ({e}); `make test` builds it") from None
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200 and \
                    (kind != "llama-server" or httpx.get(url + "/health", timeout=2).status_code == 200):
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{kind} did not start:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module", params=ENGINES)
def llama_server(request, tmp_path_factory):
    proc, url = start_engine(request.param, tmp_path_factory.mktemp("llama") / "server.log")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _direct(url: str, prompt: str, n: int) -> str:
    """The same prompt through llama.cpp directly, greedy."""
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=120)
    return r.json()["choices"][0]["text"]


@pytest.mark.server
def test_galatea_serves_through_llama_cpp(llama_server, tmp_path):
    server = Server(tmp_path, "--engine", llama_server, "--max-context", "4096")
    try:
        greedy = {"prompt": STORY, "max_length": 24, "temperature": 0, "rep_pen": 1, "top_p": 1, "top_k": 0}
        direct = _direct(llama_server, STORY, 24)
        kobold = httpx.post(f"{server.url}/api/v1/generate", json=greedy, timeout=120).json()["results"][0]["text"]
        assert kobold == direct and direct.strip()
        stream = httpx.post(f"{server.url}/v1/completions", json={"prompt": STORY, "max_tokens": 24, "temperature": 0,
                                                                  "stream": True}, timeout=120)
        pieces = [json.loads(line[6:]) for line in stream.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(p["choices"][0]["text"] for p in pieces) == direct
        # every one of n choices runs (the first one's end once cancelled the second before it began)
        both = httpx.post(f"{server.url}/v1/completions", json={"prompt": STORY, "max_tokens": 24, "temperature": 0,
                                                                "n": 2}, timeout=120).json()
        assert [c["text"] for c in both["choices"]] == [direct, direct]
        cut = direct.split()[3]
        stopped = httpx.post(f"{server.url}/api/v1/generate", json={**greedy, "stop_sequence": [cut]},
                             timeout=120).json()["results"][0]["text"]
        assert stopped == direct[:direct.index(cut)]
        # KoboldAI's sloped penalty has no counterpart there: refused in one line, naming the engine
        refused = httpx.post(f"{server.url}/api/v1/generate", json={**greedy, "rep_pen": 1.1, "rep_pen_range": 64},
                             timeout=60)
        assert refused.status_code == 400 and "has no repetition penalty slope setting" in refused.text
        sloped = httpx.post(f"{server.url}/api/v1/generate", timeout=60, json={
            **greedy, "rep_pen": 1.1, "rep_pen_range": 64, "rep_pen_slope": 0})
        assert sloped.status_code == 200  # a flat range: the engine's own, or its whole window (said at start)

        # the page's chat with its default settings (Pygmalion's: a penalty over 1024 tokens), its
        # prompt built here and its reply from the engine
        aria = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
        chat = httpx.post(f"{server.url}/galatea/characters/{aria}/chats", timeout=10).json()["id"]
        httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"max_new_tokens": 16}, timeout=10)
        with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/send", json={"text": "Hello!"}, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and "error" not in events[-1], events[-1]
        messages = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
        assert len(messages) == 3 and messages[2]["text"] == "".join(e.get("text", "") for e in events).strip()

        # an abort reaches the engine: it is free again at once, not after 400 more tokens
        long = {**greedy, "prompt": STORY, "max_length": 400, "genkey": "long"}
        t = threading.Thread(target=lambda: httpx.post(f"{server.url}/api/v1/generate", json=long, timeout=120))
        t.start()
        time.sleep(1.0)
        httpx.post(f"{server.url}/api/extra/abort", json={"genkey": "long"}, timeout=10)
        t.join(timeout=60)
        started = time.time()
        _direct(llama_server, "You: Hi\nAria:", 4)
        assert time.time() - started < 5, "the engine went on with the aborted request"
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
    ranged = "llama.cpp server" in log  # llama.cpp's server has a penalty range; the others say what they do
    assert ranged != ("has no repetition penalty range: the penalty applies over its whole window" in log), log


@pytest.mark.server
@pytest.mark.parametrize("kind", ENGINES)
def test_a_killed_engine_keeps_the_partial_reply_and_a_wrong_tokenizer_is_refused(tmp_path, kind):
    engine, url = start_engine(kind, tmp_path / "engine.log")
    wrong = subprocess.run([sys.executable, "-m", "galatea", "serve", "--engine", url, "--model", str(shared_vocab()),
                            "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.count("error:") == 1
    assert "the engine's tokenizer is not the one of" in wrong.stderr and "Traceback" not in wrong.stderr

    server = Server(tmp_path, "--engine", url, "--max-context", "4096")
    try:
        aria = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
        chat = httpx.post(f"{server.url}/galatea/characters/{aria}/chats", timeout=10).json()["id"]
        httpx.put(f"{server.url}/galatea/chats/{chat}/settings",
                  json={"max_new_tokens": 1500, "temperature": 0, "repetition_penalty": 1.0}, timeout=10)
        events = []
        story = {"text": "Tell me a very long story about the sea, with every detail."}
        with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/send", json=story, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if sum(len(e.get("text", "")) for e in events) > 20 and engine.poll() is None:
                        engine.kill()  # mid-reply
        assert events[-1]["done"] and "stopped answering mid-reply" in events[-1]["error"], events[-1]
        written = "".join(e.get("text", "") for e in events).strip()
        messages = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
        assert len(messages) == 3 and messages[2]["text"] == written and len(written) >= 20  # kept
    finally:
        engine.kill()
        log = server.stop()
    assert "Traceback" not in log, log



@pytest.mark.server
def test_four_chats_stream_at_once_through_llama_server(tmp_path):
    """llama.cpp's own server with four slots (-np 4) behind Galatea: four page chats sent
    together stream side by side (each one's first words before any one ends), and every reply
    is stored whole."""
    engine, url = start_engine("llama-server", tmp_path / "engine.log", "-np", "4", "-c", "8192")
    server = Server(tmp_path, "--engine", url, "--max-context", "2048")
    try:
        aria = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
        chats = []
        for _ in range(4):
            chat = httpx.post(f"{server.url}/galatea/characters/{aria}/chats", timeout=10).json()["id"]
            httpx.put(f"{server.url}/galatea/chats/{chat}/settings", timeout=10,
                      json={"max_new_tokens": 64, "temperature": 0, "repetition_penalty": 1.0})
            chats.append(chat)
        timeline: dict[str, list[tuple[float, dict]]] = {c: [] for c in chats}

        def send(chat: str) -> None:
            story = {"text": "Tell me a very long story about the sea, with every detail."}
            with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/send", json=story, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        timeline[chat].append((time.monotonic(), json.loads(line[6:])))

        threads = [threading.Thread(target=send, args=(c,)) for c in chats]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for chat, events in timeline.items():
            assert events and events[-1][1]["done"] and "error" not in events[-1][1], events[-1:]
            written = "".join(e.get("text", "") for _, e in events).strip()
            messages = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
            assert len(messages) == 3 and messages[2]["text"] == written and written
        first_words = max(next(at for at, e in events if e.get("text")) for events in timeline.values())
        first_end = min(events[-1][0] for events in timeline.values())
        assert first_words < first_end, "the chats took turns instead of streaming together"
    finally:
        engine.kill()
        log = server.stop()
    assert "Traceback" not in log, log


VLLM_MODELS = {"object": "list", "data": [{
    "id": "PygmalionAI/pygmalion-2-7b", "object": "model", "created": 1732950000, "owned_by": "vllm",
    "root": "PygmalionAI/pygmalion-2-7b", "parent": None, "max_model_len": 4096,
    "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}]}]}


def _vllm_chunk(text: str, finish: str | None) -> str:
    """One streamed completion chunk in vLLM's CompletionStreamResponse shape."""
    return "data: " + json.dumps({
        "id": "cmpl-5f2c", "object": "text_completion", "created": 1732950001, "model": "PygmalionAI/pygmalion-2-7b",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        "usage": None}) + "\n\n"


def test_a_vllm_shaped_server_is_recognised_and_streamed(tmp_path):
    """A stand-in answering in the shapes of vLLM's OpenAI protocol (/v1/models with owned_by
    "vllm" and max_model_len, /tokenize, a completion stream ending in finish_reason "length"
    and [DONE]): found as vLLM, its context taken, the prompt sent as token ids with vLLM's
    fields, the stream read to the end."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from galatea.engine.remote import load_remote

    tok_path = embedded_model_path()
    seen: list[dict] = []

    class VLLMShaped(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _json(self, obj: object, status: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._json(VLLM_MODELS) if self.path == "/v1/models" else self._json({"detail": "Not Found"}, 404)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                from galatea.model.checkpoint import load_tokenizer

                tokens = load_tokenizer(tok_path).encode(body["prompt"], add_bos=False)
                return self._json({"count": len(tokens), "max_model_len": 4096, "tokens": tokens})
            seen.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for text, finish in ((" Well", None), (" met,", None), (" traveller", "length")):
                self.wfile.write(_vllm_chunk(text, finish).encode())
            self.wfile.write(b"data: [DONE]\n\n")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), VLLMShaped)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        engine = load_remote(f"http://127.0.0.1:{httpd.server_port}/v1", tok_path)
        assert engine.dialect.name == "vLLM" and engine.context == 4096 and engine.name == "PygmalionAI/pygmalion-2-7b"
        ids = engine.tokenize("You: Hello\nAria:")
        chunks = list(engine.generate_sync(ids, SamplingParams(max_new_tokens=3, temperature=0.8, min_p=0.1)))
        assert "".join(c.text for c in chunks) == " Well met, traveller" and chunks[-1].finish_reason == "length"
        assert seen == [{"model": "PygmalionAI/pygmalion-2-7b", "prompt": ids, "max_tokens": 3, "stream": True,
                         "temperature": 0.8, "min_p": 0.1, "skip_special_tokens": False}]
    finally:
        httpd.shutdown()
