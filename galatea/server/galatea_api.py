"""Galatea's own API, behind the web chat page: characters, chats and every chat operation, all
through the same chat store as the terminal (so both see the same chats). Generation goes
through the engine's queue; replies stream as SSE `data: {"text": ...}` events and end with a
`{"done": true, ...}` event carrying the status line."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from pydantic import Field

from galatea.chat.cards import load_character, placeholder_png, read_card
from galatea.chat.session import ChatSession
from galatea.chat.store import Store
from galatea.errors import GalateaError
from galatea.server.disconnect import watch
from galatea.server.engine import Engine
from galatea.server.schemas import RequestBody
from galatea.server.serving import BadRequest


class Text(RequestBody):
    text: str


class Step(RequestBody):
    step: int = Field(ge=-1000, le=1000)


class Settings(RequestBody):
    """A chat's sampling settings, as the page's panel and the terminal's /set change them."""

    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, ge=1, le=3)
    repetition_penalty_range: int | None = Field(default=None, ge=0, le=65536)
    dry_multiplier: float | None = Field(default=None, ge=0, le=5)
    xtc_probability: float | None = Field(default=None, ge=0, le=1)
    xtc_threshold: float | None = Field(default=None, ge=0, le=0.5)
    mirostat: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = Field(default=None, gt=0, le=20)
    dynatemp_range: float | None = Field(default=None, ge=0, le=5)
    smoothing_factor: float | None = Field(default=None, ge=0, le=10)


class Abort(RequestBody):
    chat_id: int | None = Field(default=None, ge=0, le=2**63 - 1)


BUSY_WAIT_S = 3.0
RowId = Annotated[int, PathParam(ge=0, le=2**63 - 1)]  # SQLite's integer range: larger ids cannot exist


