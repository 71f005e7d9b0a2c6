"""Streaming generation: prefill the prompt, then decode token by token.

`stream_generate` yields small `Chunk` records (a text delta, the token, and at the end the
finish reason and speeds), mlx-lm style. It stops on EOS, on `max_new_tokens`, on the model's
context end, on any stop string (even one split across tokens), or when `cancel` is set from
another thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from galatea.engine.prompt_cache import PromptCache
from galatea.engine.sampling import Sampler, SamplingParams
from galatea.engine.text_stream import IncrementalDetokenizer, StopMatcher
from galatea.errors import GalateaError
from galatea.model.llama import Llama
from galatea.model.tokenizer import Tokenizer


@dataclass
class Chunk:
    text: str  # new text to show (may be empty while a stop prefix or a character is pending)
    token: int | None  # the token just generated; None for the closing chunk
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last chunk
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    stop_string: str | None = None  # which stop string ended it, if one did
    seed: int | None = None
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused, not recomputed
    shifted_tokens: int = 0  # of those, how many were moved by a context shift


class Generation:
    """One request's generation as a stepwise state machine, so a scheduler can interleave
    several: `prefill_step()` until the prompt is read, then alternately `sample()` (choose a
    token from `logits`, give the text to show) and a forward pass that sets `logits` again
    (alone, or batched with other generations: `input_token`, `position`, `cache`), until
    `done`; `close()` gives the closing chunk. `stream_generate` is the one-request loop."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event | None = None, max_context: int | None = None,
                 prompt_cache: PromptCache | None = None) -> None:
        context = max_context or model.config.max_position_embeddings
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise GalateaError("the prompt is empty; give some text to continue")
        if n_prompt >= context:
            raise GalateaError(f"the prompt has {n_prompt} tokens but the context holds {context}; "
                               "shorten the prompt or raise --max-context")
        self.model, self.params, self.cancel = model, params, cancel
        self.eos_ids = sorted({i for i in (tokenizer.eos_id, model.config.eos_token_id) if i is not None})
        self.sampler = Sampler(params, model.config.vocab_size, self.eos_ids)
        self.budget = min(params.max_new_tokens, context - n_prompt)
        self.prompt_cache = prompt_cache
        if prompt_cache is not None:
            self.cache, self.reused = prompt_cache.reuse(model, prompt_ids, context)
            self.shifted = prompt_cache.last_shift
            prompt_cache.clear()  # until this generation ends cleanly, the cache holds nothing certain
        else:
            self.cache, self.reused, self.shifted = model.make_cache(1, n_prompt + self.budget), 0, 0
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopMatcher(params.stop, params.include_stop)
        self.tokens = list(prompt_ids)
        self.n_prompt = n_prompt
        self.read = self.reused  # prompt positions whose keys/values are in the cache
        self.fed = 0  # all positions in the cache, once the prompt is read
        self.logits: torch.Tensor | None = None
        self.n_new = 0
        self.finish: str | None = None
        self.t_start = time.perf_counter()
        self.t_prefilled = self.t_start

    @property
    def prefilled(self) -> bool:
        return self.logits is not None or self.finish is not None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def prefill_step(self, chunk: int | None = None) -> bool:
        """Read up to `chunk` more prompt tokens (all by default); True once the prompt is read."""
        if self.prefilled:
            return True
        end = self.n_prompt if chunk is None else min(self.n_prompt, self.read + chunk)
        part = torch.tensor([self.tokens[self.read : end]], device=self.model.device)
        logits = self.model.prefill(part, self.read, self.cache)[0]
        self.read = end
        if end == self.n_prompt:
            self.logits, self.fed = logits, self.n_prompt
            self.t_prefilled = time.perf_counter()
        return self.prefilled

    def sample(self) -> Chunk | None:
        """Choose the next token; the chunk to show, or None when generation ended instead."""
        assert self.logits is not None and not self.done
        if self.cancel is not None and self.cancel.is_set():
            self.finish = "cancelled"
            return None
        if self.n_new >= self.budget:
            self.finish = "length"
            return None
        token = self.sampler(self.logits, self.tokens)
        self.tokens.append(token)
        self.n_new += 1
        if token in self.eos_ids and not self.params.ban_eos:
            self.finish = "stop"
            return None
        text, stopped = self.stops.feed(self.detok.add(token))
        if stopped:
            self.finish = "stop"
        elif self.n_new >= self.budget:
            self.finish = "length"  # no forward pass for a token nobody will read
        return Chunk(text, token)

    @property
    def input_token(self) -> int:
        return self.tokens[-1]

    @property
    def position(self) -> int:
        return len(self.tokens) - 1

    def advance(self, logits: torch.Tensor) -> None:
        """The forward pass for `input_token` at `position` ran; `logits` [V] are the next."""
        self.logits = logits
        self.fed += 1

    def forward(self) -> None:
        """The forward pass on its own (not batched)."""
        self.advance(self.model(torch.tensor([[self.input_token]], device=self.model.device),
                                self.position, self.cache)[0])

    def close(self) -> Chunk:
        """The closing chunk: held-back text, finish reason and speeds. Records in the prompt
        cache what its KV cache now holds."""
        t_end = time.perf_counter()
        if self.prompt_cache is not None:  # a prefill cut short still leaves its part usable
            self.prompt_cache.holds(self.tokens[: self.fed if self.logits is not None else self.read])
        tail = ""
        if self.stops.matched is None:  # nothing after a stop is shown; otherwise release what was held
            tail, _ = self.stops.feed(self.detok.flush())
            tail += self.stops.flush()
        decode_s = t_end - self.t_prefilled
        return Chunk(
            tail, None, self.finish or "cancelled", self.n_prompt, self.n_new,
            prefill_tok_s=(self.n_prompt - self.reused) / max(self.t_prefilled - self.t_start, 1e-9),
            decode_tok_s=(self.n_new - 1) / max(decode_s, 1e-9) if self.n_new > 1 else 0.0,
            stop_string=self.stops.matched, seed=self.sampler.seed, cached_tokens=self.reused,
            shifted_tokens=self.shifted,
        )


def stream_generate(model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                    cancel: threading.Event | None = None, max_context: int | None = None,
                    prompt_cache: PromptCache | None = None) -> Iterator[Chunk]:
    """With a `prompt_cache`, what it already holds (a common prefix, and after a context shift
    the surviving turns) is not read again."""
    gen = Generation(model, tokenizer, prompt_ids, params, cancel, max_context, prompt_cache)
    gen.prefill_step()
    while not gen.done:
        chunk = gen.sample()
        if chunk is not None:
            yield chunk
        if not gen.done:
            gen.forward()
    yield gen.close()


def generate(model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
             cancel: threading.Event | None = None) -> tuple[str, Chunk, list[int]]:
    """Run to the end; returns (text, closing chunk, generated token ids)."""
    parts, ids = [], []
    last = None
    for chunk in stream_generate(model, tokenizer, prompt_ids, params, cancel):
        parts.append(chunk.text)
        if chunk.token is not None:
            ids.append(chunk.token)
        last = chunk
    assert last is not None
    return "".join(parts), last, ids

