"""A request's generation stops when its client goes away, on every route.

A streaming response notices a hang-up when a write fails or the server reports it; a request
that answers only at the end writes nothing until then, so without a watcher its generation
would run to the end for nobody (and the next request would wait behind it). `watch` listens on
the request's ASGI channel for `http.disconnect` while the handler runs and sets the cancel
event the engine checks between steps and between prompt chunks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import Request


@asynccontextmanager
async def watch(request: Request) -> AsyncIterator[threading.Event]:
    """A cancel event that is set when the client disconnects, until the block ends."""
    cancel = threading.Event()

    async def listen() -> None:
        while True:
            message = await request.receive()  # the body was read: what comes next is the hang-up
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    task = asyncio.create_task(listen())
    try:
        yield cancel
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
