"""Streaming generation: prefill the prompt, then decode token by token.

`stream_generate` yields small `Chunk` records (a text delta, the token, and at the end the
finish reason and speeds), mlx-lm style. It stops on EOS, on `max_new_tokens`, on the model's
context end, on any stop string (even one split across tokens), or when `cancel` is set from
another thread.

With `speculative` (and a model whose decoding step takes several rows of one sequence, i.e.
the native kernels' fused step), each forward pass also computes tokens drafted from the text
so far (engine/speculative.py); `sample()` then takes them one at a time, each accepted with
the probability plain sampling would give it, so a step can yield several tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from galatea.engine.prompt_cache import PromptCache
from galatea.engine.sampling import Sampler, SamplingParams
from galatea.engine.speculative import MAX_DRAFT, DraftLength, PromptLookup, accept
from galatea.engine.text_stream import IncrementalDetokenizer, PhraseGuard, StopMatcher
from galatea.errors import GalateaError
from galatea.model.llama import Llama
from galatea.model.tokenizer import Tokenizer

# A prompt with at most this many tokens left to read joins a batched decoding step as rows
# (fused native step), instead of taking a forward pass of its own between steps.
JOIN_PROMPT = 32
# Rewinds for banned phrases per generation; past that a phrase the model insists on stays
# (each rewind bans one token at one position, so this bounds the extra work).
MAX_REWINDS = 64


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
    drafted_tokens: int = 0  # speculative decoding: tokens drafted and verified
    accepted_tokens: int = 0  # of those, how many were kept
    # closing chunk, when SamplingParams.logprobs asked: every generated token with its log
    # probability and the top alternatives, under the model's distribution (before samplers)
    logprobs: list[TokenLogprob] | None = None
    # every chunk, when logprobs were asked: the entries of tokens that became final with it
    # (a token held back as a possible banned phrase is final only once its text is shown)
    new_logprobs: list[TokenLogprob] | None = None
    # closing chunk, finish_reason "error": what went wrong (a remote engine that failed mid-reply;
    # the text before it is good and kept)
    error: str | None = None


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


class Generation:
    """One request's generation as a stepwise state machine, so a scheduler can interleave
    several: `prefill_step()` until the prompt is read, then `sample()` (choose a token, give
    the text to show) while `logits` are known, and a forward pass over `rows()` (the last
    token, and any drafts) whenever `needs_forward` (alone, or batched with other generations:
    `rows`, `position`, `cache`, then `advance`), until `done`; `close()` gives the closing
    chunk. `stream_generate` is the one-request loop."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 cancel: threading.Event | None = None, max_context: int | None = None,
                 prompt_cache: PromptCache | None = None, speculative: bool = True) -> None:
        context = max_context or model.config.max_position_embeddings
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise GalateaError("the prompt is empty; give some text to continue")
        if n_prompt >= context:
            raise GalateaError(f"the prompt has {n_prompt} tokens but the context holds {context}; "
                               "shorten the prompt or raise --max-context")
        self.model, self.params, self.cancel = model, params, cancel
        # every end-of-reply id the checkpoint names (Llama-3: <|end_of_text|> and <|eot_id|>)
        ends = (tokenizer.eos_id, model.config.eos_token_id, *model.config.eos_token_ids)
        self.eos_ids = sorted({i for i in ends if i is not None})
        self.sampler = Sampler(params, model.config.vocab_size, self.eos_ids)
        self.budget = min(params.max_new_tokens, context - n_prompt)
        self.prompt_cache = prompt_cache
        if prompt_cache is not None:
            self.cache, plan = prompt_cache.reuse(model, prompt_ids, context)
            self.reused, self.shifted, todo = plan.reused, plan.moved, list(plan.compute)
            prompt_cache.clear()  # until this generation ends cleanly, the cache holds nothing certain
        else:
            self.cache, self.reused, self.shifted = model.make_cache(1, n_prompt + self.budget), 0, 0
            todo = [(0, n_prompt)]
        # prompt ranges [start, end) still to compute, in order: after chunk reuse, the new or
        # changed text between the runs kept from the cache; the last one ends the prompt
        self.todo: list[tuple[int, int]] = todo
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopMatcher(params.stop, params.include_stop)
        # banned phrases: the reply's text length after each new token, and the tokens banned
        # at a position (the first token of a banned phrase that was written there and undone)
        self.guard = PhraseGuard(params.banned_phrases)
        self.bans: dict[int, set[int]] = {}
        self.rewinds = 0
        self.logprob_log: list[TokenLogprob] = []
        self.logprobs_sent = 0  # entries handed out with chunks (tokens that can no longer be undone)
        self.tokens = list(prompt_ids)
        self.n_prompt = n_prompt
        self.read = todo[0][0]  # prompt positions before this one have their keys/values in the cache
        self.fed = 0  # positions whose cached keys/values are those of `tokens`, once the prompt is read
        self.logits: torch.Tensor | None = None  # the next position's; None while a forward pass is due
        self.prompt_read = False
        # drafts computed by the last forward pass, each with the logits of the position after it
        self.drafts: list[int] = []
        self.draft_logits: list[torch.Tensor] = []
        # the fused step (and the drafts and prompt rows it reads in one pass) when it serves this cache
        self.fused = model.fused if model.fused is not None and model.fused_fits([self.cache]) else None
        self.lookup = PromptLookup() if speculative and self.fused is not None else None
        self.draft_length = DraftLength()
        self.drafted = self.accepted = 0  # totals, for reports
        self.round_drafted = self.round_accepted = 0  # the last forward pass's
        self.n_new = 0
        self.finish: str | None = None
        self.t_start = time.perf_counter()
        self.t_prefilled = self.t_start

    @property
    def prefilled(self) -> bool:
        return self.prompt_read or self.finish is not None

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def needs_forward(self) -> bool:
        return self.prompt_read and self.logits is None and not self.done

    @property
    def joins_step(self) -> bool:
        """The rest of the prompt is short: it is read as rows of the next batched step."""
        return not self.prefilled and self.fused is not None and len(self.todo) == 1 and \
            self.n_prompt - self.read <= JOIN_PROMPT

    def prefill_step(self, chunk: int | None = None) -> bool:
        """Read up to `chunk` more prompt tokens (all by default); True once the prompt is read."""
        while not self.prefilled:
            if self.joins_step:  # as it is read inside a batched step, so that alone it gives the same
                self.forward()
                break
            start, end = self.todo[0]
            stop = end if chunk is None else min(end, start + chunk)
            part = torch.tensor([self.tokens[start:stop]], device=self.model.device)
            logits = self.model.prefill(part, start, self.cache)[0]
            if stop < end:
                self.todo[0] = (stop, end)
            else:
                self.todo.pop(0)
            self.read = self.todo[0][0] if self.todo else self.n_prompt
            if not self.todo:
                self.logits, self.fed, self.prompt_read = logits, self.n_prompt, True
                self.t_prefilled = time.perf_counter()
            if chunk is not None:
                break
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
        raw = self.logits
        with self.model.torch_threads(1):
            processed = self.sampler.distribution(self.logits, self.tokens)
        banned = self.bans.get(len(self.tokens))
        if banned:
            masked = processed.clone()
            masked[list(banned)] = float("-inf")
            processed = masked if bool(torch.isfinite(masked).any()) else processed
        if self.drafts:
            token, kept = accept(processed, self.drafts.pop(0), self.params.greedy, self.sampler.rng)
            after = self.draft_logits.pop(0)
            if kept:  # its row was computed: its logits are the next position's
                self.accepted += 1
                self.round_accepted += 1
                self.fed += 1
                self.logits = after
            else:  # the later drafts followed a token that is not there
                self.drafts.clear()
                self.draft_logits.clear()
                self.logits = None
            if not self.drafts:
                self.draft_length.update(self.round_drafted, self.round_accepted)
        else:
            with self.model.torch_threads(1):
                token = self.sampler.draw(processed)
            self.logits = None
        self.sampler.observe(processed, token)
        if self.params.logprobs is not None:
            self.logprob_log.append(_logprob(raw, token, self.params.logprobs))
        self.tokens.append(token)
        self.n_new += 1
        if token in self.eos_ids and not self.params.ban_eos:
            self.finish = "stop"
            return None
        piece, hit = self.guard.feed(self.detok.add(token))
        if hit is not None and self.rewinds < MAX_REWINDS:
            self._rewind(hit)
            return None
        if hit is not None:  # out of rewinds: let it through
            piece = self.guard.flush()
        text, stopped = self.stops.feed(piece)
        if stopped:
            self.finish = "stop"
        elif self.n_new >= self.budget:
            self.finish = "length"  # no forward pass for a token nobody will read
        return Chunk(text, token, new_logprobs=self._new_logprobs(self.guard.final))

    def _new_logprobs(self, final: int) -> list[TokenLogprob] | None:
        """The log probabilities not yet handed out of the first `final` tokens (for streams)."""
        if self.params.logprobs is None:
            return None
        new = self.logprob_log[self.logprobs_sent : final]
        self.logprobs_sent = max(self.logprobs_sent, final)
        return new

    def _rewind(self, i: int) -> None:
        """A banned phrase starts in the reply's token i: undo the tokens from it on, ban it at
        its position, and compute the position again (KoboldCpp's phrase banning). Nothing of
        those tokens was shown: their text was held back."""
        pos = self.n_prompt + i
        self.bans.setdefault(pos, set()).add(self.tokens[pos])
        self.rewinds += 1
        del self.tokens[pos:]
        del self.logprob_log[i:]
        self.n_new = i
        self.guard.rewind(i)
        self.detok = IncrementalDetokenizer(self.tokenizer, self.tokens[: self.n_prompt])
        for t in self.tokens[self.n_prompt :]:
            self.detok.add(t)
        if self.drafts:
            self.draft_length.update(self.round_drafted, self.round_accepted)
        self.drafts.clear()
        self.draft_logits.clear()
        # the last kept token's keys/values are cached; it is computed again for its logits
        self.fed = min(self.fed, len(self.tokens) - 1)
        self.logits = None

    @property
    def position(self) -> int:
        """Where the next forward pass starts: the last token's position (the first unread prompt
        token's, while the prompt is read)."""
        return len(self.tokens) - 1 if self.prompt_read else self.read

    def rows(self, max_drafts: int = MAX_DRAFT) -> list[int]:
        """The tokens the next forward pass computes, at positions `position` onwards: the last
        token, then up to `max_drafts` drafts (never past the reply's budget or the cache's end);
        or the rest of a short prompt (`joins_step`)."""
        if not self.prompt_read:
            return self.tokens[self.read : self.n_prompt]
        self.drafts = []
        if self.lookup is not None:
            room = min(self.budget - self.n_new, self.cache.max_len - 1 - self.position, max_drafts)
            assert self.fused is not None  # drafts only come with the fused step
            k = min(self.draft_length.next(self.fused.row_cost), room)
            self.drafts = self.lookup.draft(self.tokens, k) if k > 0 else []
        return [self.tokens[-1], *self.drafts]

    def advance(self, logits: torch.Tensor) -> None:
        """The forward pass over `rows()` ran; `logits` [len(rows), V], row i the next position's
        after row i's token."""
        if not self.prompt_read:
            self.logits, self.read, self.fed, self.prompt_read = logits[-1], self.n_prompt, self.n_prompt, True
            self.todo = []
            self.t_prefilled = time.perf_counter()
            return
        self.logits = logits[0]
        self.fed += 1
        self.draft_logits = list(logits[1:])
        self.round_drafted, self.round_accepted = len(self.drafts), 0
        self.drafted += len(self.drafts)

    def forward(self) -> None:
        """The forward pass on its own (not batched)."""
        rows, pos = self.rows(), self.position
        if len(rows) == 1:
            logits = self.model(torch.tensor([rows], device=self.model.device), pos, self.cache)
        else:  # drafts, or a short prompt's rest: rows at consecutive positions of this cache, in one step
            keep = None if self.prompt_read else [len(rows) - 1]
            logits = self.model.decode_batch(rows, [self.cache] * len(rows), range(pos, pos + len(rows)), keep)
        self.advance(logits)

    def close(self) -> Chunk:
        """The closing chunk: held-back text, finish reason and speeds. Records in the prompt
        cache what its KV cache now holds."""
        t_end = time.perf_counter()
        if self.prompt_cache is not None:  # a prefill cut short still leaves its part usable
            self.prompt_cache.holds(self.tokens[: self.fed if self.prompt_read else self.read])
        tail = ""
        if self.stops.matched is None:  # nothing after a stop is shown; otherwise release what was held
            held, hit = self.guard.feed(self.detok.flush())
            if hit is not None:  # completed by the last bytes: too late to rewind, so cut it
                match = self.guard.pattern.search(self.guard.text, self.guard.released)
                held += self.guard.text[self.guard.released : match.start() if match else None]
                self.guard.released = len(self.guard.text)
            tail, _ = self.stops.feed(held + self.guard.flush())
            tail += self.stops.flush()
        decode_s = t_end - self.t_prefilled
        return Chunk(
            tail, None, self.finish or "cancelled", self.n_prompt, self.n_new,
            prefill_tok_s=(self.n_prompt - self.reused) / max(self.t_prefilled - self.t_start, 1e-9),
            decode_tok_s=(self.n_new - 1) / max(decode_s, 1e-9) if self.n_new > 1 else 0.0,
            stop_string=self.stops.matched, seed=self.sampler.seed, cached_tokens=self.reused,
            shifted_tokens=self.shifted, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
            logprobs=list(self.logprob_log) if self.params.logprobs is not None else None,
            new_logprobs=self._new_logprobs(len(self.logprob_log)),
        )


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, top) if top > 0 else None
    alternatives = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), alternatives)


def stream_generate(model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                    cancel: threading.Event | None = None, max_context: int | None = None,
                    prompt_cache: PromptCache | None = None, speculative: bool = True) -> Iterator[Chunk]:
    """With a `prompt_cache`, what it already holds (a common prefix, and after a context shift
    the surviving turns) is not read again."""
    gen = Generation(model, tokenizer, prompt_ids, params, cancel, max_context, prompt_cache, speculative)
    gen.prefill_step()
    while not gen.done:
        chunk = gen.sample()
        if chunk is not None:
            yield chunk
        if gen.needs_forward:
            gen.forward()
    yield gen.close()


def generate(model: Llama, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
             cancel: threading.Event | None = None, speculative: bool = True) -> tuple[str, Chunk, list[int]]:
    """Run to the end; returns (text, closing chunk, generated token ids)."""
    parts, ids = [], []
    last = None
    for chunk in stream_generate(model, tokenizer, prompt_ids, params, cancel, speculative=speculative):
        parts.append(chunk.text)
        if chunk.token is not None:
            ids.append(chunk.token)
        last = chunk
    assert last is not None
    return "".join(parts), last, ids

