"""Turning a stream of token ids into a stream of text that is safe to show.

Two small state machines:
- `IncrementalDetokenizer` re-decodes a short window of tokens and emits only the new text,
  never half a UTF-8 character (a byte-fallback emoji arrives whole, and one cut off by the end
  of the reply is dropped rather than shown as U+FFFD) and never losing the
  leading space SentencePiece encodes in a token (`▁Hello` -> " Hello").
- `StopMatcher` holds back only the text that could still become a stop string, cuts the
  text at the first stop found, and hands the held text back when generation ends otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """`context` is the prompt's last token(s): decoding always starts from a token before the
    new ones, so the decoder never strips a new token's leading space as a text start."""

    def __init__(self, tokenizer: _Decoder, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context[-1:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this have been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        full = self.tokenizer.decode(self.ids[self.prefix :])
        if full.endswith(REPLACEMENT) or len(full) <= len(done):
            return ""  # an incomplete character (or nothing visible yet): wait for more bytes
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done) :]

    def flush(self) -> str:
        """Whatever is still pending at the end, less the bytes of a character the reply did not
        finish (cut by the token limit or a stop): they would show as U+FFFD, which the model
        never wrote. (A U+FFFD it did write is held the same way while it ends the text.)"""
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        end = len(self.ids)
        full = self.tokenizer.decode(self.ids[self.prefix : end])
        while end > self.read and full.endswith(REPLACEMENT):
            end -= 1
            full = self.tokenizer.decode(self.ids[self.prefix : end])
        self.prefix = self.read = len(self.ids)
        return full[len(done) :]


class StopMatcher:
    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was reached)."""
        buf = self.pending + text
        hit = min(((buf.find(s), s) for s in self.stops if s in buf), default=None,
                  key=lambda x: (x[0], -len(x[1])))
        if hit is not None:
            at, stop = hit
            self.pending, self.matched = "", stop
            return buf[: at + len(stop)] if self.include_stop else buf[:at], True
        hold = self._held_suffix(buf)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest end of `buf` that is the start of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


class PhraseGuard:
    """Banned phrases (KoboldCpp's "banned_tokens" strings, text-generation-webui's
    "banned_strings"; case-insensitive): holds back the text that could still become one, and
    reports where one appeared so that generation can rewind to it (see Generation.sample).

    It is fed one token's text at a time and holds back whole tokens: a token whose text may
    start a banned phrase is not shown in part, so undoing it never takes back shown text."""

    def __init__(self, phrases: Sequence[str]) -> None:
        self.phrases = [p for p in dict.fromkeys(phrases) if p]
        self.pattern = re.compile("|".join(re.escape(p) for p in self.phrases), re.IGNORECASE) \
            if self.phrases else None
        self.text = ""  # all the reply's text so far
        self.starts: list[int] = []  # where each token's text starts in `text`
        self.released = 0  # how much of it was passed on (always where a token starts, or the end)

    def feed(self, piece: str) -> tuple[str, int | None]:
        """One more token's text: (text safe to pass on now, the index of the token where a
        banned phrase starts, or None)."""
        self.starts.append(len(self.text))
        self.text += piece
        if self.pattern is None:
            return self.flush(), None
        hit = self.pattern.search(self.text, self.released)
        if hit is not None:
            return "", self.token_at(hit.start())
        hold = self._held_suffix(self.text[self.released :])
        end = len(self.text) if hold == 0 else self.starts[self.token_at(len(self.text) - hold)]
        out, self.released = self.text[self.released : end], max(end, self.released)
        return out, None

    def token_at(self, offset: int) -> int:
        """The token that wrote the character at `offset` (the first of the tokens whose bytes
        make that character, when one is split over several)."""
        k = max(i for i, start in enumerate(self.starts) if start <= offset)
        while k > 0 and self.starts[k - 1] == self.starts[k]:
            k -= 1
        return k

    @property
    def final(self) -> int:
        """How many tokens can no longer be undone (their text was all passed on)."""
        return sum(1 for i, start in enumerate(self.starts)
                   if (self.starts[i + 1] if i + 1 < len(self.starts) else len(self.text)) <= self.released
                   and start < self.released) if self.pattern is not None else len(self.starts)

    def rewind(self, tokens: int) -> None:
        """Keep only the first `tokens` tokens' text (never text already passed on)."""
        if tokens < len(self.starts):
            self.text = self.text[: max(self.starts[tokens], self.released)]
            del self.starts[tokens:]

    def flush(self) -> str:
        out, self.released = self.text[self.released :], len(self.text)
        return out

    def _held_suffix(self, buf: str) -> int:
        low = buf.lower()
        best = 0
        for p in self.phrases:
            head = p.lower()
            for n in range(min(len(head) - 1, len(low)), best, -1):
                if low.endswith(head[:n]):
                    best = n
                    break
        return best
