"""Issue 29: the defects real clients and a reliability probe found, each against a real
`galatea serve` (and a real PostgreSQL), each shown failing before its fix.

1. `n` > 1 gave empty choices (a job set its caller's shared hang-up signal when it ended).
2. `/api/extra/generate/check` showed any site the page's replies (here) and the OpenAI
   routes' (the browser test is in test_web_safety.py).
3. A database connection leaked with every worker thread that ended.
4. A PostgreSQL outage gave wrong answers (404, 400, 500) and did not heal.
5. Cache slots were thrown away when a prompt shrank or a reply outgrew its prompt.
6. A greedy reply depended on what the prompt cache held.
7. Hostile input: lorebook `extensions` of the wrong type, huge cards and prompts that froze the
   event loop.
8. `protected` on a keyed server, open connect routes, and `bytes` in logprobs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from galatea.engine.prompt_cache import PromptCachePool
from galatea.engine.sampling import SamplingParams
from galatea.engine.scheduler import Scheduler
from tests.checkpoints import ROOT
from tests.helpers import Postgres, Server, post, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory, "--cache-slots", "2")


def new_chat(server) -> int:
    aria = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
    return httpx.post(f"{server.url}/galatea/characters/{aria}/chats", timeout=10).json()["id"]


# ---- 1. n > 1 ------------------------------------------------------------------------------------

@pytest.mark.server
def test_every_one_of_n_choices_is_generated(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    whole = {"ban_eos_token": True}  # every choice runs to max_tokens, so usage is exact
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2,
                                       extra_body=whole)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in r.choices), r.choices
    assert r.usage.completion_tokens == 16
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            n=2, stream=True, extra_body=whole)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert all(texts.values()), texts
    r = client.completions.create(model="x", prompt="Once upon a time", max_tokens=6, n=3, seed=7, extra_body=whole)
    assert len(r.choices) == 3 and all(c.text for c in r.choices) and r.usage.completion_tokens == 18
    # a seeded request gives different choices, and the same ones again
    again = client.completions.create(model="x", prompt="Once upon a time", max_tokens=6, n=3, seed=7,
                                      extra_body=whole)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_a_job_that_ends_does_not_cancel_the_next_one_on_the_same_signal(embedded_lm):
    engine = Scheduler(embedded_lm, max_context=512)
    try:
        gone = threading.Event()  # one client's hang-up signal, shared by its n jobs
        params = SamplingParams(max_new_tokens=4, temperature=0, ban_eos=True)
        for _ in range(2):
            chunks = list(engine.generate_sync(embedded_lm.tokenizer.encode("Hello"), params, gone))
            assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == 4
        assert not gone.is_set()
    finally:
        engine.close()


# ---- 2. the Kobold check route sees only Kobold jobs --------------------------------------------

@pytest.mark.server
def test_generate_check_never_shows_the_pages_or_the_openai_replies(server):
    chat = new_chat(server)
    httpx.put(f"{server.url}/galatea/chats/{chat}/settings",
              json={"max_new_tokens": 400, "temperature": 1.5, "min_p": 0}, timeout=10)
    evil = {"Origin": "https://evil.example"}
    seen: list[str] = []
    with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/send", json={"text": "Tell me a long tale."},
                      timeout=120) as r:
        for line in r.iter_lines():
            event = json.loads(line[6:]) if line.startswith("data: ") else {}
            if event.get("text") and not seen:  # the page's reply is streaming: ask as another site
                check = httpx.get(f"{server.url}/api/extra/generate/check", headers=evil, timeout=10)
                assert check.headers["access-control-allow-origin"] == "*"
                seen.append(check.json()["results"][0]["text"])
                httpx.post(f"{server.url}/galatea/abort", json={"chat_id": chat}, timeout=10)
    assert seen == [""]
    # an OpenAI stream is not the Kobold routes' either; a Kobold job without its genkey is (KoboldCpp)
    for route, body in (("/v1/completions", {"prompt": "Once", "max_tokens": 300, "stream": True,
                                             "ban_eos_token": True}),
                        ("/api/extra/generate/stream", {"prompt": "Once", "max_length": 300, "genkey": "KCPP7",
                                                        "ban_eos_token": True})):
        with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    text = httpx.get(f"{server.url}/api/extra/generate/check", headers=evil, timeout=10).json()
                    seen.append(text["results"][0]["text"])
                    break
        post(server, "/api/extra/abort", {})
    assert seen[1] == "" and seen[2] != "", seen


# ---- 3. no connection leaks -------------------------------------------------------------------------

def _bursts(server, chat: int, n: int = 3) -> list[int]:
    """n bursts of 40 parallel reads, 11 s apart (the server's idle worker threads end after 10 s,
    and new ones serve the next burst); what `count` says after each."""
    after = []
    for i in range(n):
        with ThreadPoolExecutor(40) as pool:
            codes = list(pool.map(lambda _: httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=60).status_code,
                                  range(40)))
        assert codes == [200] * 40, codes
        after.append(server.count())
        if i < n - 1:
            time.sleep(11)
    return after


@pytest.mark.server
@pytest.mark.slow
def test_worker_threads_that_end_leave_no_connection_open(tmp_path):
    s = Server(tmp_path)
    fd = f"/proc/{s.proc.pid}/fd"

    def open_db_files() -> int:  # each SQLite connection holds the database file open once
        targets = []
        for n in os.listdir(fd):
            try:
                targets.append(os.readlink(f"{fd}/{n}"))
            except FileNotFoundError:  # closed meanwhile
                pass
        return sum(t.endswith("galatea.db") for t in targets)

    s.count = open_db_files
    try:
        open_db = _bursts(s, new_chat(s))
        assert max(open_db) <= 16, f"connections after each burst: {open_db}"
    finally:
        log = s.stop()
    assert "Traceback" not in log, log


@pytest.mark.server
@pytest.mark.slow
def test_postgresql_connections_are_pooled_and_bounded(tmp_path, postgres):
    url = postgres.database()
    s = Server(tmp_path, "--store", url)
    name = url.rsplit("/", 1)[1]
    s.count = lambda: postgres.connections(name)
    try:
        counts = _bursts(s, new_chat(s))
        assert max(counts) <= 16, f"connections after each burst: {counts}"  # the pool's bound
    finally:
        log = s.stop()
    assert "Traceback" not in log, log


# ---- 4. a PostgreSQL outage ---------------------------------------------------------------------------

@pytest.mark.server
@pytest.mark.slow
def test_a_postgresql_outage_is_a_503_and_heals(tmp_path):
    pg = Postgres()  # its own cluster: this test stops it
    s = None
    try:
        s = Server(tmp_path, "--store", pg.database())
        chat = new_chat(s)
        httpx.put(f"{s.url}/galatea/chats/{chat}/settings", json={"max_new_tokens": 48}, timeout=10)
        events: list[dict] = []

        def talk() -> None:
            with httpx.stream("POST", f"{s.url}/galatea/chats/{chat}/send", json={"text": "Hello there!"},
                              timeout=180) as r:
                events.extend(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))

        t = threading.Thread(target=talk)
        t.start()
        deadline = time.time() + 60
        while not any(e.get("text") for e in events) and time.time() < deadline:
            time.sleep(0.05)
        pg.crash()  # mid-reply: the user's message is stored, the reply not yet
        started = time.time()
        health = httpx.get(f"{s.url}/health", timeout=10)
        assert health.status_code == 503 and "unreachable" in health.json()["store"], health.text
        assert time.time() - started < 2
        for path in ("/galatea/characters", f"/galatea/chats/{chat}", "/galatea/settings"):
            r = httpx.get(f"{s.url}{path}", timeout=20)
            assert r.status_code == 503 and "the chat store is unreachable" in r.json()["error"]["message"], \
                (path, r.status_code, r.text)
        time.sleep(3)  # the reply ends while the store is down: it waits, told so
        assert any("unreachable" in e.get("notice", "") for e in events), [e for e in events if "text" not in e]
        pg.start()
        t.join(timeout=120)
        assert events[-1].get("done") and "error" not in events[-1], events[-1]
        with ThreadPoolExecutor(20) as pool:  # no dead connection is handed out again
            codes = list(pool.map(lambda _: httpx.get(f"{s.url}/galatea/chats/{chat}", timeout=30).status_code,
                                  range(80)))
        assert codes == [200] * 80, codes
        messages = httpx.get(f"{s.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
        reply = "".join(e.get("text", "") for e in events).strip()
        assert [m["text"] for m in messages[1:]] == ["Hello there!", reply] and reply  # nothing lost
        assert httpx.get(f"{s.url}/health", timeout=10).json()["store"] == "ok"
    finally:
        log = s.stop() if s is not None else ""
        pg.stop()
    assert "Traceback" not in log, log


# ---- 5. cache slots kept by the tokens they save ----------------------------------------------------

def test_a_slot_is_kept_when_the_prompt_shrinks_or_repeats_after_a_long_reply():
    pool = PromptCachePool(slots=3)
    persona, examples, history = list(range(1000, 1200)), list(range(2000, 2800)), list(range(3000, 3300))
    first = persona + examples + history
    slot = pool.acquire(first)
    slot.holds(first + list(range(5000, 5100)))  # prompt and reply
    other = pool.acquire(list(range(9000, 9400)))  # another client takes the second slot
    other.holds(list(range(9000, 9500)))
    # SillyTavern drops its example block: persona + history, 500 of 500 reusable (moved)
    shrunk = persona + history + [7]
    assert pool.acquire(shrunk) is slot and slot.plan(shrunk).reused == 500
    # the same short prompt again after a reply four times its length, every time
    short = list(range(100, 150))
    slot.holds(short + list(range(6000, 6200)))
    for _ in range(4):
        assert pool.acquire(short) is slot
    # a shared start alone does not take another client's slot: the unused third one serves it
    assert pool.acquire(list(range(9000, 9002)) + list(range(1, 400))) not in (slot, other)


@pytest.mark.server
def test_a_repeated_request_after_a_long_reply_reads_only_its_last_token(server):
    body = {"prompt": "You: Tell me about the sea.\nAria:", "max_length": 120, "ban_eos_token": True,
            "temperature": 0.7}
    for _ in range(4):
        post(server, "/api/v1/generate", body)
        perf = httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()
        assert perf["last_cached_count"] >= perf["last_input_count"] - 1 or _ == 0, perf


# ---- 6. greedy replies do not depend on the cache -----------------------------------------------------

WORDS = ("the bard sings of dragons and rivers under moonlight while travellers rest by the fire telling "
         "stories of old kings who lost their crowns to clever foxes").split()


def test_a_greedy_reply_is_the_same_whatever_the_cache_held(embedded_lm):
    """The embedded model on the native kernels (fp16 KV cache), through the scheduler: a prompt
    read fresh, the same prompt found in the cache, and the next turn of a chat whose earlier
    turn (with its reply) is cached give the same tokens and the same log-probabilities."""
    rng = random.Random(5)
    tok = embedded_lm.tokenizer
    params = SamplingParams(max_new_tokens=12, temperature=0, logprobs=2)
    fresh_engine = Scheduler(embedded_lm, max_context=1024, cache_slots=1)
    cached_engine = Scheduler(embedded_lm, max_context=1024, cache_slots=1)

    def run(engine: Scheduler, ids: list[int]) -> tuple[list, list]:
        out = list(engine.generate_sync(ids, params))
        return [c.token for c in out if c.token is not None], [(e.token, e.logprob, e.top) for e in out[-1].logprobs]

    def fresh(ids: list[int]) -> tuple[list, list]:
        fresh_engine.prompt_cache.slots[0].clear()  # nothing cached
        return run(fresh_engine, ids)

    differ = []
    for i in range(16):
        text = "Aria's Persona: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 250))) + \
            "\nYou: Hello!\nAria:"
        ids = tok.encode(text)
        first = fresh(ids)
        again = run(cached_engine, ids)  # cold
        again = run(cached_engine, ids)  # the whole prompt cached
        reply = again[0]
        more = ids + reply + tok.encode("\nYou: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 80))) +
                                        "\nAria:", add_bos=False)
        turn2_cached = run(cached_engine, more)  # the first turn and its reply cached
        if again != first or turn2_cached != fresh(more):
            differ.append(i)
    fresh_engine.close()
    cached_engine.close()
    assert not differ, f"prompts {differ} of 16 gave another greedy reply with a cache"


# ---- 7. hostile input ------------------------------------------------------------------------------------

def _health_during(server, work) -> tuple[float, object]:
    """The slowest /health answer while `work()` runs in another thread, and work's result."""
    result: list = []
    t = threading.Thread(target=lambda: result.append(work()))
    t.start()
    worst = 0.0
    with httpx.Client() as client:
        while t.is_alive():
            started = time.perf_counter()
            assert client.get(f"{server.url}/health", timeout=30).status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.02)
    t.join()
    return worst, result[0]


