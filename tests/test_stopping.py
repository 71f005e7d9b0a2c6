"""Stop means stop, and every error shows: a real `galatea serve` process on 127.0.0.1 with the
embedded model, driven as SillyTavern, KoboldAI Lite and the openai client drive it.

Each case is built so that the old behaviour fails it: a generation that outlives its client
runs for tens of seconds (2000 tokens, EOS banned), a prompt read in one piece cannot be
stopped for seconds (3,000 tokens), a page abort that reached API requests ends them early."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from galatea.engine.text_stream import IncrementalDetokenizer
from galatea.model.checkpoint import embedded_model_path, load_tokenizer
from galatea.server.schemas import ChatCompletionRequest
from galatea.server.serving import chat_stops
from tests.helpers import Server, post, running_server
from tests.test_sillytavern_replay import turns as session_turns

pytestmark = pytest.mark.server

LONG = {"max_length": 2000, "ban_eos_token": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory)


def perf(server) -> dict:
    return httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()


def wait_idle(server, within: float) -> float:
    """Seconds until the engine runs nothing; fails past `within`."""
    t = time.time()
    while perf(server)["idle"] != 1:
        assert time.time() - t < within, f"still generating {within} s after the client left"
        time.sleep(0.05)
    return time.time() - t


def story(n_words: int, seed: int) -> str:
    """A long prompt no earlier request cached (so it is really read)."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(n_words))


@pytest.mark.parametrize("path,body", [
    ("/api/v1/generate", {"prompt": "Once upon a time", **LONG}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}],
                              "max_tokens": 2000, "ignore_eos": True}),
])
def test_a_hang_up_stops_a_request_that_does_not_stream(server, path, body):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{path}", json=body, timeout=httpx.Timeout(2.0, connect=5.0))
    wait_idle(server, within=1.5)


def test_abort_while_a_long_prompt_is_read_takes_effect_within_a_chunk(server):
    body = {"prompt": story(3000, 1), "max_length": 50, "max_context_length": 8192, "genkey": "KCPP4242"}
    events: list[str] = []
    started = time.time()

    def client() -> None:
        with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=60) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data:"))

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.6)  # the prompt (3,000+ tokens, several seconds here) is being read
    asked = time.time()
    answer = post(server, "/api/extra/abort", {"genkey": "KCPP4242"}).json()
    answered = time.time() - asked
    t.join(timeout=30)
    assert answer == {"success": "true", "done": "true"}  # and it was true when said
    assert answered < 1.5, f"the abort took {answered:.1f} s"
    assert time.time() - started < 3.0 and perf(server)["idle"] == 1
    assert len(events) <= 1  # no reply text: at most the closing event
    assert perf(server)["stop_reason"] == 2


def test_a_hang_up_while_a_long_prompt_is_read_stops_it(server):
    body = {"prompt": story(3000, 2), "max_context_length": 8192, **LONG}
    with pytest.raises(httpx.ReadTimeout), \
            httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body,
                         timeout=httpx.Timeout(0.6, connect=5.0)) as r:
        for _ in r.iter_lines():
            pass
    wait_idle(server, within=1.0)


def test_the_page_stop_leaves_a_concurrent_api_request_alone(server):
    body = {"prompt": "Once upon a time", "max_length": 40, "ban_eos_token": True}
    result: dict = {}

    def client() -> None:
        result["r"] = post(server, "/api/v1/generate", body).json()

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.3)
    assert httpx.post(f"{server.url}/galatea/abort", timeout=10).json() == {"stopped": False}
    assert httpx.post(f"{server.url}/galatea/abort", json={"chat_id": 1}, timeout=10).json() == {"stopped": False}
    t.join(timeout=60)
    assert result["r"]["results"][0]["finish_reason"] == "length"
    assert perf(server)["last_token_count"] == 40


def test_kobold_errors_carry_both_shapes_and_openai_refuses_the_same(server):
    r = post(server, "/api/extra/generate/stream", {"prompt": "Hi", "mirostat": 3})
    assert r.status_code == 400
    err = r.json()
    assert "mirostat" in err["detail"]["msg"] and err["error"]["message"] == err["detail"]["msg"]
    for body in ({"prompt": "Hi", "mirostat_mode": 3}, {"prompt": "Hi", "grammar_string": "root ::= \"a\""}):
        r = post(server, "/v1/completions", body)
        assert r.status_code == 400 and ("mirostat" in r.text or "grammar" in r.text)
    r = post(server, "/v1/completions", {"prompt": "Hi", "logit_bias": {"99999999": 5}})
    assert r.status_code == 400 and "token id" in r.json()["error"]["message"]


def test_connect_calls_of_lite_answer_like_koboldcpp(server):
    assert httpx.get(f"{server.url}/api/extra/preloadstory", timeout=10).json() == {}
    assert httpx.get(f"{server.url}/sdapi/v1/sd-models", timeout=10).json() == []


