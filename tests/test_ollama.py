"""Ollama's API on `galatea serve` (issue 28, point 1), driven by the official `ollama` Python
client: its types parse every answer (list, show, ps, generate, chat, streaming or not), the
prompt a chat builds is the model's chat template as transformers renders it, and a greedy reply
is llama.cpp's own for that prompt (llama-cpp-python on the same GGUF). Request bodies written
from the documented traffic of Ollama-only clients (tests/data/ollama-clients/) are replayed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import ollama
import pytest

from galatea.model.checkpoint import embedded_model_path
from galatea.model.gguf_file import GGUFFile
from tests.helpers import running_server
from tests.test_formats import transformers_render

pytestmark = pytest.mark.server
CLIENTS = Path(__file__).parent / "data" / "ollama-clients"
NAME = "SmolLM2-135M-Instruct.Q4_1:latest"
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "top_k": 1, "num_predict": 24}
SYSTEM, QUESTION = "You are Aria, a cheerful bard.", "Hello! Who are you?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def llama_cpp():
    from llama_cpp import Llama

    return Llama(model_path=str(embedded_model_path()), n_ctx=1024, verbose=False)


def rendered(messages: list[dict]) -> str:
    """The embedded model's chat template over `messages`, as transformers renders it."""
    from galatea.model.checkpoint import load_tokenizer

    template = GGUFFile(embedded_model_path()).metadata["tokenizer.chat_template"]
    return transformers_render(template, load_tokenizer(embedded_model_path()), messages)


def reference(llm, prompt: str, n: int = 24) -> str:
    return llm.create_completion(prompt, max_tokens=n, temperature=0, top_k=1, repeat_penalty=1.0)["choices"][0]["text"]


def test_the_model_routes_parse_in_the_official_client(server, client):
    version = httpx.get(f"{server.url}/api/version", timeout=10).json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4)  # VS Code's Ollama provider's minimum
    listed = client.list().models
    assert [m.model for m in listed] == [NAME]
    d = listed[0].details
    assert (d.format, d.family, d.parameter_size, d.quantization_level) == ("gguf", "llama", "135M", "Q4_1")
    assert listed[0].size == embedded_model_path().stat().st_size and listed[0].modified_at is not None
    shown = client.show(NAME)
    meta = GGUFFile(embedded_model_path()).metadata
    assert shown.capabilities == ["completion"]
    assert shown.template == meta["tokenizer.chat_template"]  # the format chats use: the model's own
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["llama.block_count"] == meta["llama.block_count"]
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # the vocabulary only when verbose, as Ollama
    verbose = httpx.post(f"{server.url}/api/show", json={"model": NAME, "verbose": True}, timeout=30).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152
    running = client.ps().models
    assert [m.model for m in running] == [NAME] and running[0].context_length == 8192
    assert running[0].size_vram == 0 and running[0].expires_at.year > 2100  # kept loaded


