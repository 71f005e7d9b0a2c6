"""Never re-read a prompt already read: KV cache slots that remember which tokens they hold.

A chat re-sends the whole conversation every turn. Two ways to avoid reading it again:

- **Prefix reuse.** The new prompt usually starts with everything a slot already holds; the cache
  is indexed by position, so reuse is starting the prefill at the first position that differs.
- **Context shift** (KoboldCpp's ContextShift). Once the chat is longer than the window, the
  oldest turns drop out right after the fixed persona block, so the prompt differs from the
  cache early on. But most of what follows — the surviving turns — is still in the cache, only
  `d` positions later. We keep the persona's entries, move the surviving entries down by `d`,
  and re-rotate their keys to the new positions (RoPE is a rotation by angle position x
  frequency, so rotating by -d x frequency moves a key back exactly `d` positions). Only the new
  turn is then computed. Values are position-free. Deeper layers' entries still reflect
  attention to the dropped turns, so results drift a little from a fresh computation; that is
  measured by `galatea bench --chat-turn` and can be turned off (`context_shift=False`).

`PromptCachePool` keeps several slots (LRU) so alternating chats or clients do not evict each other.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

import numpy as np

from galatea.model.cache import KVCache
from galatea.model.llama import Llama

MIN_SHIFT = 32  # fewer surviving tokens than this are cheaper to recompute than to move


@dataclass(frozen=True)
class ReusePlan:
    common: int  # leading prompt tokens the slot holds at the same positions
    shift_from: int = 0  # > 0: held[shift_from : shift_from + shift_len] becomes positions common..
    shift_len: int = 0

    @property
    def reused(self) -> int:
        return self.common + self.shift_len


def plan_reuse(held: Sequence[int], prompt: Sequence[int], context_shift: bool) -> ReusePlan:
    """How much of `prompt` (all but its last token, whose logits are needed) a slot holding
    `held` can provide: the common prefix, and with `context_shift` a run of held tokens that
    reappears right after it."""
    usable = list(prompt[:-1])
    common = 0
    for a, b in zip(held, usable, strict=False):
        if a != b:
            break
        common += 1
    if not context_shift or common >= len(usable) or len(held) - common <= MIN_SHIFT:
        return ReusePlan(common)
    h = np.asarray(held, dtype=np.int64)
    p = np.asarray(usable[common:], dtype=np.int64)
    # Candidate offsets: where the held tokens after the prefix start like the prompt's rest.
    probe = min(8, len(p))
    rest = h[common + 1 :]
    starts = np.nonzero(rest == p[0])[0]
    best_from, best_len = 0, 0
    for s in starts:
        src = common + 1 + int(s)
        span = min(len(h) - src, len(p))
        if span <= max(best_len, MIN_SHIFT - 1) or not np.array_equal(h[src : src + probe], p[:probe]):
            continue
        diff = np.nonzero(h[src : src + span] != p[:span])[0]
        run = int(diff[0]) if len(diff) else span
        if run > best_len:
            best_from, best_len = src, run
    if best_len < MIN_SHIFT:
        return ReusePlan(common)
    return ReusePlan(common, best_from, best_len)


class PromptCache:
    """One slot: a KV cache and the tokens whose keys/values it holds at positions 0..len-1."""

    def __init__(self, context_shift: bool = True) -> None:
        self.cache: KVCache | None = None
        self.tokens: list[int] = []
        self.context_shift = context_shift
        self.last_shift = 0  # tokens moved by the last reuse (0: none), for reports and tests

    def plan(self, prompt_ids: Sequence[int]) -> ReusePlan:
        return plan_reuse(self.tokens, prompt_ids, self.context_shift)

    def reuse(self, model: Llama, prompt_ids: Sequence[int], max_len: int) -> tuple[KVCache, int]:
        """The cache to use and how many leading prompt tokens it now holds (after a context
        shift, if one applies). At least the last prompt token is always recomputed: its
        logits pick the first new token."""
        if self.cache is None or self.cache.max_len < max_len:
            self.cache, self.tokens = model.make_cache(1, max_len), []
        plan = self.plan(prompt_ids)
        self.last_shift = plan.shift_len
        if plan.shift_len:
            assert model.rotary is not None
            self.cache.shift(plan.shift_from, plan.common, plan.shift_len, model.rotary)
        self.tokens = list(prompt_ids[: plan.reused])
        return self.cache, plan.reused

    def holds(self, tokens: Sequence[int]) -> None:
        """Record what the cache holds after a generation (positions 0..len(tokens)-1)."""
        self.tokens = list(tokens)

    def clear(self) -> None:
        self.tokens = []


class PromptCachePool:
    """Several slots, least recently used evicted first. A request takes the slot that can
    reuse the most of its prompt; with none useful, an empty slot or the least recently used."""

    def __init__(self, slots: int = 4, context_shift: bool = True) -> None:
        if slots < 1:
            raise ValueError("a prompt cache pool needs at least one slot")
        self.slots = [PromptCache(context_shift) for _ in range(slots)]
        self._clock = 0
        self._used = [0] * slots

    def acquire(self, prompt_ids: Sequence[int], busy: Container[int] = ()) -> PromptCache | None:
        """The slot for this prompt, skipping those whose id() is in `busy` (in use by running
        generations); None when all are busy. A slot counts as this prompt's when it can reuse at
        least half of what it holds (a shared BOS or first word must not hand one client's cache
        to another); otherwise an unused slot, else the least recently used."""
        free = [i for i, s in enumerate(self.slots) if id(s) not in busy]
        if not free:
            return None
        reuse = {i: self.slots[i].plan(prompt_ids).reused for i in free}
        mine = [i for i in free if reuse[i] and 2 * reuse[i] >= len(self.slots[i].tokens)]
        if mine:
            best = max(mine, key=lambda i: (reuse[i], self._used[i]))
        else:
            best = min(free, key=lambda i: (self.slots[i].cache is not None, self._used[i]))
        self._clock += 1
        self._used[best] = self._clock
        return self.slots[best]

    @property
    def nbytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots if s.cache is not None)
