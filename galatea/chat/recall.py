"""Recall: old messages of a chat brought back when the newest message asks about them.

Once a chat outgrows the window its oldest messages are gone from the prompt. The store's full-text
index (SQLite FTS5 with the Porter stemmer, PostgreSQL's `english` text search) ranks every
message of the chat against the newest user message's words; the prompt places the best ones that
fell out of the window, within a token budget, as a "Past events:" block after the scenario
(SillyTavern's vector storage uses the same heading). This module turns a message into the words
to search for, and says which of them a recalled message matched (shown by /prompt and the page).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

# Words too common to say what a message is about (a search for them would match every message).
STOP_WORDS = frozenset("""
a about after again all also am an and any are as at be because been before being but by can could
did do does doing don for from had has have having he her here hers him his how i if in into is it
its just me more most my no nor not now of off on once only or other our out over own same she
should so some such than that the their them then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your yours
tell know think really like want please yes okay oh well
""".split())
MAX_TERMS = 16


class _Searchable(Protocol):
    def recall(self, chat_id: int, terms: list[str], limit: int = 20) -> list[int]: ...


def asked(messages: Sequence[Any], new_message: str | None) -> str:
    """What recall searches for: the new message, else the chat's newest user message."""
    return new_message if new_message is not None else next((m.text for m in reversed(messages) if m.is_user), "")


def memories(store: _Searchable, chat_id: int, messages: Sequence[Any], terms: list[str]) -> list[int]:
    """Indices into `messages` (Message objects with .id) that the store's index ranks for
    `terms`, best first (the `memories` build_prompt takes)."""
    if not terms:
        return []
    index = {m.id: i for i, m in enumerate(messages)}
    return [index[i] for i in store.recall(chat_id, terms) if i in index]


def query_terms(text: str) -> list[str]:
    """The words of `text` worth searching for: lower case, three letters or more, no stop
    words, each once, at most MAX_TERMS."""
    words = [w for w in re.findall(r"\w+", text.lower()) if len(w) >= 3 and w not in STOP_WORDS and not w.isdigit()]
    return list(dict.fromkeys(words))[:MAX_TERMS]


def matched(terms: list[str], text: str) -> list[str]:
    """Which of `terms` a message shares, word for word or by a common stem (keeps, keeping:
    keep), roughly what the databases' stemmers matched: the 'why' of a recalled message."""
    stems = {_stem(w) for w in re.findall(r"\w+", text.lower())}
    return [t for t in terms if _stem(t) in stems]


def _stem(word: str) -> str:
    """A crude English stem: one common inflection removed, at least three letters kept."""
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word