def test_a_chat_is_the_models_template_and_its_greedy_reply_is_llama_cpps(client, llama_cpp):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    expected = reference(llama_cpp, rendered(messages))
    whole = client.chat(NAME, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content == expected.strip()
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 24
    assert whole.prompt_eval_count == len(llama_cpp.tokenize(rendered(messages).encode(), add_bos=False, special=True))
    assert whole.eval_duration > 0 and whole.total_duration >= whole.eval_duration
    parts = list(client.chat(NAME, messages=messages, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == 24
    assert "".join(p.message.content for p in parts) == expected.strip()


def test_generate_templated_raw_and_context(client, llama_cpp):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    prompt = rendered(messages)
    r = client.generate(NAME, QUESTION, system=SYSTEM, options=GREEDY)
    assert r.response == reference(llama_cpp, prompt).strip()
    # `context`: the prompt's tokens (llama.cpp tokenizes the template's text the same) and the reply's
    ids = llama_cpp.tokenize(prompt.encode(), add_bos=False, special=True)
    assert list(r.context[:len(ids)]) == ids and len(r.context) == len(ids) + r.eval_count
    # raw: the prompt as sent, no context returned
    sky = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    raw = client.generate(NAME, sky, raw=True, options=GREEDY)
    assert raw.response == reference(llama_cpp, sky)
    assert raw.context is None
    # Ollama's Go template in the request (only the part before .Response is the prompt)
    tmpl = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
            "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
    t = client.generate(NAME, QUESTION, system=SYSTEM, template=tmpl, options=GREEDY)
    assert t.response == reference(llama_cpp, prompt)
    # the context sent back continues the conversation where it ended: the new turn, templated
    # alone, after it (as Ollama does). (A question whose greedy reply has no near-tie between
    # the two engines: on some, Q4_1's rounding puts them a word apart.)
    more = client.generate(NAME, "Tell me about your lute.", context=r.context, options={**GREEDY, "num_predict": 8})
    turn = llama_cpp.tokenize(rendered([{"role": "user", "content": "Tell me about your lute."}]).encode(),
                              add_bos=False, special=True)
    expected = llama_cpp.create_completion(list(r.context) + turn, max_tokens=8, temperature=0, top_k=1,
                                           repeat_penalty=1.0)["choices"][0]["text"]
    assert more.response == expected.strip()


def test_options_are_ollamas(client):
    base = {"temperature": 1.0, "num_predict": 16}
    a = client.generate(NAME, "Tell me a story.", options={**base, "seed": 7}).response
    assert a == client.generate(NAME, "Tell me a story.", options={**base, "seed": 7}).response
    assert a != client.generate(NAME, "Tell me a story.", options={**base, "seed": 8}).response
    full = client.generate(NAME, "Count from one to ten in words.", options=GREEDY).response
    cut = full.split()[2]
    stopped = client.generate(NAME, "Count from one to ten in words.", options={**GREEDY, "stop": [cut]})
    assert stopped.response == full[:full.index(cut)].strip() and stopped.done_reason == "stop"
    short = client.generate(NAME, "Tell me a story.", options={**GREEDY, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    with pytest.raises(ollama.ResponseError, match="shorten it or raise num_ctx") as e:
        client.chat(NAME, messages=[{"role": "user", "content": "word " * 400}], options={"num_ctx": 64})
    assert e.value.status_code == 400


@pytest.mark.parametrize("call,message,status", [
    (lambda c: c.generate(NAME, "hi", format="json"), "format (JSON mode", 400),
    (lambda c: c.chat(NAME, messages=[{"role": "user", "content": "hi"}],
                      format={"type": "object"}), "format (JSON mode", 400),
    (lambda c: c.chat(NAME, messages=[{"role": "tool", "content": "42"}]), "role 'tool'", 400),
    (lambda c: c.generate(NAME, "hi", images=[b"\x89PNG"]), "images are not supported", 400),
    (lambda c: c.generate(NAME, "x", template="{{ range .Messages }}{{ end }}"), "range .Messages", 400),
    (lambda c: c.embed(NAME, input="hi"), "embeddings are not supported", 501),
    (lambda c: c.pull("llama3.2"), "does not pull", 501),
])
def test_what_galatea_cannot_do_is_refused_in_one_line(client, call, message, status):
    with pytest.raises(ollama.ResponseError) as e:
        call(client)
    assert message in str(e.value.error) and "\n" not in e.value.error and e.value.status_code == status


def test_loading_with_an_empty_prompt_and_a_client_that_hangs_up(server, client):
    loaded = client.generate(NAME, "")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert client.chat(NAME, messages=[]).done_reason == "load"
    # a streaming client that goes away stops its generation
    with httpx.stream("POST", f"{server.url}/api/generate", json={"model": NAME, "prompt": "Tell me a long story.",
                      "options": {"num_predict": 2000, "temperature": 1}}, timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for n, line in enumerate(r.iter_lines()):
            assert json.loads(line)["done"] is False
            if n == 3:
                break
    deadline = time.time() + 3
    while httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()["idle"] != 1:
        assert time.time() < deadline, "the generation went on after the client left"
        time.sleep(0.05)


def test_recorded_client_bodies_are_answered(server):
    """Each client's requests in order, with its headers (VS Code's provider sends an empty bearer
    token); every answer has the fields that client reads."""
    for path in sorted(CLIENTS.glob("*.json")):
        session = json.loads(path.read_text())
        for step in session["requests"]:
            r = httpx.request(step["method"], server.url + step["path"], headers=step.get("headers", {}),
                              json=step.get("body"), timeout=120)
            assert r.status_code == 200, (path.name, step["path"], r.text)
            lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
            for field in step["reads"]:
                assert dig(lines[-1], field) is not None, (path.name, step["path"], field)


def dig(value, path: str):
    """`path`'s value in nested JSON; a key may hold dots itself (model_info's "llama.context_length")."""
    if not path:
        return value
    if isinstance(value, list):
        head, _, rest = path.partition(".")
        return dig(value[int(head)], rest)
    parts = path.split(".")
    for n in range(len(parts), 0, -1):  # the longest key that is there
        key = ".".join(parts[:n])
        if key in value:
            return dig(value[key], ".".join(parts[n:]))
    raise AssertionError(f"no {path!r} in the answer")


def test_a_keyed_server_needs_the_key_on_ollamas_generation_routes(tmp_path_factory):
    gen = running_server(tmp_path_factory, "--api-key", "sesame")
    keyed = next(gen)
    try:
        assert httpx.get(f"{keyed.url}/api/version", timeout=10).status_code == 200  # clients read it to connect
        assert httpx.get(f"{keyed.url}/api/tags", timeout=10).status_code == 200
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=keyed.url).generate(NAME, "hi", options={"num_predict": 2})
        assert e.value.status_code == 401 and "API key" in e.value.error
        ok = ollama.Client(host=keyed.url, headers={"Authorization": "Bearer sesame"})
        assert ok.generate(NAME, "hi", options={"num_predict": 2}).eval_count == 2
    finally:
        next(gen, None)


def test_concurrent_ollama_streams_are_batched(client):
    """Several Ollama clients at once each get their whole reply (they share batched steps)."""
    out: dict[int, str] = {}

    def one(i: int) -> None:
        out[i] = client.generate(NAME, f"Say the number {i}.", options={**GREEDY, "num_predict": 12}).response

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    alone = {i: client.generate(NAME, f"Say the number {i}.", options={**GREEDY, "num_predict": 12}).response
             for i in range(4)}
    assert out == alone