def build_router(engine: Engine, store: Store) -> APIRouter:
    r = APIRouter(prefix="/galatea", tags=["Galatea"])
    # One reply at a time per chat; a request for a busy chat waits BUSY_WAIT_S at most, then
    # is told so, rather than holding a server thread until the reply ends (40 waiting requests
    # whose clients gave up once took every thread and stalled the whole server).
    chat_locks: dict[int, threading.Lock] = {}
    locks_guard = threading.Lock()
    generating: dict[int, threading.Event] = {}  # chat id -> its running generation's cancel

    def chat_lock(chat_id: int) -> threading.Lock:
        with locks_guard:
            return chat_locks.setdefault(chat_id, threading.Lock())

    if not store.characters():  # a first start: the bundled character, so the page has someone
        store.add_character(load_character(None))

    def session(chat_id: int) -> ChatSession:
        try:
            return ChatSession(store, engine.lm, chat_id, max_context=engine.context, generate=engine.generate_sync)
        except GalateaError as e:
            raise BadRequest(str(e), "not_found", 404) from None

    def messages(chat_id: int) -> list[dict[str, Any]]:
        return [{"id": m.id, "number": i, "is_user": m.is_user, "name": m.name, "text": m.text,
                 "swipe": m.active, "swipes": len(m.swipes)} for i, m in enumerate(store.messages(chat_id), 1)]

    def sse(make: Callable[[threading.Event], Iterator[str]], s: ChatSession, request: Request) -> StreamingResponse:
        """The reply as SSE. `cancel` is set when the client leaves (also while the request waits
        for a busy chat, or before its reply began: nothing is then written), on the page's Stop,
        or at the end."""

        def events(cancel: threading.Event) -> Iterator[str]:
            lock, waited = chat_lock(s.chat_id), 0.0
            while not lock.acquire(timeout=0.1):
                waited += 0.1
                if cancel.is_set():
                    return
                if waited >= BUSY_WAIT_S:
                    busy = "this chat is busy with another reply; wait for it or press Stop"
                    yield f"data: {json.dumps({'done': True, 'error': busy})}\n\n"
                    return
            generating[s.chat_id] = cancel
            try:
                if cancel.is_set():
                    return
                for text in make(cancel):
                    yield f"data: {json.dumps({'text': text}, ensure_ascii=False)}\n\n"
                last = s.last
                status = {} if last is None else {
                    "prompt_tokens": last.prompt_tokens, "reply_tokens": last.reply_tokens,
                    "tok_s": round(last.decode_tok_s, 1), "finish_reason": last.finish_reason}
                yield f"data: {json.dumps({'done': True, 'status': status})}\n\n"
            except GalateaError as e:
                yield f"data: {json.dumps({'done': True, 'error': str(e)})}\n\n"
            finally:
                cancel.set()
                if generating.get(s.chat_id) is cancel:
                    del generating[s.chat_id]
                lock.release()

        async def stream() -> AsyncIterator[str]:
            async with watch(request) as gone:
                it = events(gone)
                try:
                    while (event := await asyncio.to_thread(next, it, None)) is not None:
                        yield event
                finally:
                    gone.set()
                    await asyncio.to_thread(it.close)  # its `finally`: the chat's lock is released

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @r.get("/characters")
    def characters() -> list[dict]:
        out = []
        for cid, name in store.characters():
            char = store.character(cid)[1]
            out.append({"id": cid, "name": name, "description": char.description[:200],
                        "last_chat": store.last_chat(cid)})
        return out

    @r.post("/characters")
    async def import_character(request: Request) -> dict:
        data = await request.body()
        if not data:
            raise BadRequest("send the card file (JSON, PNG or YAML) as the request body")
        try:
            char = read_card(data, where="uploaded card")
        except GalateaError as e:
            raise BadRequest(str(e), "bad_card") from None
        return {"id": store.add_character(char), "name": char.name}

    @r.get("/characters/{character_id}/image")
    def image(character_id: RowId) -> Response:
        try:
            _, char = store.character(character_id)
        except GalateaError as e:
            raise BadRequest(str(e), "not_found", 404) from None
        return Response(char.image or placeholder_png(char.name), media_type="image/png")

    @r.get("/characters/{character_id}/chats")
    def chats(character_id: RowId) -> list[dict]:
        return [{"id": c.id, "title": c.title, "messages": c.messages, "updated_at": c.updated_at}
                for c in store.chats(character_id)]

    @r.post("/characters/{character_id}/chats")
    def new_chat(character_id: RowId) -> dict:
        try:
            return {"id": store.new_chat(character_id)}
        except GalateaError as e:
            raise BadRequest(str(e), "not_found", 404) from None

    @r.get("/chats/{chat_id}")
    def chat(chat_id: RowId) -> dict:
        s = session(chat_id)
        return {"id": chat_id, "title": s.info.title, "user": s.user, "character": {"id": s.character_id,
                "name": s.char.name}, "messages": messages(chat_id)}

    @r.post("/chats/{chat_id}/send")
    def send(chat_id: RowId, body: Text, request: Request) -> StreamingResponse:
        if not body.text.strip():
            raise BadRequest("the message is empty")
        s = session(chat_id)
        return sse(lambda c: s.send(body.text, c), s, request)

    @r.post("/chats/{chat_id}/regenerate")
    def regenerate(chat_id: RowId, request: Request) -> StreamingResponse:
        s = session(chat_id)
        return sse(s.regenerate, s, request)

    @r.post("/chats/{chat_id}/continue")
    def continue_(chat_id: RowId, request: Request) -> StreamingResponse:
        s = session(chat_id)
        return sse(s.continue_last, s, request)

    @r.get("/chats/{chat_id}/settings")
    def settings(chat_id: RowId) -> dict:
        """The settings a reply in this chat is generated with (defaults and the chat's own)."""
        return session(chat_id).settings

    @r.put("/chats/{chat_id}/settings")
    def set_settings(chat_id: RowId, body: Settings) -> dict:
        s = session(chat_id)
        changed = body.model_dump(exclude_none=True)
        store.set_settings(chat_id, {**s.info.settings, **changed})  # kept with the chat
        return session(chat_id).settings

    @r.get("/chats/{chat_id}/prompt")
    def prompt(chat_id: RowId) -> dict:
        p = session(chat_id).prompt()
        return {"prompt": p.text, "tokens": p.tokens, "messages_dropped": p.messages_dropped,
                "examples_dropped": p.examples_dropped}

    @r.post("/messages/{message_id}/swipe")
    def swipe(message_id: RowId, body: Step) -> dict:
        try:
            return {"swipe": store.swipe(message_id, body.step)}
        except GalateaError as e:
            raise BadRequest(str(e), "not_found", 404) from None

    @r.put("/messages/{message_id}")
    def edit(message_id: RowId, body: Text) -> dict:
        try:
            store.edit_message(message_id, body.text)
        except GalateaError as e:
            raise BadRequest(str(e), "not_found", 404) from None
        return {"ok": True}

    @r.delete("/messages/{message_id}")
    def delete(message_id: RowId) -> dict:
        store.delete_message(message_id)
        return {"ok": True}

    @r.post("/abort")
    def abort(body: Abort | None = None) -> dict:
        """Stop the page's generation in chat `chat_id` (every chat's without one). Never an API
        client's: those stop through their own routes."""
        chats = [body.chat_id] if body is not None and body.chat_id is not None else list(generating)
        stopped = [c for c in chats if (cancel := generating.get(c)) is not None and not cancel.is_set()]
        for c in stopped:
            generating[c].set()
        return {"stopped": bool(stopped)}

    return r
