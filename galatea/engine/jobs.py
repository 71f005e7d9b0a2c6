"""What the engines (the scheduler, a remote engine) share about their jobs.

Cancellation: a job is stopped by its own flag (an abort by key, the worker closing, the requester leaving the
stream) or by the caller's signal it watches (the client hung up, the page's Stop). Stopping a
job never sets the caller's signal: one request may run several jobs on one signal (`n` > 1),
and the second must not start already cancelled because the first ended.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any


class Cancellation:
    def __init__(self, watched: threading.Event | None = None) -> None:
        self._own = threading.Event()
        self._watched = watched

    def set(self) -> None:
        """Stop this job (only this one)."""
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._watched is not None and self._watched.is_set())


def find_kobold(running: Sequence[Any], key: str) -> Any:
    """The running Kobold job named `key`, or without a key the newest one (KoboldCpp's "last
    request"). Never a job of the chat page or of the OpenAI routes (`origin`): the Kobold routes
    answer any website, and those replies are not theirs to show."""
    kobold = [j for j in list(running) if j.origin == "kobold"]
    if not key:
        return kobold[-1] if kobold else None
    return next((j for j in kobold if j.key == key), None)
