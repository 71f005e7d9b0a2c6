"""Speculative decoding with drafts taken from the chat itself (prompt lookup).

Persona chat repeats itself: names, catchphrases, `*actions*`, phrases of the card and of the
history. `PromptLookup` drafts the next tokens by finding the most recent earlier occurrence of
the last n tokens (longest n first) and proposing what followed it. The model then computes all
of them in one pass (a decoding step of k+1 rows at consecutive positions), and `accept` keeps
each draft with exactly the probability plain sampling would have given it:

- greedy: a draft is kept when it is the argmax;
- sampling: a deterministic draft d is kept with probability p(d) (p: the sampler's final
  distribution at that position, penalties included); on rejection the token is drawn from p
  with d removed and renormalized. Summed over both branches each token has probability p(t),
  so the output is distributed exactly as plain sampling's (Leviathan et al. 2023, with a draft
  distribution that is a point mass).

`DraftLength` adapts how many tokens to draft from how many were accepted lately, so a chat
that does not repeat itself costs (almost) nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from galatea.engine.sampling import draw

MAX_DRAFT = 8
NGRAM_MAX, NGRAM_MIN = 4, 2  # a single shared token predicts too little to be worth a draft


class PromptLookup:
    """Drafts from earlier text: an index of every n-gram (NGRAM_MIN..NGRAM_MAX tokens) to the
    position right after its latest occurrence, grown as the tokens grow."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are indexed

    def _grow(self, tokens: Sequence[int], upto: int) -> None:
        """Index the n-grams that end before position `upto`."""
        for end in range(max(self.indexed, NGRAM_MIN), upto + 1):
            for n in range(NGRAM_MIN, min(NGRAM_MAX, end) + 1):
                self.index[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, upto + 1)

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest, most recent earlier match of the text's end."""
        if k <= 0 or len(tokens) < NGRAM_MIN + 1:
            return []
        self._grow(tokens, len(tokens) - 1)  # not the final n-grams themselves: they follow nothing yet
        for n in range(min(NGRAM_MAX, len(tokens) - 1), NGRAM_MIN - 1, -1):
            at = self.index.get(tuple(tokens[-n:]))
            if at is not None:
                return list(tokens[at : at + k])
        return []


class DraftLength:
    """How many tokens to draft: the k that maximizes the expected tokens a step yields per unit
    of its cost, (1 + a + a^2 + ... + a^k) / (1 + c k), where a is the rate at which drafts have
    been accepted (a moving average over the drafts whose fate was seen) and c what a row costs
    beside a step's first (measured by the fused step: ~0.25 for SmolLM2, whose weights sit in
    cache; ~0.1 for a 7B, which reads its weights once for all rows). None when no k pays; then,
    every PROBE_EVERY steps, one draft, to notice a chat that starts repeating itself."""

    PROBE_EVERY = 16

    def __init__(self, most: int = MAX_DRAFT, rate: float = 0.5) -> None:
        self.most, self.rate = most, rate
        self.idle = 0

    def next(self, cost: float) -> int:
        best, best_k, expected, p = 1.0, 0, 1.0, 1.0
        for k in range(1, self.most + 1):
            p *= self.rate
            expected += p
            value = expected / (1 + cost * k)
            if value > best:
                best, best_k = value, k
        if best_k:
            self.idle = 0
            return best_k
        self.idle += 1
        if self.idle >= self.PROBE_EVERY:
            self.idle = 0
            return 1
        return 0

    def update(self, drafted: int, accepted: int) -> None:
        """Drafts seen: each accepted one, and the first rejected (the later ones were never tried)."""
        outcomes = [1.0] * accepted + ([0.0] if accepted < drafted else [])
        for x in outcomes:
            self.rate = 0.85 * self.rate + 0.15 * x


def accept(processed: Tensor, draft: int, greedy: bool, rng: torch.Generator) -> tuple[int, bool]:
    """The token at a position where `draft` was proposed, and whether it is the draft.
    `processed`: the sampler's logits after its whole chain ([V]; -inf where banned)."""
    if greedy:
        best = int(torch.argmax(processed))
        return best, best == draft
    probs = torch.softmax(processed, dim=-1)
    if torch.rand(1, generator=rng).item() < probs[draft].item():
        return draft, True
    rest = probs.clone()
    rest[draft] = 0.0
    total = rest.sum()
    if total <= 0:  # the draft held all the mass (then it is always accepted above)
        return draft, True
    return draw(rest, rng), False
