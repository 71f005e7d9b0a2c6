"""Prefix reuse: a prompt that starts like the last one reads only the new part, and the result
is exactly what a fresh computation gives."""

from __future__ import annotations

import threading

import pytest

from galatea.engine.generate import generate, stream_generate
from galatea.engine.prompt_cache import PromptCache
from galatea.model.checkpoint import load
from tests.helpers import greedy

pytestmark = pytest.mark.slow

TURN1 = "Aria's Persona: A cheerful bard.\n<START>\nYou: Hello! Who are you?\nAria:"


@pytest.fixture(scope="module")
def lm():
    return load(None, quant="none")  # exact float compute, so reuse must change nothing


def test_growing_chat_reuses_the_prefix_and_matches_a_fresh_run(lm):
    cache = PromptCache()
    tok = lm.tokenizer
    first = tok.encode(TURN1)
    text, last, _ = generate_with(lm, first, cache)
    assert last.cached_tokens == 0
    turn2 = tok.encode(TURN1 + text + "\nYou: Sing me a song.\nAria:")
    _, last2, ids2 = generate_with(lm, turn2, cache)
    assert last2.cached_tokens >= len(first)  # the whole first turn, and the reply it produced
    _, fresh, fresh_ids = generate(lm.model, tok, turn2, greedy(12))
    assert ids2 == fresh_ids and fresh.cached_tokens == 0


def test_a_different_prompt_reuses_only_the_common_part(lm):
    cache = PromptCache()
    tok = lm.tokenizer
    generate_with(lm, tok.encode(TURN1), cache)
    other = tok.encode(TURN1.replace("Hello! Who are you?", "Good evening."))
    _, last, ids = generate_with(lm, other, cache)
    common = next(i for i, (a, b) in enumerate(zip(tok.encode(TURN1), other, strict=False)) if a != b)
    assert last.cached_tokens == common
    assert ids == generate(lm.model, tok, other, greedy(12))[2]


def test_a_cancelled_generation_leaves_a_usable_cache(lm):
    cache = PromptCache()
    ids = lm.tokenizer.encode(TURN1)
    cancel = threading.Event()
    for i, _ in enumerate(stream_generate(lm.model, lm.tokenizer, ids, greedy(50), cancel, None, cache)):
        if i == 3:
            cancel.set()
    _, last, out = generate_with(lm, ids, cache)
    assert last.cached_tokens == len(ids) - 1
    assert out == generate(lm.model, lm.tokenizer, ids, greedy(12))[2]


def generate_with(lm, ids, cache):
    parts, tokens, last = [], [], None
    for chunk in stream_generate(lm.model, lm.tokenizer, ids, greedy(12), None, None, cache):
        parts.append(chunk.text)
        if chunk.token is not None:
            tokens.append(chunk.token)
        last = chunk
    return "".join(parts), last, tokens
