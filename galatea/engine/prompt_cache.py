"""Never re-read a prompt already read: KV cache slots that remember which tokens they hold.

A chat re-sends the whole conversation every turn. Three ways to avoid reading it again:

- **Prefix reuse.** The new prompt usually starts with everything a slot already holds; the cache
  is indexed by position, so reuse is starting the prefill at the first position that differs.
- **Context shift** (KoboldCpp's ContextShift). Once the chat is longer than the window, the
  oldest turns drop out right after the fixed persona block, so the prompt differs from the
  cache early on. But most of what follows — the surviving turns — is still in the cache, only
  `d` positions later. We keep the persona's entries, move the surviving entries down by `d`,
  and re-rotate their keys to the new positions (RoPE is a rotation by angle position x
  frequency, so rotating by -d x frequency moves a key back exactly `d` positions).
- **Chunk reuse**, the general case: SillyTavern rewrites the middle of its prompt every turn
  (world-info entries inserted after the first line and removed again, example dialogues
  dropped, the author's note at a depth), so the prompt shares only a few dozen tokens of
  prefix with the last one. Every long run of cached tokens (`MIN_CHUNK`+) that reappears later
  in the new prompt, in order, is moved to its new position (forward or back) and re-rotated;
  only the tokens between them — really new or changed — are computed, each range attending to
  everything before it.

Moved entries of deeper layers still reflect attention to what they followed before, so results
drift a little from a fresh computation; that is measured by `galatea bench --chat-turn` and
turned off with `context_shift=False` (then only the prefix is reused: exact).

`PromptCachePool` keeps several slots (LRU) so alternating chats or clients do not evict each other.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field

from galatea.model.cache import KVCache
from galatea.model.llama import Llama

MIN_CHUNK = 32  # shorter runs: not worth the risk of reusing entries computed in another context
MIN_SHIFT = MIN_CHUNK  # (the name context shift's tests know it by)
_KEY = 8  # tokens of a run's start looked up in the index of held tokens


@dataclass(frozen=True)
class ReusePlan:
    common: int  # leading prompt tokens the slot holds at the same positions
    moves: tuple[tuple[int, int, int], ...] = ()  # (src, dst, length): held runs kept at new positions
    compute: tuple[tuple[int, int], ...] = field(default=())  # prompt ranges [start, end) to compute

    @property
    def moved(self) -> int:
        return sum(n for src, dst, n in self.moves if src != dst)

    @property
    def reused(self) -> int:
        return self.common + sum(n for _, _, n in self.moves)

    @property
    def first_change(self) -> int:
        """The first prompt position that is computed (everything before it is kept)."""
        return self.compute[0][0]


def plan_reuse(held: Sequence[int], prompt: Sequence[int], context_shift: bool) -> ReusePlan:
    """How much of `prompt` a slot holding `held` can provide: the common prefix, and with
    `context_shift` the runs of held tokens (MIN_CHUNK or more, in order) that reappear later in
    it. The last prompt token is always computed: its logits pick the first new token."""
    usable = list(prompt[:-1])
    common = 0
    for a, b in zip(held, usable, strict=False):
        if a != b:
            break
        common += 1
    moves: list[tuple[int, int, int]] = []
    compute: list[tuple[int, int]] = []
    if context_shift and len(held) - common >= MIN_CHUNK and len(usable) - common >= MIN_CHUNK:
        starts: dict[tuple[int, ...], list[int]] = {}
        for i in range(common, len(held) - _KEY + 1):
            starts.setdefault(tuple(held[i : i + _KEY]), []).append(i)
        i, from_held, gap = common, common, common
        while i + MIN_CHUNK <= len(usable):
            best, at = 0, -1
            for src in starts.get(tuple(usable[i : i + _KEY]), ()):
                if src < from_held:
                    continue
                n = _KEY
                while i + n < len(usable) and src + n < len(held) and usable[i + n] == held[src + n]:
                    n += 1
                if n > best:
                    best, at = n, src
            if best >= MIN_CHUNK:
                if i > gap:
                    compute.append((gap, i))
                moves.append((at, i, best))
                i = gap = i + best
                from_held = at + best
            else:
                i += 1
        compute.append((gap, len(prompt)))
    else:
        compute.append((common, len(prompt)))
    return ReusePlan(common, tuple(moves), tuple(compute))


class PromptCache:
    """One slot: a KV cache and the tokens whose keys/values it holds at positions 0..len-1."""

    def __init__(self, context_shift: bool = True) -> None:
        self.cache: KVCache | None = None
        self.tokens: list[int] = []
        self.context_shift = context_shift
        self.last_shift = 0  # tokens moved by the last reuse (0: none), for reports and tests

    def plan(self, prompt_ids: Sequence[int]) -> ReusePlan:
        return plan_reuse(self.tokens, prompt_ids, self.context_shift)

    def reuse(self, model: Llama, prompt_ids: Sequence[int], max_len: int) -> tuple[KVCache, ReusePlan]:
        """The cache to use, with every run the plan keeps moved into place, and the plan (what
        is left to compute). At least the last prompt token is always recomputed: its logits
        pick the first new token."""
        if self.cache is None or self.cache.max_len < max_len:
            self.cache, self.tokens = model.make_cache(1, max_len), []
        plan = self.plan(prompt_ids)
        self.last_shift = plan.moved
        if plan.moved:
            self.cache.move([m for m in plan.moves if m[0] != m[1]], model.layer_rotaries(), model.kernels)
        # until the gaps are computed, the cache holds the prompt only up to the first one
        self.tokens = list(prompt_ids[: plan.first_change])
        return self.cache, plan

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
        generations); None when all are busy. The slot that saves the most tokens, among those
        that count as this prompt's: it reuses at least half of the prompt (the same client whose
        prompt shrank - SillyTavern dropping its examples - or a request repeated after a reply
        longer than it) or at least half of what the slot holds (a growing chat). A shared BOS or
        first words alone do not hand one client's cache to another: then an unused slot, else the
        least recently used."""
        free = [i for i, s in enumerate(self.slots) if id(s) not in busy]
        if not free:
            return None
        reuse = {i: self.slots[i].plan(prompt_ids).reused for i in free}
        mine = [i for i in free
                if reuse[i] and (2 * reuse[i] >= len(prompt_ids) or 2 * reuse[i] >= len(self.slots[i].tokens))]
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
