"""A real `galatea serve` process on 127.0.0.1 with the embedded model, called the way
SillyTavern, KoboldAI Lite and the official `openai` client call it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from galatea.cli import main
from tests.checkpoints import ROOT
from tests.helpers import Server, post, running_server

pytestmark = pytest.mark.server

# KoboldAI Lite's SSE rule (klite.embd): anything else and Lite drops the event.
LITE_SSE = re.compile(r"^event: (.*)\ndata: (.*)\n\n", re.M)

# The body SillyTavern's "KoboldAI Classic" sends (kai-settings.js), key for key.
ST_KOBOLD = {
    "prompt": "Aria's Persona: A cheerful bard.\n<START>\nYou: Hello!\nAria:", "use_story": False,
    "use_memory": False, "use_authors_note": False, "use_world_info": False, "max_context_length": 2048,
    "max_length": 24, "rep_pen": 1.1, "rep_pen_range": 1024, "rep_pen_slope": 0.9, "temperature": 0.7,
    "tfs": 1, "top_a": 0, "top_k": 0, "top_p": 0.9, "min_p": 0.05, "typical": 1,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False, "use_default_badwordsids": False,
    "mirostat": 0, "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "", "sampler_seed": 42,
    "stop_sequence": ["\nYou:", "\nAria:"],
}
# What KoboldAI Lite adds when it sees KoboldCpp >= 1.49.
LITE_EXTRA = {"genkey": "KCPP1234", "memory": "", "trim_stop": True, "bypass_eos": False, "n": 1,
              "quiet": True, "images": [], "dry_multiplier": 0, "xtc_probability": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One prompt cache slot, so fresh_cache() below really empties it (test_batching.py runs the
    # default slots and batches).
    yield from running_server(tmp_path_factory, "--cache-slots", "1")


def fresh_cache(server) -> None:
    """Fill the server's prompt cache with an unrelated prompt, so the next request reads its
    whole prompt: two requests compared token for token must be computed the same way (reusing
    a cached prefix changes bf16/int4 rounding, as in llama.cpp)."""
    post(server, "/api/v1/generate", {"prompt": "Unrelated words to reset the cache.", "max_length": 1})


def test_status_calls_of_sillytavern_and_lite(server):
    get = lambda p: httpx.get(f"{server.url}{p}", timeout=10).json()  # noqa: E731
    assert get("/api/v1/info/version")["result"] == "1.2.5"
    assert get("/api/latest/info/version")["result"] == "1.2.5"
    extra = get("/api/extra/version")
    assert extra["result"] == "KoboldCpp"
    assert tuple(int(x) for x in extra["version"].split(".")) >= (1, 49)  # Lite's gate for SSE and genkeys
    model = get("/api/v1/model")["result"]
    assert model and model != "ReadOnly"
    assert get("/api/v1/config/max_context_length")["value"] == get("/api/extra/true_max_context_length")["value"]
    assert get("/api/v1/config/max_length")["value"] > 0
    assert {"last_process", "last_eval", "total_gens", "queue", "idle"} <= set(get("/api/extra/perf"))
    models = get("/v1/models")
    assert models["object"] == "list" and models["data"][0]["id"]


def test_kobold_generate_with_sillytavern_payload(server):
    fresh_cache(server)
    r = post(server, "/api/v1/generate", ST_KOBOLD)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert isinstance(result["text"], str) and result["text"]
    assert result["finish_reason"] in ("stop", "length")
    fresh_cache(server)
    again = post(server, "/api/latest/generate", ST_KOBOLD).json()["results"][0]
    assert again["text"] == result["text"]  # sampler_seed makes it reproducible


def test_kobold_stream_parsed_like_lite(server):
    body = {**ST_KOBOLD, **LITE_EXTRA, "temperature": 0, "max_length": 16}
    fresh_cache(server)
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = LITE_SSE.findall(raw)
    assert events and LITE_SSE.sub("", raw) == ""  # nothing outside well-formed events
    assert all(kind == "message" for kind, _ in events)
    data = [json.loads(d) for _, d in events]
    assert all(d["finish_reason"] == "null" for d in data[:-1]) and data[-1]["finish_reason"] in ("stop", "length")
    streamed = "".join(d["token"] for d in data)
    fresh_cache(server)
    whole = post(server, "/api/v1/generate", body).json()["results"][0]["text"]
    assert streamed == whole


def test_agnai_and_tavernai_calls(server):
    """Agnai's Kobold adapter (srv/adapter/kobold.ts): streams only when /api/extra/version says
    KoboldCpp >= 1.30, sends `END_OF_DIALOG` among its stops and a padded sampler order, reads
    SSE `token`s. TavernAI classic: `/api/v1/model` must not be "ReadOnly", then the classic
    keys (no min_p, no stop_sequence) to `/api/v1/generate`, reading results[0].text."""
    version = httpx.get(f"{server.url}/api/extra/version", timeout=10).json()
    assert version["result"] == "KoboldCpp" and tuple(int(x) for x in version["version"].split(".")) >= (1, 30)
    agnai = {"prompt": "Aria's Persona: A cheerful bard.\n<START>\nYou: Hello!\nAria:", "max_length": 16,
             "max_context_length": 2048, "temperature": 0, "rep_pen": 1.08, "rep_pen_range": 1024,
             "rep_pen_slope": 0.9, "top_p": 1, "top_k": 0, "typical": 1, "tfs": 1, "top_a": 0,
             "sampler_order": [6, 0, 1, 3, 4, 2, 5], "stop_sequence": ["END_OF_DIALOG", "\nYou:"],
             "use_default_badwordsids": False}
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=agnai, timeout=120) as r:
        tokens = [json.loads(d)["token"] for _, d in LITE_SSE.findall("".join(r.iter_text()))]
    assert r.status_code == 200 and "".join(tokens).strip() and "END_OF_DIALOG" not in "".join(tokens)
    assert httpx.get(f"{server.url}/api/v1/model", timeout=10).json()["result"] != "ReadOnly"
    tavern = {"prompt": agnai["prompt"], "use_story": False, "use_memory": False, "use_authors_note": False,
              "use_world_info": False, "max_context_length": 2048, "max_length": 16, "rep_pen": 1.1,
              "rep_pen_slope": 0.9, "rep_pen_range": 1024, "temperature": 0.65, "tfs": 0.9, "top_a": 0,
              "top_k": 0, "top_p": 0.9, "typical": 1, "sampler_order": [6, 0, 1, 2, 3, 4, 5], "singleline": False}
    text = post(server, "/api/v1/generate", tavern).json()["results"][0]["text"]
    assert isinstance(text, str) and text.strip()


def test_trim_stop_and_stop_kept_by_default(server):
    base = {"prompt": "Count: one, two, three,", "max_length": 40, "temperature": 0, "stop_sequence": [","]}
    fresh_cache(server)
    kept = post(server, "/api/v1/generate", base).json()["results"][0]["text"]
    fresh_cache(server)
    trimmed = post(server, "/api/v1/generate", {**base, "trim_stop": True}).json()["results"][0]["text"]
    assert kept.endswith(",") and kept[:-1] == trimmed and "," not in trimmed


def test_abort_mid_stream(server):
    body = {"prompt": "Once upon a time", "max_length": 400, "ban_eos_token": True, "genkey": "KCPP0001"}
    tokens = 0
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                tokens += 1
                if tokens == 3:
                    partial = post(server, "/api/extra/generate/check", {"genkey": "KCPP0001"}).json()
                    assert partial["results"][0]["text"]
                    assert post(server, "/api/extra/abort", {"genkey": "KCPP0001"}).json() == \
                        {"success": "true", "done": "true"}
    assert tokens < 100
    assert httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()["stop_reason"] == 2


def test_client_disconnect_frees_the_engine(server):
    body = {"prompt": "Once upon a time", "max_length": 2000, "ban_eos_token": True}
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    deadline = time.time() + 20
    while httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()["idle"] != 1:
        assert time.time() < deadline, "the generation went on after the client left"
        time.sleep(0.2)
    t = time.time()
    post(server, "/api/v1/generate", {"prompt": "Hi", "max_length": 2})
    assert time.time() - t < 10


def test_tokencount_equals_galatea_tokenize(server, capsys):
    text = "Aria's Persona: A bard.\n<START>\nYou:  Hi  there 🦙"
    got = post(server, "/api/extra/tokencount", {"prompt": text}).json()
    assert main(["tokenize", text]) == 0
    expected = json.loads(capsys.readouterr().out)["ids"]
    assert got == {"value": len(expected), "ids": expected}
    assert post(server, "/v1/internal/encode", {"text": text}).json()["tokens"] == expected
    assert post(server, "/v1/internal/token-count", {"text": text}).json()["length"] == len(expected)
    assert post(server, "/tokenize", {"content": text}).json()["tokens"] == expected
    assert post(server, "/v1/tokenize", {"model": "x", "prompt": text}).json()["count"] == len(expected)


def test_openai_client_completions(server, capsys):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    prompt = "You: What is your name?\nAria:"
    fresh_cache(server)
    r = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, stop=["\nYou:"])
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert main(["tokenize", prompt]) == 0
    n_prompt = len(json.loads(capsys.readouterr().out)["ids"])
    assert r.usage.prompt_tokens == n_prompt and 0 < r.usage.completion_tokens <= 12
    fresh_cache(server)
    stream = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, stop=["\nYou:"],
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    extra = client.completions.create(model="x", prompt=prompt, max_tokens=6, n=2, seed=3,
                                      extra_body={"top_k": 40, "min_p": 0.05, "typical_p": 0.9, "tfs": 0.95,
                                                  "top_a": 0.1, "repetition_penalty": 1.1,
                                                  "repetition_penalty_range": 64, "stopping_strings": ["\n"],
                                                  "ban_eos_token": False})
    assert [c.index for c in extra.choices] == [0, 1]


def chatml_ids(messages: list[dict]) -> list[int]:
    """transformers' rendering of `messages` with the embedded model's template, tokenized."""
    from transformers import PreTrainedTokenizerFast

    from galatea.model.checkpoint import embedded_model_path, load_tokenizer
    from galatea.model.gguf_file import GGUFFile
    from galatea.model.tokenizer import bpe_from_gguf

    tok = load_tokenizer(embedded_model_path())
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe_from_gguf(GGUFFile(embedded_model_path()).metadata))
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.encode(hf.apply_chat_template(plain, chat_template=tok.chat_template, tokenize=False,
                                             add_generation_prompt=True))


def test_openai_client_chat(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
    messages = [{"role": "system", "content": "Aria is a cheerful bard."},
                {"role": "assistant", "name": "Aria", "content": "Hello, traveller!"},
                {"role": "user", "content": "Hi! Sing me a song."}]
    fresh_cache(server)
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text and text == text.strip()
    assert not text.startswith("Aria:")
    # the prompt is the model's own chat template (SmolLM2's ChatML), as transformers renders it
    assert r.usage.prompt_tokens == len(chatml_ids(messages))
    fresh_cache(server)
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    assert streamed.strip().removeprefix("Aria:").strip() == text


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/v1/generate", "{not json", 422, "not valid JSON"),
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/api/v1/generate", {"prompt": 5}, 422, "prompt"),
    ("/api/v1/generate", {"prompt": "hi", "max_length": -5}, 422, "max_length"),
    ("/api/v1/generate", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/api/v1/generate", {"prompt": "hi", "mirostat": 3}, 400, "mirostat"),
    ("/api/v1/generate", {"prompt": "hi", "grammar": "root ::= \"a\""}, 400, "grammar"),
])
def test_bad_input_is_answered_clearly(server, path, body, status, message):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    text = err["detail"]["msg"] if path.startswith("/api") else err["error"]["message"]
    assert message in text and "Traceback" not in r.text


def test_huge_and_long_requests(server):
    r = post(server, "/api/v1/generate", {"prompt": "hi", "max_length": 10**9, "max_context_length": 64,
                                          "ban_eos_token": True, "unknown": {"x": 1}})
    assert r.status_code == 200 and r.json()["results"][0]["finish_reason"] == "length"  # clamped, as KoboldCpp
    big = "word " * 2_000_000  # 10 MB
    r = post(server, "/api/v1/generate", {"prompt": big + "The end.", "max_length": 2, "max_context_length": 512})
    assert r.status_code == 200  # Kobold: trimmed from the left, keeping the end of the story
    r = post(server, "/v1/completions", {"prompt": big, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_64_concurrent_requests_are_queued(server):
    def one(i: int) -> int:
        return post(server, "/api/v1/generate", {"prompt": f"Number {i}:", "max_length": 3}).status_code

    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_openapi_schema_is_valid_and_complete(server):
    from openapi_spec_validator import validate

    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    validate(schema)
    for path in ["/api/v1/generate", "/api/latest/generate", "/api/extra/generate/stream", "/api/extra/abort",
                 "/api/extra/tokencount", "/api/extra/version", "/v1/completions", "/v1/chat/completions",
                 "/v1/models", "/v1/internal/encode", "/tokenize", "/v1/tokenize", "/health",
                 "/galatea/characters", "/galatea/chats/{chat_id}/send", "/galatea/messages/{message_id}/swipe"]:
        assert path in schema["paths"], path


def test_api_key(tmp_path):
    s = Server(tmp_path, "--api-key", "s3cret")
    try:
        assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200
        r = httpx.post(f"{s.url}/api/v1/generate", json={"prompt": "Hi", "max_length": 1}, timeout=5)
        assert r.status_code == 401 and "API key" in r.json()["detail"]["msg"]
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                       headers={"Authorization": "Bearer wrong"}, timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                        headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        pre = httpx.options(f"{s.url}/v1/models", headers={"Origin": "http://localhost:8000",
                                                          "Access-Control-Request-Method": "GET"}, timeout=5)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://localhost:8000")
    finally:
        s.stop()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "galatea", "serve", "--port", str(port), "--data-dir",
                               str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in proc.stderr and "pick another --port" in proc.stderr, proc.stderr


def test_a_growing_prompt_reuses_the_servers_cache(server):
    fresh_cache(server)
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman."
    post(server, "/api/v1/generate", {"prompt": story, "max_length": 4})
    first = httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()
    post(server, "/api/v1/generate", {"prompt": story + " Every morning he", "max_length": 4})
    second = httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()
    assert second["last_cached_count"] >= first["last_input_count"] - 1 > 0
