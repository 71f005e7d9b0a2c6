"""The chat page's replies run on the server, whoever watches them.

A reply started from the page belongs to the server, not to the tab: it runs on a thread of its
own until it ends or the user presses Stop, and is stored when it ends. Closing the tab, a
reload or a dropped connection loses nothing; the chat reopened shows the reply, still streaming
if it is. Any number of viewers follow one reply: each first gets what was written so far (one
event), then every event as it comes.

Events: `{"progress": {"read": n, "total": m}}` while the prompt is read (long prompts only),
`{"text": delta}`, and a last `{"done": true, "status": {...}}` or `{"done": true, "error": msg}`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from galatea.errors import GalateaError

log = logging.getLogger("galatea.server")
Event = dict[str, Any]


class Busy(Exception):
    """The chat already has a reply running."""


class LiveReply:
    def __init__(self, chat_id: int, kind: str) -> None:
        self.chat_id, self.kind = chat_id, kind  # kind: "send", "regenerate" or "continue"
        self.cancel = threading.Event()  # the page's Stop, or the server shutting down
        self.text = ""
        self.reasoning = ""  # a reasoning model's thoughts so far (shown folded)
        self.progress: Event | None = None  # the last prompt-reading event, until text comes
        self.notice: Event | None = None  # why the finished reply is not stored yet (the store is down)
        self.final: Event | None = None
        self._followers: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        with self._lock:
            if "text" in event:
                self.text += event["text"]
                self.progress = None
            elif "progress" in event:
                self.progress = event
            elif "notice" in event:
                self.notice = event
            elif "reasoning" in event:
                self.reasoning += event["reasoning"]
            else:
                self.final = event
            followers = list(self._followers)
        for push in followers:
            push(event)

    async def follow(self) -> AsyncIterator[Event]:
        """What was written so far, then each event, up to and including the last."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()

        def push(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # that viewer's event loop is gone
                pass

        with self._lock:  # a snapshot and the subscription at once: no event is missed or doubled
            past = [e for e in ({"reasoning": self.reasoning} if self.reasoning else None,
                                {"text": self.text} if self.text else None, self.progress, self.notice, self.final)
                    if e]
            self._followers.append(push)
        try:
            for event in past:
                yield event
                if event.get("done"):
                    return
            while not (event := await inbox.get()).get("done"):
                yield event
            yield event
        finally:
            with self._lock:
                self._followers.remove(push)


class LiveReplies:
    """The page's running replies, one at most per chat. One per app (`create_app`)."""

    def __init__(self) -> None:
        self._live: dict[int, LiveReply] = {}
        self._threads: list[threading.Thread] = []
        self._guard = threading.Lock()

    def get(self, chat_id: int) -> LiveReply | None:
        with self._guard:
            return self._live.get(chat_id)

    def start(self, chat_id: int, kind: str, run: Callable[[LiveReply], Event]) -> LiveReply:
        """Run `run(reply)` on a thread of its own: it publishes the reply's text and returns
        the closing event. Raises Busy when the chat has a reply running."""
        with self._guard:
            if chat_id in self._live:
                raise Busy(chat_id)
            reply = self._live[chat_id] = LiveReply(chat_id, kind)
            thread = threading.Thread(target=self._run, args=(reply, run), name=f"galatea-reply-{chat_id}",
                                      daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return reply

    def _run(self, reply: LiveReply, run: Callable[[LiveReply], Event]) -> None:
        try:
            final = run(reply)
        except GalateaError as e:
            final = {"done": True, "error": str(e)}
        except Exception:
            log.exception("the reply in chat %d failed", reply.chat_id)
            final = {"done": True, "error": "the reply failed (see the server's log)"}
        with self._guard:  # the chat is free before anyone hears it is done: a send right after works
            del self._live[reply.chat_id]
        reply.publish(final)

    def stop(self, chat_id: int | None = None) -> bool:
        """Stop chat `chat_id`'s reply (every one without an id); whether one was running."""
        with self._guard:
            replies = [r for c, r in self._live.items() if chat_id is None or c == chat_id]
        stopped = [r for r in replies if not r.cancel.is_set()]
        for r in stopped:
            r.cancel.set()
        return bool(stopped)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every reply and wait for each to store what it wrote (server shutdown)."""
        self.stop()
        with self._guard:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
