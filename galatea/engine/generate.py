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


def stream_generate(model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                    cancel: threading.Event | None = None, max_context: int | None = None,
                    prompt_cache: PromptCache | None = None) -> Iterator[Chunk]:
    """With a `prompt_cache`, what it already holds (a common prefix, and after a context shift
    the surviving turns) is not read again."""
    context = max_context or model.config.max_position_embeddings
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise GalateaError("the prompt is empty; give some text to continue")
    if n_prompt >= context:
        raise GalateaError(f"the prompt has {n_prompt} tokens but the context holds {context}; "
                           "shorten the prompt or raise --max-context")
    eos_ids = sorted({i for i in (tokenizer.eos_id, model.config.eos_token_id) if i is not None})
    sampler = Sampler(params, model.config.vocab_size, eos_ids)
    budget = min(params.max_new_tokens, context - n_prompt)
    if prompt_cache is not None:
        cache, reused = prompt_cache.reuse(model, prompt_ids, context)
        shifted = prompt_cache.last_shift
        prompt_cache.clear()  # until this generation ends cleanly, the cache holds nothing certain
    else:
        cache, reused, shifted = model.make_cache(1, n_prompt + budget), 0, 0
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    stops = StopMatcher(params.stop, params.include_stop)
    tokens = list(prompt_ids)

    t0 = time.perf_counter()
    logits = model.prefill(torch.tensor([tokens[reused:]], device=model.device), reused, cache)[0]
    t1 = time.perf_counter()
    fed = n_prompt  # positions whose keys/values are in the cache
    finish, n_new = None, 0
    while finish is None:
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        if n_new >= budget:
            finish = "length"
            break
        token = sampler(logits, tokens)
        tokens.append(token)
        n_new += 1
        if token in eos_ids and not params.ban_eos:
            finish = "stop"
            break
        text, stopped = stops.feed(detok.add(token))
        if stopped:
            finish = "stop"
        yield Chunk(text, token)
        if finish is None and n_new < budget:
            logits = model(torch.tensor([[token]], device=model.device), len(tokens) - 1, cache)[0]
            fed += 1
    t2 = time.perf_counter()
    if prompt_cache is not None:
        prompt_cache.holds(tokens[:fed])
    tail = ""
    if stops.matched is None:  # nothing after a stop is shown; otherwise release what was held
        tail, _ = stops.feed(detok.flush())
        tail += stops.flush()
    yield Chunk(
        tail, None, finish, n_prompt, n_new,
        prefill_tok_s=(n_prompt - reused) / max(t1 - t0, 1e-9),
        decode_tok_s=(n_new - 1) / max(t2 - t1, 1e-9) if n_new > 1 else 0.0,
        stop_string=stops.matched, seed=sampler.seed, cached_tokens=reused, shifted_tokens=shifted,
    )


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