@pytest.mark.server
def test_huge_prompts_and_cards_do_not_stall_the_server(server):
    huge = "word " * 2_000_000  # 10 MB
    worst, r = _health_during(server, lambda: httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": huge}], "max_tokens": 4},
        timeout=120))
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"], r.text
    assert worst < 0.25, f"/health took {worst:.3f} s during a 10 MB chat completion"
    worst, r = _health_during(server, lambda: post(server, "/api/v1/generate", {"prompt": huge, "max_length": 2}))
    assert r.status_code == 200 and worst < 0.25, (r.text[:200], worst)  # trimmed from the left, as KoboldCpp
    flat_yaml = ("name: X\ndescription: y\nitems:\n" + "- a\n" * 3_000_000).encode()  # 12 MB, 3M items
    page = {"Origin": server.url}
    worst, r = _health_during(server, lambda: httpx.post(f"{server.url}/galatea/characters", content=flat_yaml,
                                                         headers=page, timeout=120))
    assert r.status_code == 400 and "too large" in r.json()["error"]["message"] and worst < 0.25, (r.text, worst)
    big_json = json.dumps({"name": "X", "description": "y" * (20 << 20)}).encode()
    r = httpx.post(f"{server.url}/galatea/characters", content=big_json, headers=page, timeout=120)
    assert r.status_code == 400 and "too large for a card" in r.json()["error"]["message"], r.text


