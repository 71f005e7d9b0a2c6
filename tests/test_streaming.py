"""Streaming: whole characters, stop strings across tokens, held text flushed, cancel.

A scripted model emits a fixed token sequence (its logits are one-hot on the next scripted id),
so each test controls exactly how the text is split into tokens; the tokenizers are the real
LLaMA (SentencePiece with byte fallback) and SmolLM2 (byte-level BPE) ones.
"""

from __future__ import annotations

import contextlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from galatea.engine.generate import stream_generate
from galatea.engine.sampling import SamplingParams
from galatea.engine.text_stream import IncrementalDetokenizer, StopMatcher
from galatea.model.checkpoint import embedded_model_path, load_tokenizer

EOS = 2


class ScriptedModel:
    fused = None  # no fused decoding step: no drafts, prompts read by prefill()

    def __init__(self, script: list[int], vocab: int, delay: float = 0.0) -> None:
        self.script, self.delay, self.calls = script, delay, 0
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096, eos_token_id=EOS,
                                      eos_token_ids=(EOS,))
        self.device = torch.device("cpu")

    def torch_threads(self, rows: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def make_cache(self, batch: int, length: int) -> None:
        return None

    def _next(self) -> torch.Tensor:
        time.sleep(self.delay)
        logits = torch.zeros(1, self.config.vocab_size)
        logits[0, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits

    def prefill(self, tokens, start, cache):
        self.calls = 0
        return self._next()

    def __call__(self, tokens, start, cache):
        return self._next()


def reply_ids(tok, text: str) -> list[int]:
    """The ids a model would emit for `text` as a continuation (no SentencePiece dummy prefix)."""
    ids = tok.encode("X" + text, add_bos=False)
    assert tok.decode(ids[:1]) == "X"
    return ids[1:]


def run(tok, script, prompt="You: Hi\nAria:", **params):
    model = ScriptedModel(script, tok.vocab_size)
    p = SamplingParams(temperature=0, repetition_penalty=1.0, **params)
    chunks = list(stream_generate(model, tok, tok.encode(prompt), p))
    return chunks, model


def test_emoji_from_byte_tokens_arrives_whole(llama_tok):
    reply = " Look: \U0001f999\U0001f999 done"
    script = reply_ids(llama_tok, reply)
    assert len(script) > 10  # each llama is four byte-fallback tokens
    chunks, _ = run(llama_tok, [*script, EOS], max_new_tokens=50)
    texts = [c.text for c in chunks]
    assert "".join(texts) == reply  # leading space kept, nothing lost
    assert not any("\ufffd" in t for t in texts)
    assert any("\U0001f999" in t for t in texts)
    assert chunks[-1].finish_reason == "stop"


def test_emoji_whole_with_byte_level_bpe():
    tok = load_tokenizer(embedded_model_path())
    reply = " caf\u00e9 \U0001f600!"
    script = reply_ids(tok, reply)
    chunks, _ = run(tok, [*script, 2], max_new_tokens=50)
    texts = [c.text for c in chunks]
    assert "".join(texts) == reply and not any("\ufffd" in t for t in texts)


def test_stop_string_split_over_three_tokens(llama_tok):
    text = " Hi there!\nYou: and more words here"
    script = reply_ids(llama_tok, text)
    pieces = [llama_tok.decode(script[: i + 1]) for i in range(len(script))]
    # "\nYou:" really spans three tokens: "\n", "You", ":"
    assert [llama_tok.decode([t]) for t in script[3:6]] == ["\n", "You", ":"], pieces
    chunks, model = run(llama_tok, script, max_new_tokens=50, stop=["\nYou:"])
    assert "".join(c.text for c in chunks) == " Hi there!"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_string == "\nYou:"
    assert model.calls == 6  # generation stopped at the stop, not at max_new_tokens
    assert all("You" not in c.text for c in chunks)


def test_stop_included_when_asked(llama_tok):
    script = reply_ids(llama_tok, " Hi there!\nYou: more")
    chunks, _ = run(llama_tok, script, max_new_tokens=50, stop=["\nYou:"], include_stop=True)
    assert "".join(c.text for c in chunks) == " Hi there!\nYou:"


def test_text_resembling_a_stop_prefix_is_flushed_at_eos(llama_tok):
    script = reply_ids(llama_tok, " Hi\nYo")
    chunks, _ = run(llama_tok, [*script, EOS], max_new_tokens=50, stop=["\nYou:"])
    assert "".join(c.text for c in chunks) == " Hi\nYo"
    assert "\nYo" not in "".join(c.text for c in chunks[:-1])  # held back while it could be a stop
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_string is None


def test_held_prefix_is_flushed_at_length(llama_tok):
    script = reply_ids(llama_tok, " Hi\nYo")
    chunks, _ = run(llama_tok, script, max_new_tokens=len(script), stop=["\nYou:"])
    assert "".join(c.text for c in chunks) == " Hi\nYo"
    assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == len(script)


def test_eos_banned_runs_to_length(llama_tok):
    model = ScriptedModel([EOS], llama_tok.vocab_size)
    params = SamplingParams(temperature=0, max_new_tokens=5, ban_eos=True)
    chunks = list(stream_generate(model, llama_tok, llama_tok.encode("Hi"), params))
    assert chunks[-1].finish_reason == "length" and chunks[-1].generated_tokens == 5
    assert all(c.token != EOS for c in chunks)


def test_cancel_from_another_thread(llama_tok):
    model = ScriptedModel([450], llama_tok.vocab_size, delay=0.01)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    params = SamplingParams(temperature=0, max_new_tokens=10_000, ban_eos=True)
    t = time.perf_counter()
    chunks = list(stream_generate(model, llama_tok, llama_tok.encode("Hi"), params, cancel=cancel))
    assert chunks[-1].finish_reason == "cancelled"
    assert time.perf_counter() - t < 5 and chunks[-1].generated_tokens < 1000


def test_prompt_longer_than_context_is_refused(llama_tok):
    from galatea.errors import GalateaError

    model = ScriptedModel([450], llama_tok.vocab_size)
    model.config.max_position_embeddings = 8
    with pytest.raises(GalateaError, match="context holds 8"):
        list(stream_generate(model, llama_tok, llama_tok.encode("one two three four five six seven eight"),
                             SamplingParams()))


def test_detokenizer_never_splits_characters(llama_tok):
    text = "\u65e5\u672c \U0001f680 na\u00efve"
    ids = llama_tok.encode(text, add_bos=False)
    detok = IncrementalDetokenizer(llama_tok, [1])
    out = [detok.add(i) for i in ids]
    assert "".join(out) + detok.flush() == text
    assert all("\ufffd" not in piece for piece in out)


def test_stop_matcher_earliest_stop_wins():
    m = StopMatcher(["B", "AB"])
    assert m.feed("xxA") == ("xx", False)
    assert m.feed("B rest") == ("", True) and m.matched == "AB"
