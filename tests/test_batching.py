"""Many users at once: batched decoding gives each request what it would get alone, streams stay
independent, and cancelling one leaves the others untouched."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from galatea.engine.generate import generate
from galatea.engine.sampling import SamplingParams
from galatea.model.checkpoint import load
from galatea.server.engine import Engine
from tests.test_kernels import PATHS
from tests.test_server import Server

PROMPTS = [f"You: Tell me about the {w} of the kingdom.\nAria:" for w in
           ("dragons", "bakers", "rivers", "old kings", "lighthouses", "goats", "weddings", "storms")]


@pytest.fixture(scope="module")
def lm():
    return load(None, dtype=torch.float32, quant="none")  # exact float compute: batching changes nothing


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=1.0, ban_eos=True)


def test_decode_batch_equals_sequential_decoding(lm):
    m, tok = lm.model, lm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS[:4]]
    ids[1] = ids[1] + tok.encode(" Once upon a time, long ago,")  # rows at different positions
    alone = [generate(m, tok, x, greedy(10))[2] for x in ids]
    caches = [m.make_cache(1, 128) for _ in ids]
    logits = [m.prefill(torch.tensor([x]), 0, c)[0] for x, c in zip(ids, caches, strict=True)]
    out: list[list[int]] = [[] for _ in ids]
    for step in range(10):
        toks = [int(row.argmax()) for row in logits]
        for o, t in zip(out, toks, strict=True):
            o.append(t)
        logits = list(m.decode_batch(toks, caches, [len(x) + step for x in ids]))
    assert out == alone


@pytest.mark.parametrize("path", PATHS)
def test_native_decode_batch_equals_sequential_decoding_exactly(path):
    """On the native kernels a row's result does not depend on the rows beside it (activations
    are quantized per row, each row attends to its own cache): batched greedy decoding of the
    quantized model gives exactly what each request gets alone."""
    lm = load(None, kernels=path)
    m, tok = lm.model, lm.tokenizer
    assert m.fused is not None
    ids = [tok.encode(p) for p in PROMPTS[:5]]
    ids[2] = ids[2] + tok.encode(" The bells rang twice, and")
    alone = [generate(m, tok, x, greedy(12))[2] for x in ids]
    caches = [m.make_cache(1, 128) for _ in ids]
    # short prompts are read as rows of the fused step, as a generation reads them
    logits = [m.decode_batch(x, [c] * len(x), range(len(x)), keep=[len(x) - 1])[0]
              for x, c in zip(ids, caches, strict=True)]
    out: list[list[int]] = [[] for _ in ids]
    for step in range(12):
        toks = [int(row.argmax()) for row in logits]
        for o, t in zip(out, toks, strict=True):
            o.append(t)
        logits = list(m.decode_batch(toks, caches, [len(x) + step for x in ids]))
    assert out == alone


def run_clients(engine: Engine, prompts: list[list[int]], params: SamplingParams, cancel_at: dict[int, int]):
    results: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)
    first_token_at: list[float] = [0.0] * len(prompts)
    done_at: list[float] = [0.0] * len(prompts)

    def client(i: int) -> None:
        cancel = threading.Event()
        for chunk in engine.generate_sync(prompts[i], params, cancel):
            if chunk.token is not None:
                results[i].append(chunk.token)
                first_token_at[i] = first_token_at[i] or time.perf_counter()
                if len(results[i]) == cancel_at.get(i):
                    cancel.set()
            if chunk.finish_reason:
                finish[i] = chunk.finish_reason
        done_at[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, finish, first_token_at, done_at


def test_eight_streams_are_batched_independent_and_cancellable(lm):
    tok = lm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [generate(lm.model, tok, p, greedy(16))[2] for p in prompts]
    engine = Engine(lm, max_context=256, max_batch=8)
    try:
        results, finish, first, done = run_clients(engine, prompts, greedy(16), cancel_at={3: 4})
    finally:
        engine.close()
    for i in range(8):
        if i == 3:
            assert finish[i] == "cancelled" and results[i] == alone[i][: len(results[i])] and len(results[i]) < 16
        else:
            assert finish[i] == "length" and results[i] == alone[i], i
    # they really ran together: every stream had its first token before any stream finished
    assert max(first) < min(done[i] for i in range(8) if i != 3)


def test_more_requests_than_the_batch_wait_their_turn(lm):
    tok = lm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:5]]
    engine = Engine(lm, max_context=256, max_batch=2, cache_slots=2)
    try:
        results, finish, _, _ = run_clients(engine, prompts, greedy(6), cancel_at={})
    finally:
        engine.close()
    assert finish == ["length"] * 5
    assert results == [generate(lm.model, tok, p, greedy(6))[2] for p in prompts]


def test_server_streams_eight_clients_at_once(tmp_path):
    server = Server(tmp_path, "--quant", "none", "--dtype", "float32")
    try:
        def complete(prompt: str, stream: bool) -> str:
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream}
            if not stream:
                return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
            text = ""
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":

                        text += json.loads(line[6:])["choices"][0]["text"]
            return text

        alone = [complete(p, stream=False) for p in PROMPTS]  # one at a time
        together: list[str] = [""] * 8
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, complete(PROMPTS[i], True)))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert together == alone
        assert all(alone)
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
