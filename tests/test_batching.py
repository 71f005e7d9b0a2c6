"""Many users at once: batched decoding gives each request what it would get alone, streams stay
independent, and cancelling one leaves the others untouched."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from galatea.engine.generate import generate
from galatea.engine.scheduler import Scheduler
from galatea.model.checkpoint import load
from tests.helpers import PATHS, Server, greedy, run_clients

pytestmark = pytest.mark.slow

PROMPTS = [f"You: Tell me about the {w} of the kingdom.\nAria:" for w in
           ("dragons", "bakers", "rivers", "old kings", "lighthouses", "goats", "weddings", "storms")]


@pytest.fixture
def lm(embedded_lm_exact):
    return embedded_lm_exact  # exact float compute: batching changes nothing


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


def test_eight_streams_are_batched_independent_and_cancellable(lm):
    tok = lm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [generate(lm.model, tok, p, greedy(16))[2] for p in prompts]
    engine = Scheduler(lm, max_context=256, max_batch=8)
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
    engine = Scheduler(lm, max_context=256, max_batch=2, cache_slots=2)
    try:
        results, finish, _, _ = run_clients(engine, prompts, greedy(6), cancel_at={})
    finally:
        engine.close()
    assert finish == ["length"] * 5
    assert results == [generate(lm.model, tok, p, greedy(6))[2] for p in prompts]


@pytest.mark.server
def test_server_streams_eight_clients_at_once(tmp_path):
    server = Server(tmp_path, "--quant", "none", "--dtype", "float32")
    # generous: a busy machine is slow, and a client that gives up must fail as a timeout, not
    # come back as an empty text
    timeout = 600

    def complete(prompt: str, stream: bool) -> str:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": stream}
        try:
            if not stream:
                r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=timeout)
                return r.json()["choices"][0]["text"]
            text = ""
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=timeout) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text
        except httpx.TimeoutException:
            raise AssertionError(f"timed out: no answer within {timeout} s (the machine is too busy?)") from None

    try:
        alone = [complete(p, stream=False) for p in PROMPTS]  # one at a time
        with ThreadPoolExecutor(8) as pool:  # .result() re-raises a client's failure
            together = [f.result() for f in [pool.submit(complete, p, True) for p in PROMPTS]]
        assert together == alone
        assert all(alone)
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
