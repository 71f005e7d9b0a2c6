"""Several models behind one `galatea serve` (issue 28, point 2): every route lists them, a
request names its model (OpenAI's and Ollama's `model`, a page chat's setting), models load on
first use within `--memory-budget`, the least recently used idle one is unloaded to make room
(never one that is replying), its memory goes back, and other models' streams keep flowing while
one loads. Two of the three models are 7B-shaped (one layer, random Q4_0 weights, 0.27 GB each)
so that memory is measurable against the process's own noise."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest

from bench.make_random_gguf import SHAPES, write
from galatea.model.checkpoint import embedded_model_path
from tests.helpers import running_server

pytestmark = [pytest.mark.server, pytest.mark.slow]
SMOL = embedded_model_path().stem
MIB = 2**20


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("bard", "sage"):
        out[name] = folder / f"{name}.gguf"
        write(out[name], SHAPES["llama-7b"], "Q4_0", 1)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    # SmolLM2 (~0.15 GB held) and one 7B-shaped model fit in 0.6 GiB; a third does not
    yield from running_server(tmp_path_factory, "--model", str(embedded_model_path()), "--model", str(files["bard"]),
                              "--model", str(files["sage"]), "--memory-budget", "0.6", "--max-context", "1024",
                              "--cache-slots", "1")


def rss(server) -> int:
    """The server process's resident memory, bytes."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def loaded(server) -> dict[str, int]:
    return {m["model"].removesuffix(":latest"): m["size"]
            for m in httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]}


def test_every_route_lists_the_models_and_requests_choose_one(server):
    names = [SMOL, "bard", "sage"]
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]] == names
    assert [m["model"] for m in ollama.Client(host=server.url).list().models] == [f"{n}:latest" for n in names]
    assert list(loaded(server)) == [SMOL]  # the default is read at start; the others on first use
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 404 and "model 'nope' is not served here" in r.json()["error"]["message"] \
        and "bard" in r.json()["error"]["message"]
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).generate("nope", "Hi")
    assert e.value.status_code == 404 and "sage" in e.value.error


def test_load_on_first_use_then_switching_costs_nothing(server):
    client = ollama.Client(host=server.url)
    first = client.generate("bard", "Hello", options={"num_predict": 4})
    assert first.load_duration > 0.05e9 and first.eval_count == 4
    assert set(loaded(server)) == {SMOL, "bard"}
    again = client.generate("bard:latest", "Hello", options={"num_predict": 4})
    assert again.load_duration == 0  # loaded: no load at all
    smol = httpx.post(f"{server.url}/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 4},
                      timeout=60).json()
    assert smol["model"] == SMOL and smol["usage"]["completion_tokens"] == 4
    assert client.generate("bard", "Hello", options={"num_predict": 4}).load_duration == 0


def test_a_third_model_unloads_the_idle_one_never_the_one_replying(server):
    client = ollama.Client(host=server.url)
    client.generate("bard", "Hello", options={"num_predict": 2})  # bard is loaded (and SmolLM2)
    stamps: list[float] = []
    result: dict = {}

    def long_reply() -> None:  # bard replies all through sage's loading
        body = {"model": "bard", "prompt": "Tell me everything.", "options": {"num_predict": 300, "temperature": 1}}
        with httpx.stream("POST", f"{server.url}/api/generate", timeout=300, json=body) as r:
            for line in r.iter_lines():
                stamps.append(time.monotonic())
                result.update(json.loads(line))

    t = threading.Thread(target=long_reply)
    t.start()
    while len(stamps) < 5:
        time.sleep(0.02)
    asked = time.monotonic()
    sage = client.generate("sage", "Hello", options={"num_predict": 2})
    answered = time.monotonic()
    assert sage.load_duration > 0.05e9
    t.join(timeout=300)
    assert result["done"] and result["eval_count"] == 300  # never cut
    assert any(asked < s < asked + sage.load_duration / 1e9 for s in stamps), "bard's stream stalled while sage loaded"
    held = loaded(server)
    assert set(held) == {"bard", "sage"}  # SmolLM2 was idle and least recently used: it went
    assert sum(held.values()) <= 0.6 * 2**30
    assert answered - asked < 120


def test_an_unloaded_model_gives_its_memory_back(server):
    client = ollama.Client(host=server.url)
    client.generate("sage", "Hello", options={"num_predict": 2})
    before, size = rss(server), loaded(server)["sage"]
    gone = client.generate("sage", "", keep_alive=0)  # Ollama's way to unload now
    assert gone.done_reason == "unload" and "sage" not in loaded(server)
    assert before - rss(server) > 0.8 * size, f"RSS fell {(before - rss(server)) / MIB:.0f} MiB of {size / MIB:.0f}"


def test_a_page_chat_chooses_its_model(server):
    chars = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()
    chat = httpx.post(f"{server.url}/galatea/characters/{chars[0]['id']}/chats", timeout=10).json()["id"]
    bad = httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"model": "nope"}, timeout=10)
    assert bad.status_code == 400 and "not a model this server serves" in bad.text
    ok = httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"model": "sage", "max_new_tokens": 6},
                   timeout=10).json()
    assert ok["model"] == "sage"
    models = httpx.get(f"{server.url}/galatea/models", timeout=10).json()
    assert models["default"] == SMOL and [m["name"] for m in models["models"]] == [SMOL, "bard", "sage"]
    with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/send", json={"text": "Hello!"}, timeout=300) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["done"] and "error" not in events[-1], events[-1]
    assert "sage" in loaded(server)  # the chat's model answered (loaded for it)
    assert httpx.get(f"{server.url}/galatea/chats/{chat}/settings", timeout=10).json()["model"] == "sage"
    reset = httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"model": ""}, timeout=10).json()
    assert reset["model"] == ""  # the server's default again
