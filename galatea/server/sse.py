"""Server-sent events, as every dialect writes them: one line of JSON per `data:` field (KoboldAI
Lite parses events with a regex, `^event: (.*)\\ndata: (.*)\\n\\n`), an optional event name, and
the response headers that keep proxies from buffering the stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"  # OpenAI's end of stream


def event(data: Any, name: str | None = None) -> str:
    """`data` as one SSE event (JSON on one line; non-ASCII text kept as it is)."""
    line = json.dumps(data, ensure_ascii=False)
    return f"event: {name}\ndata: {line}\n\n" if name else f"data: {line}\n\n"


def response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "Connection": "keep-alive"})