def test_every_response_carries_cors_headers(tmp_path):
    s = Server(tmp_path, "--api-key", "s3cret")
    try:
        origin = {"Origin": "http://localhost:5173"}
        r = httpx.post(f"{s.url}/api/v1/generate", json={"prompt": "Hi"}, headers=origin, timeout=5)
        assert r.status_code == 401 and r.headers.get("access-control-allow-origin") in ("*", origin["Origin"])
        assert r.json()["error"]["message"] == r.json()["detail"]["msg"]
        r = httpx.post(f"{s.url}/v1/completions", content="{bad", headers={**origin, "Authorization": "Bearer s3cret"},
                       timeout=5)
        assert r.status_code == 400 and r.headers.get("access-control-allow-origin")
    finally:
        s.stop()


def test_a_reply_cut_mid_character_drops_the_incomplete_bytes(server):
    """SmolLM2's byte-level BPE writes a Japanese character as several tokens; the token limit
    can cut one in half. Checked directly on the detokenizer (the cut is certain there) and
    through the server for short limits."""
    tok = load_tokenizer(embedded_model_path())
    ids = tok.encode("お茶を", add_bos=False)
    whole = tok.decode(ids)
    for cut in range(1, len(ids) + 1):
        d = IncrementalDetokenizer(tok)
        text = "".join(d.add(i) for i in ids[:cut]) + d.flush()
        assert "\ufffd" not in text and whole.startswith(text), (cut, text)
    assert any("\ufffd" in tok.decode(ids[:cut]) for cut in range(1, len(ids)))  # the case exists
    for n in range(1, 6):
        for seed in range(3):
            r = post(server, "/api/v1/generate", {"prompt": "日本語で話してください。お茶", "max_length": n,
                                                  "sampler_seed": seed, "temperature": 1.0}).json()
            assert "\ufffd" not in r["results"][0]["text"]


def test_chat_completions_stop_at_any_participants_line():
    req = ChatCompletionRequest(messages=[{"role": "user", "name": "Pipe", "content": "hi"},
                                          {"role": "user", "content": "hello"},
                                          {"role": "assistant", "name": "Aria", "content": "Hi!"}])
    stops = chat_stops("Aria", "Sam", [m.name for m in req.messages if m.name])
    for stop in ("\nAria:", "\nPipe:", "\nSam:", "\nsam:", "\nSAM:", "\nyou:", "\nYou:"):
        assert stop in stops, stop


def test_sigterm_cancels_and_exits_within_two_seconds(tmp_path):
    s = Server(tmp_path)
    lines: list[str] = []

    def client() -> None:
        try:
            with httpx.stream("POST", f"{s.url}/api/extra/generate/stream",
                              json={"prompt": "Once upon a time", **LONG}, timeout=30) as r:
                lines.extend(r.iter_lines())
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=client)
    t.start()
    while not any(line.startswith("data:") for line in lines):
        time.sleep(0.05)
    start = time.time()
    os.kill(s.proc.pid, signal.SIGTERM)
    s.proc.wait(timeout=10)
    took = time.time() - start
    t.join(timeout=10)
    log = s.proc.stdout.read()
    assert took < 2.0, f"exited {took:.1f} s after SIGTERM"
    assert s.proc.returncode == 0 and "Traceback" not in log, log
    assert not t.is_alive()  # its stream was ended, not left hanging


def test_a_failure_inside_a_stream_reaches_the_client_as_an_error_event(tmp_path, monkeypatch):
    """After the 200 and the first tokens nothing can change the status: the failure arrives as
    an SSE error event carrying `error.message` (what SillyTavern's and the openai client's
    stream readers look for), and the stream ends. The server, in process on 127.0.0.1, has a
    generation step that fails on its 3rd token."""
    import socket

    import uvicorn

    from galatea.chat.store import Store
    from galatea.engine import generate
    from galatea.engine.scheduler import Scheduler
    from galatea.model.checkpoint import load
    from galatea.server.app import create_app

    sample, calls = generate.Generation.sample, {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("the step failed")
        return sample(self)

    monkeypatch.setattr(generate.Generation, "sample", failing)
    engine = Scheduler(load(None), cache_slots=1)
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Store(tmp_path / "db")), log_level="critical"))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    http.start()
    try:
        while not server.started:
            time.sleep(0.05)
        body = {"prompt": "Once upon a time", **LONG}
        with httpx.stream("POST", f"{url}/api/extra/generate/stream", json=body, timeout=30) as r:
            text = r.read().decode()
        assert r.status_code == 200 and "event: error\ndata: " in text, text
        err = json.loads(text.split("event: error\ndata: ")[1].split("\n")[0])
        assert "the step failed" in err["error"]["message"] and err["detail"]["msg"] == err["error"]["message"]
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 50, "ignore_eos": True,
                                                                "stream": True}, timeout=30) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "the step failed" in json.loads(events[-2])["error"]["message"]
    finally:
        server.should_exit = True
        http.join(timeout=10)
        engine.close()


