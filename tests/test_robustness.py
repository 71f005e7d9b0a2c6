"""The findings of a probe of `galatea serve` as a crowd and a careless client would use it,
each replayed against a real server process (issue 17's first items): the chat API must not
deadlock, concurrent writes must not fail or half-happen, and bad values get a 4xx, never a 500.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from galatea.chat.cards import load_character
from galatea.chat.session import ChatSession
from galatea.chat.store import Store
from tests.helpers import Server, running_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory)


def new_chat(server) -> int:
    character = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
    return httpx.post(f"{server.url}/galatea/characters/{character}/chats", timeout=10).json()["id"]


def test_forty_four_sends_whose_clients_give_up_do_not_stall_the_server(server):
    chat = new_chat(server)

    def send(i: int) -> None:
        try:
            httpx.post(f"{server.url}/galatea/chats/{chat}/send", json={"text": f"Tell me a long story {i}."},
                       timeout=2.0)
        except httpx.HTTPError:
            pass  # the client gave up

    with ThreadPoolExecutor(44) as pool:
        list(pool.map(send, range(44)))
    t = time.time()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "Hi", "max_length": 2},
                      timeout=10).status_code == 200
    deadline = time.time() + 30
    while True:  # the chat itself is usable again once the running reply ends
        r = httpx.post(f"{server.url}/galatea/chats/{chat}/send", json={"text": "Hello again."}, timeout=30)
        if '"error"' not in r.text:
            break
        assert "busy" in r.text and time.time() < deadline, r.text
        time.sleep(0.5)
    assert '"done": true' in r.text and time.time() - t < 40
    # requests whose clients left before their turn wrote nothing (no orphan user messages)
    users = [m for m in httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"] if m["is_user"]]
    assert len(users) <= 6, len(users)


def test_sixteen_writers_through_one_server_all_succeed(server):
    chat = new_chat(server)
    r = httpx.post(f"{server.url}/galatea/chats/{chat}/send", json={"text": "Hi"}, timeout=60)
    assert r.status_code == 200
    message = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"][0]["id"]
    codes: list[int] = []

    def writer(w: int) -> None:
        with httpx.Client(timeout=30) as c:
            for i in range(40):
                codes.append(c.put(f"{server.url}/galatea/messages/{message}", json={"text": f"{w}-{i}"}).status_code)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 640
    text = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"][0]["text"]
    assert text.endswith("-39")  # one writer's last edit is the stored text


ROUTES = [("/api/v1/generate", "prompt"), ("/api/extra/generate/stream", "prompt"), ("/v1/completions", "prompt")]


@pytest.mark.parametrize("path,body", [
    *[(p, {k: "Hi \ud800 there"}) for p, k in ROUTES],
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi \ud800"}]}),
    ("/api/extra/tokencount", {"prompt": "\ud800"}),
    ("/api/v1/generate", {"prompt": "Hi", "stop_sequence": 5}),
    ("/v1/completions", {"prompt": "Hi", "stop": 5}),
    ("/api/v1/generate", {"prompt": "Hi", "temperature": 1e30}),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 1e30}),
    ("/api/v1/generate", {"prompt": "Hi", "sampler_seed": 2**64}),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**70}),
    ("/api/v1/generate", {"prompt": "Hi", "sampler_order": [6] * 100_000}),
    ("/api/v1/generate", {"prompt": "Hi", "stop_sequence": ["x"] * 1000}),
])
def test_bad_values_are_4xx_with_a_message(server, path, body):
    raw = json.dumps(body)  # ASCII, lone surrogates escaped as "\\ud800", as a JavaScript client sends them
    r = httpx.post(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "Traceback" not in r.text and ("msg" in r.text or "message" in r.text)


@pytest.mark.parametrize("raw", ['{"prompt": "Hi", "temperature": NaN}', '{"prompt": "Hi", "top_a": Infinity}',
                                 '{"prompt": "Hi", "logit_bias": {"5": -Infinity}}'])
def test_non_finite_numbers_are_refused(server, raw):
    r = httpx.post(f"{server.url}/api/v1/generate", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert 400 <= r.status_code < 500, r.text


def test_settings_that_remove_every_token_still_answer(server):
    r = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "Hi", "max_length": 3, "top_a": 1e30,
                                                          "rep_pen": 1e30, "temperature": 1e-30}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/galatea/chats/9223372036854775808", "/galatea/chats/9223372036854775808/prompt",
                                  "/galatea/characters/99999999999999999999/chats"])
def test_ids_beyond_sqlites_range_are_refused(server, path):
    r = httpx.get(f"{server.url}{path}", timeout=10)
    assert 400 <= r.status_code < 500, r.text


def test_a_stored_nan_setting_is_reported_and_ignored(tmp_path, embedded_lm):
    store = Store(tmp_path / "g.db")
    chat = store.new_chat(store.add_character(load_character(None)))
    store.set_settings(chat, {"temperature": float("nan"), "max_new_tokens": 4})
    session = ChatSession(store, embedded_lm, chat)
    assert session.ignored == ["temperature"] and session.settings["temperature"] == 0.7
    assert "".join(session.send("Hi")) is not None and not math.isnan(session.settings["temperature"])


def test_an_empty_data_dir_is_an_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "galatea", "chats", "list", "--data-dir", ""],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--data-dir is empty" in run.stderr and "Traceback" not in run.stderr


def test_only_loopback_host_names_are_answered(server):
    port = server.port
    for host, ok in ((f"127.0.0.1:{port}", True), (f"localhost:{port}", True), ("attacker.example", False),
                     (f"attacker.example:{port}", False)):
        r = httpx.get(f"{server.url}/api/v1/model", headers={"Host": host}, timeout=10)
        assert (r.status_code == 200) == ok, (host, r.status_code)


def test_the_pages_api_is_same_origin_only_and_the_apis_stay_open(server):
    evil = {"Origin": "http://evil.example"}
    r = httpx.get(f"{server.url}/galatea/characters", headers=evil, timeout=10)
    assert "access-control-allow-origin" not in r.headers  # the browser withholds the answer
    character = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
    before = len(httpx.get(f"{server.url}/galatea/characters/{character}/chats", timeout=10).json())
    r = httpx.post(f"{server.url}/galatea/characters/{character}/chats", content="x",
                   headers={**evil, "content-type": "text/plain"}, timeout=10)  # a form-like post: no preflight
    assert r.status_code == 403
    r = httpx.post(f"{server.url}/galatea/characters/{character}/chats", headers={"Sec-Fetch-Site": "cross-site"},
                   timeout=10)
    assert r.status_code == 403
    assert len(httpx.get(f"{server.url}/galatea/characters/{character}/chats", timeout=10).json()) == before
    same = {"Origin": server.url}
    assert httpx.post(f"{server.url}/galatea/characters/{character}/chats", headers=same,
                      timeout=10).status_code == 200
    r = httpx.get(f"{server.url}/api/v1/model", headers={"Origin": "https://lite.koboldai.net"}, timeout=10)
    assert r.headers.get("access-control-allow-origin") == "*"  # KoboldAI Lite calls from its own site


def test_the_body_limit_holds_for_chunked_uploads(server):
    def chunks():
        block = b" " * (1 << 20)
        yield b'{"prompt": "'
        for _ in range(40):  # 40 MB, no Content-Length
            yield block
        yield b'"}'

    r = httpx.post(f"{server.url}/api/v1/generate", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "32 MB" in r.text


def test_a_keyed_server_serves_its_page_and_takes_the_key_as_a_cookie(tmp_path):
    s = Server(tmp_path, "--api-key", "s3cret")
    try:
        assert httpx.get(f"{s.url}/", timeout=5).status_code == 200  # the page's shell, which asks for the key
        assert httpx.get(f"{s.url}/galatea/characters", timeout=5).status_code == 401
        r = httpx.get(f"{s.url}/galatea/characters", cookies={"galatea_key": "s3cret"}, timeout=5)
        assert r.status_code == 200
        assert httpx.post(f"{s.url}/api/v1/generate", json={"prompt": "Hi"}, cookies={"galatea_key": "s3cret"},
                          timeout=5).status_code == 401  # the cookie is the page's, not the API's
    finally:
        s.stop()


def test_chat_settings_from_the_page_are_validated_and_kept(server):
    chat = new_chat(server)
    url = f"{server.url}/galatea/chats/{chat}/settings"
    r = httpx.put(url, json={"max_new_tokens": 5, "mirostat": 2, "dry_multiplier": 0.8}, timeout=10)
    assert r.status_code == 200 and r.json()["mirostat"] == 2
    got = httpx.get(url, timeout=10).json()
    assert got["max_new_tokens"] == 5 and got["dry_multiplier"] == 0.8 and got["temperature"] == 0.7
    for bad in ({"temperature": 50}, {"mirostat": 7}, {"top_p": "nan"}, {"max_new_tokens": 0}):
        r = httpx.put(url, json=bad, timeout=10)
        assert 400 <= r.status_code < 500, (bad, r.text)
    assert httpx.get(url, timeout=10).json() == got  # nothing of a refused change was kept
