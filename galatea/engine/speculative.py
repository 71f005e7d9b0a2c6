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
    """How many tokens to draft next: more after drafts were accepted, fewer after they failed,
    none for a while after a run of failures (then one, to try again)."""

    def __init__(self, start: int = 4, most: int = MAX_DRAFT) -> None:
        self.k, self.most = start, most
        self.rest = 0  # steps left without drafting
        self.failures = 0

    def next(self) -> int:
        if self.rest > 0:
            self.rest -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k, self.failures = min(self.most, self.k * 2), 0
        elif accepted == 0:
            self.failures += 1
            self.k = max(1, self.k // 2)
            if self.failures >= 3:  # the text is not repeating itself now: stop paying for drafts
                self.rest, self.failures = 8, 0
        else:
            self.k, self.failures = max(1, accepted + 1), 0


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
    return int(torch.multinomial((rest / total).cpu(), 1, generator=rng)), False