BAD_EXTENSIONS = [
    {"entries": {"0": {"uid": 0, "key": ["sea"], "content": "The sea is wide.", "extensions": "oops"}}},
    {"entries": {"0": {"uid": 0, "key": ["sea"], "content": "The sea is wide.", "extensions": [1, 2]}}},
    {"name": "Book", "entries": [{"keys": ["sea"], "content": "The sea is wide.", "extensions": "oops"}]},
]


@pytest.mark.server
@pytest.mark.parametrize("book", BAD_EXTENSIONS)
def test_a_lorebook_entry_with_bad_extensions_is_one_clear_line(server, tmp_path, book):
    r = httpx.post(f"{server.url}/galatea/lorebooks", content=json.dumps(book).encode(),
                   headers={"Origin": server.url}, timeout=30)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "extensions' should be an object" in message and "card" not in message, r.text
    path = tmp_path / "book.json"
    path.write_text(json.dumps(book))
    cli = subprocess.run([sys.executable, "-m", "galatea", "lorebooks", "import", str(path), "--data-dir",
                          str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "should be an object" in cli.stderr, cli.stderr


# ---- 8. the API key as KoboldCpp keeps it; logprobs bytes ------------------------------------------------

@pytest.mark.server
def test_a_keyed_server_says_so_and_leaves_the_connect_routes_open(tmp_path):
    s = Server(tmp_path, "--api-key", "s3cret")
    try:
        get = lambda path, **kw: httpx.get(f"{s.url}{path}", timeout=10, **kw)  # noqa: E731
        assert get("/api/extra/version").json()["protected"] is True
        for path in ("/api/v1/model", "/api/latest/model", "/api/v1/info/version", "/api/v1/config/max_length",
                     "/api/v1/config/max_context_length", "/api/extra/true_max_context_length", "/v1/models"):
            assert get(path).status_code == 200, path
            assert get(path, headers={"Authorization": "Bearer wrong"}).status_code == 200, path
        body = {"prompt": "Hi", "max_length": 2}
        assert httpx.post(f"{s.url}/api/v1/generate", json=body, timeout=60).status_code == 401
        assert httpx.post(f"{s.url}/api/extra/generate/check", json={}, timeout=60).status_code == 401
        ok = httpx.post(f"{s.url}/api/v1/generate", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
    finally:
        log = s.stop()
    assert "Traceback" not in log, log
    free = Server(tmp_path / "free")
    try:
        assert httpx.get(f"{free.url}/api/extra/version", timeout=10).json()["protected"] is False
    finally:
        free.stop()


@pytest.mark.server
def test_logprobs_carry_each_tokens_bytes(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Write 日本 and 🦙 twice."}],
                                       max_tokens=24, logprobs=True, top_logprobs=2, temperature=0)
    content = r.choices[0].logprobs.content
    assert content and all(isinstance(c.bytes, list) for c in content)
    assert all(isinstance(t.bytes, list) for c in content for t in c.top_logprobs)
    for c in content:  # an ASCII token's bytes spell its text
        if c.token and c.token.isascii():
            assert bytes(c.bytes).decode("ascii") == c.token
    # the bytes, joined, give back what was written, characters split across tokens included
    raw = b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace")
    assert r.choices[0].message.content.strip() in raw
