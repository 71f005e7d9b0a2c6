"""Never re-read a prompt already read: a KV cache slot that remembers which tokens it holds.

A chat re-sends the whole conversation every turn; the new prompt usually starts with
everything the cache already holds. The cache is indexed by position, so reuse is just starting
the prefill at the first position that differs. One slot for now (a chat, or a server's last
client); several slots, eviction and context shift are the speed issue's next steps.
"""

from __future__ import annotations

from collections.abc import Sequence

from galatea.model.cache import KVCache
from galatea.model.llama import Llama


class PromptCache:
    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.tokens: list[int] = []  # token ids whose keys/values sit at positions 0..len-1

    def reuse(self, model: Llama, prompt_ids: Sequence[int], max_len: int) -> tuple[KVCache, int]:
        """The cache to use and how many leading prompt tokens it already holds. At least the
        last prompt token is always recomputed: its logits pick the first new token."""
        if self.cache is None or self.cache.max_len < max_len:
            self.cache, self.tokens = model.make_cache(1, max_len), []
        common = 0
        for held, new in zip(self.tokens, prompt_ids[:-1], strict=False):
            if held != new:
                break
            common += 1
        self.tokens = self.tokens[:common]
        return self.cache, common

    def holds(self, tokens: Sequence[int]) -> None:
        """Record what the cache holds after a generation (positions 0..len(tokens)-1)."""
        self.tokens = list(tokens)

    def clear(self) -> None:
        self.tokens = []