@pytest.mark.parametrize("settings", [
    {"mirostat": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1},
    {"mirostat": 1, "mirostat_tau": 3.0, "mirostat_eta": 0.2},
    {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breakers": ["\n", ":", "*"]},
    {"xtc_threshold": 0.1, "xtc_probability": 0.5, "dynatemp_range": 0.3, "smoothing_factor": 0.2},
], ids=["mirostat2", "mirostat1", "dry", "xtc-dynatemp-smoothing"])
def test_sillytavern_bodies_with_the_newer_samplers_get_replies(server, settings):
    """SillyTavern's recorded request bodies with each sampler set, on the Kobold routes
    (streaming and not) and, with text-generation-webui's names, on /v1/completions: replies in
    the shapes SillyTavern reads."""
    body = {**session_turns()[1]["body"], **settings, "max_length": 12}
    r = post(server, "/api/v1/generate", body)
    assert r.status_code == 200 and isinstance(r.json()["results"][0]["text"], str), r.text
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=120) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert s.status_code == 200 and events[-1]["finish_reason"] in ("stop", "length")
    webui = {k.replace("mirostat", "mirostat_mode") if k == "mirostat" else k: v for k, v in settings.items()}
    if "dry_sequence_breakers" in webui:
        webui["dry_sequence_breakers"] = json.dumps(webui["dry_sequence_breakers"])  # as SillyTavern sends it
    r = post(server, "/v1/completions", {"prompt": body["prompt"], "max_tokens": 12, **webui})
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["text"], str), r.text


def test_banned_phrases_on_both_api_families(server):
    prompt = ("You: Count with me: one two three four five six seven eight nine ten. Again!\n"
              "Aria: one two three four five six seven eight nine ten. Again?\nYou: Yes, again!\nAria:")
    base = {"prompt": prompt, "max_length": 16, "temperature": 0, "rep_pen": 1.0}
    plain = post(server, "/api/v1/generate", base).json()["results"][0]["text"]
    assert "six seven" in plain
    kobold = post(server, "/api/v1/generate", {**base, "banned_tokens": ["Six Seven"]}).json()["results"][0]["text"]
    openai = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                              "banned_strings": ["six seven"]}).json()["choices"][0]["text"]
    for text in (kobold, openai):
        assert "six seven" not in text.lower() and text.startswith(plain[: plain.find(" six seven")]), text


def test_logprobs_in_the_shapes_each_dialect_reads(server):
    prompt = "You: Hello!\nAria:"
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "logprobs": 2, "temperature": 0,
                                         "ignore_eos": True}).json()["choices"][0]
    lp = r["logprobs"]
    assert "".join(lp["tokens"]) == r["text"] and len(lp["token_logprobs"]) == 6
    assert lp["text_offset"][0] == 0 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])
    assert all(max(alts.values()) == chosen for alts, chosen in zip(lp["top_logprobs"], lp["token_logprobs"],
                                                                      strict=True))  # greedy: the best
    k = post(server, "/api/v1/generate", {"prompt": prompt, "max_length": 6, "logprobs": True, "temperature": 0,
                                          "ban_eos_token": True, "rep_pen": 1.0}).json()["results"][0]
    content = k["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == k["text"] and len(content[0]["top_logprobs"]) == 5
    c = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                              "logprobs": True, "top_logprobs": 1}).json()["choices"][0]
    assert len(c["logprobs"]["content"]) >= 1 and len(c["logprobs"]["content"][0]["top_logprobs"]) == 1


def test_perf_and_version_speak_koboldcpp(server):
    """KoboldCpp 1.76 (the version whose samplers we honour); perf in its units, milliseconds
    per token (it divides the reading time by the prompt's tokens)."""
    assert httpx.get(f"{server.url}/api/extra/version", timeout=10).json()["version"] == "1.76"
    post(server, "/api/v1/generate", {"prompt": story(300, 9), "max_length": 20, "ban_eos_token": True})
    p = perf(server)
    assert p["last_token_count"] == 20
    assert 0.5 < p["last_eval"] < 1000 and 0.05 < p["last_process"] < 1000  # ms: ~5-20 and ~1 here


def test_streamed_logprobs_arrive_with_their_tokens(server):
    body = {"prompt": "You: Hello!\nAria:", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "stream": True, "banned_strings": ["Hello"]}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    tokens = [t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert "".join(tokens) == text and len(tokens) == 8 and "hello" not in text.lower()
    offsets = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and offsets[0] == 0
