"""Galatea's own API, behind the web chat page: characters, chats and every chat operation, all
through the same chat store as the terminal (so both see the same chats). Generation goes
through the engine's queue; a reply runs on the server whether or not its tab stays (live.py) and
streams as SSE `data: {"text": ...}` events (`{"progress": ...}` while a long prompt is read),
ending with a `{"done": true, ...}` event carrying the status line."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator

from galatea.chat import chatfiles, formats
from galatea.chat.session import ChatSession
from galatea.chat.settings import BUILTIN_PRESETS, ORDER_DEFAULT, SAMPLERS, resolve
from galatea.chat.store import Store
from galatea.engine.scheduler import Scheduler
from galatea.errors import GalateaError, StoreUnavailable
from galatea.model.inspect import FAMILY_NAMES
from galatea.server import sse
from galatea.server.deps import ChatStore, Engine, engine_for, served
from galatea.server.live import Busy, LiveReplies, LiveReply
from galatea.server.schemas import BadRequest, RequestBody, refused


class Text(RequestBody):
    text: str


class Title(RequestBody):
    title: str = Field(min_length=1, max_length=200, pattern=r"\S")


class At(RequestBody):
    message_id: int = Field(ge=0, le=2**63 - 1)


class Step(RequestBody):
    step: int = Field(ge=-1000, le=1000)


class Samplers(RequestBody):
    """Sampler numbers (a preset)."""

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
    typical_p: float | None = Field(default=None, ge=0, le=1)
    tfs: float | None = Field(default=None, ge=0, le=1)
    top_a: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty_slope: float | None = Field(default=None, ge=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    dry_base: float | None = Field(default=None, ge=1, le=4)
    dry_allowed_length: int | None = Field(default=None, ge=1, le=20)
    mirostat_eta: float | None = Field(default=None, gt=0, le=1)
    dynatemp_exponent: float | None = Field(default=None, gt=0, le=10)
    sampler_order: list[Annotated[int, Field(ge=0, le=6)]] | None = Field(default=None, min_length=1, max_length=7,
                                                                        description="KoboldAI sampler ids")

    @field_validator("sampler_order")
    @classmethod
    def _each_once(cls, order: list[int] | None) -> list[int] | None:
        if order is not None and len(set(order)) != len(order):
            raise ValueError("each sampler id at most once")
        return order


class Settings(Samplers):
    """A chat's settings (or every chat's defaults), as the page's panel and the terminal's /set
    change them; what is left out stays as it was."""

    max_context: int | None = Field(default=None, ge=0, le=1 << 20, description="0: the model's")
    recall_tokens: int | None = Field(default=None, ge=0, le=1 << 16,
                                      description="room for old messages recalled once out of the window (0: off)")
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(default=None, max_length=16)
    persona: str | None = Field(default=None, max_length=20000, description="who the user is")
    system_prompt: str | None = Field(default=None, max_length=20000, description="empty: the card's")
    user_name: str | None = Field(default=None, min_length=1, max_length=60, pattern=r"\S")
    format: str | None = Field(default=None, description="prompt format: auto, template or one of /galatea/formats")
    thinking: bool | None = Field(default=None, description="a reasoning model thinks before it replies (Qwen3)")
    model: str | None = Field(default=None, max_length=400, description="the model of this chat (empty: the "
                                                                       "server's default; /galatea/models)")

    @field_validator("format")
    @classmethod
    def known_format(cls, name: str | None) -> str | None:
        known = [formats.AUTO, formats.TEMPLATE, *formats.names()]
        if name is not None and name not in known:
            raise ValueError(f"not a prompt format; one of {', '.join(known)}")
        return name


class Abort(RequestBody):
    chat_id: int | None = Field(default=None, ge=0, le=2**63 - 1)


RowId = Annotated[int, PathParam(ge=0, le=2**63 - 1)]  # SQLite's integer range: larger ids cannot exist


def _replies(request: Request) -> LiveReplies:
    return request.app.state.replies


Replies = Annotated[LiveReplies, Depends(_replies)]
router = APIRouter(prefix="/galatea", tags=["Galatea"])


async def _chat_engine(request: Request, chat_id: RowId) -> Scheduler:
    """The model a chat uses: its settings' `model`, the server's default when it names none or
    one this server no longer offers (a chat is never locked out), loaded if it is not."""
    shelf = served(request)
    try:
        chosen = (await asyncio.to_thread(request.app.state.store.chat, chat_id)).settings.get("model")
    except StoreUnavailable:
        raise
    except GalateaError:
        chosen = None  # no such chat: the route says so
    return (await engine_for(request, chosen if chosen in shelf.entries else None))[0]


ChatEngine = Annotated[Scheduler, Depends(_chat_engine)]


def session(engine: Scheduler, store: Store, chat_id: int) -> ChatSession:
    try:
        return ChatSession(store, engine.lm, chat_id, max_context=engine.context, generate=engine.generate_sync,
                           default_format=engine.chat_format)
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None

def messages(store: Store, chat_id: int) -> list[dict[str, Any]]:
    return [{"id": m.id, "number": i, "is_user": m.is_user, "name": m.name, "text": m.text,
             "reasoning": m.swipes[m.active].extra.get("reasoning", ""), "swipe": m.active, "swipes": len(m.swipes),
             # when the shown text was written: its swipe's generation end, else the message's
             "time": m.swipes[m.active].gen_finished or m.created_at}
            for i, m in enumerate(store.messages(chat_id), 1)]

def start_reply(replies: LiveReplies, s: ChatSession, kind: str,
                make: Callable[[threading.Event], Iterator[str]]) -> StreamingResponse:
    """Start the reply on the server (it goes on if this client leaves) and stream it as SSE."""

    def run(reply: LiveReply) -> dict[str, Any]:
        s.progress = lambda read, total: reply.publish({"progress": {"read": read, "total": total}})
        s.notice = lambda text: reply.publish({"notice": text})
        s.thinking = lambda text: reply.publish({"reasoning": text})
        for text in make(reply.cancel):
            reply.publish({"text": text})
        last = s.last
        return {"done": True, "status": {} if last is None else {
            "prompt_tokens": last.prompt_tokens, "reply_tokens": last.reply_tokens,
            "tok_s": round(last.decode_tok_s, 1), "finish_reason": last.finish_reason}}

    try:
        reply = replies.start(s.chat_id, kind, run)
    except Busy:
        raise BadRequest("this chat is busy with another reply; wait for it or press Stop", "busy", 409) from None
    return follow(reply)

def follow(reply: LiveReply | None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        if reply is None:
            yield sse.event({"done": True, "status": {}})
            return
        async for event in reply.follow():
            yield sse.event(event)

    return sse.response(events())

@router.get("/characters/{character_id}/chats")
def chats(character_id: RowId, store: ChatStore) -> list[dict]:
    return [{"id": c.id, "title": c.title, "messages": c.messages, "updated_at": c.updated_at}
            for c in store.chats(character_id)]

@router.post("/characters/{character_id}/chats")
def new_chat(character_id: RowId, store: ChatStore) -> dict:
    try:
        return {"id": store.new_chat(character_id)}
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None

@router.post("/characters/{character_id}/chats/import")
async def import_chat(character_id: RowId, request: Request, store: ChatStore) -> dict:
    """A SillyTavern .jsonl or text-generation-webui .json chat as the body, kept with its dates.
    `warning` when the file's chat is with someone else than this character."""
    try:
        text = (await request.body()).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("not a chat file (binary data, e.g. a PNG card); chats are SillyTavern .jsonl or "
                         "text-generation-webui .json files") from None

    def add() -> dict:  # parsing and thousands of inserts off the event loop
        try:
            _, char = store.character(character_id)
            chat_id = chatfiles.import_chat(store, text, character_id, where="uploaded chat")
        except GalateaError as e:
            raise refused(e, "bad_chat") from None
        said = chatfiles.character_name(text)
        warning = None if said is None or said.strip().lower() == char.name.strip().lower() else \
            f"this chat was with {said!r}, not {char.name!r}; it was imported for {char.name} anyway"
        return {"id": chat_id, "messages": len(store.messages(chat_id)), "warning": warning}

    return await asyncio.to_thread(add)

@router.get("/search")
def search(store: ChatStore, q: Annotated[str, Query(min_length=1, max_length=200)],
           character_id: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None) -> list[dict]:
    """Messages containing `q` (any swipe, case-insensitive), newest chats first."""
    titles = {c.id: c.title for c in store.chats(character_id)}
    return [{"chat_id": chat, "title": titles.get(chat, ""), "number": position + 1,
             "text": _snippet(text, q)} for chat, position, text in store.search(q, character_id)]

def _snippet(text: str, q: str, width: int = 60) -> str:
    at = max(text.lower().find(q.lower()), 0)
    start = max(at - width, 0)
    return ("…" if start else "") + text[start:at + len(q) + width] + ("…" if at + len(q) + width < len(text) else "")

@router.get("/chats/{chat_id}")
def chat(chat_id: RowId, engine: ChatEngine, store: ChatStore, replies: Replies) -> dict:
    s = session(engine, store, chat_id)
    running = replies.get(chat_id)
    return {"id": chat_id, "title": s.info.title, "user": s.user, "character": {"id": s.character_id,
            "name": s.char.name}, "messages": messages(store, chat_id),
            "live": None if running is None else {"kind": running.kind}}

@router.post("/chats/{chat_id}/send")
def send(chat_id: RowId, body: Text, engine: ChatEngine, store: ChatStore, replies: Replies) -> StreamingResponse:
    if not body.text.strip():
        raise BadRequest("the message is empty")
    s = session(engine, store, chat_id)
    return start_reply(replies, s, "send", lambda cancel: s.send(body.text, cancel))

@router.post("/chats/{chat_id}/regenerate")
def regenerate(chat_id: RowId, engine: ChatEngine, store: ChatStore, replies: Replies) -> StreamingResponse:
    s = session(engine, store, chat_id)
    return start_reply(replies, s, "regenerate", s.regenerate)

@router.post("/chats/{chat_id}/continue")
def continue_(chat_id: RowId, engine: ChatEngine, store: ChatStore, replies: Replies) -> StreamingResponse:
    s = session(engine, store, chat_id)
    return start_reply(replies, s, "continue", s.continue_last)

@router.get("/chats/{chat_id}/live")
def live(chat_id: RowId, replies: Replies) -> StreamingResponse:
    """The chat's running reply from its start (a reopened chat); just the end when none runs."""
    return follow(replies.get(chat_id))

@router.put("/chats/{chat_id}")
def rename_chat(chat_id: RowId, body: Title, store: ChatStore) -> dict:
    try:
        store.rename_chat(chat_id, body.title.strip())
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None
    return {"id": chat_id, "title": body.title.strip()}

@router.delete("/chats/{chat_id}")
def delete_chat(chat_id: RowId, store: ChatStore, replies: Replies) -> dict:
    if replies.get(chat_id) is not None:
        raise BadRequest("this chat has a reply running; press Stop first", "busy", 409)
    store.delete_chat(chat_id)
    return {"ok": True}

@router.post("/chats/{chat_id}/branch")
def branch(chat_id: RowId, body: At, store: ChatStore) -> dict:
    """A new chat with this one's messages up to and including `message_id`."""
    try:
        return {"id": store.branch(chat_id, body.message_id)}
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None

@router.get("/chats/{chat_id}/settings")
def settings(chat_id: RowId, engine: ChatEngine, store: ChatStore) -> dict:
    """The settings a reply in this chat is generated with (defaults and the chat's own)."""
    s = session(engine, store, chat_id)
    return {**s.settings, "model": s.info.settings.get("model", ""), "user_name": s.user,
            "model_context": s.model_context}

@router.put("/chats/{chat_id}/settings")
def set_settings(chat_id: RowId, body: Settings, request: Request, engine: ChatEngine, store: ChatStore) -> dict:
    s = session(engine, store, chat_id)
    changed = body.model_dump(exclude_none=True)
    if (name := changed.pop("user_name", None)) is not None:
        store.rename_user(chat_id, name.strip())
    stored = {**s.info.settings, **changed}
    shelf = served(request)
    if changed.get("model") == "":
        stored.pop("model", None)  # the server's default again
    elif "model" in changed and changed["model"] not in shelf.entries:
        raise BadRequest(f"{changed['model']!r} is not a model this server serves; one of {', '.join(shelf.entries)}")
    store.set_settings(chat_id, stored)  # kept with the chat
    return settings(chat_id, engine, store)

@router.get("/models")
def models(request: Request) -> dict:
    """The models this server offers (a chat picks one in its settings), which are loaded, and
    for how many seconds one has been loading."""
    shelf = served(request)
    loaded = {name for name, _, _ in shelf.loaded()}
    return {"default": shelf.default,
            "models": [{"name": n, "loaded": n in loaded, "loading": shelf.loading.get(n), "size": e.size,
                        "family": FAMILY_NAMES.get(e.config.architecture, e.config.architecture)}
                       for n, e in shelf.entries.items()]}

@router.get("/formats")
def prompt_formats(engine: Engine) -> dict:
    """The prompt formats a chat may use, and which one "auto" means for the served model."""
    auto = formats.choose(engine.chat_format, engine.tokenizer)
    listed = [{"name": formats.AUTO, "title": "auto"}]
    if engine.tokenizer.chat_template:
        listed.append({"name": formats.TEMPLATE, "title": "The model's chat template"})
    listed += [{"name": n, "title": formats.named(n).title} for n in formats.names()]
    return {"formats": listed, "auto": auto.title or auto.name}


@router.get("/settings")
def default_settings(store: ChatStore) -> dict:
    """What every chat starts from (a chat's own settings override them)."""
    return resolve(store.default_settings())[0]

@router.put("/settings")
def set_default_settings(body: Settings, store: ChatStore) -> dict:
    changed = body.model_dump(exclude_none=True, exclude={"user_name", "model"})  # a model is a chat's own
    store.set_default_settings({**store.default_settings(), **changed})
    return default_settings(store)

@router.get("/presets")
def presets(store: ChatStore) -> list[dict]:
    """Named sampler presets: the built-in ones, then the user's."""
    return [*({"name": n, "settings": p, "builtin": True} for n, p in BUILTIN_PRESETS.items()),
            *({"name": n, "settings": p, "builtin": False} for n, p in store.presets().items())]

@router.put("/presets/{name}")
def save_preset(name: Annotated[str, PathParam(min_length=1, max_length=80, pattern=r"\S")], body: Samplers,
                store: ChatStore) -> dict:
    if name in BUILTIN_PRESETS:
        raise BadRequest(f"{name!r} is a built-in preset; save yours under another name")
    given = {k: v for k, v in body.model_dump(exclude_none=True).items() if k in SAMPLERS or k == "sampler_order"}
    store.save_preset(name, {**SAMPLERS, "sampler_order": ORDER_DEFAULT, **given})  # the samplers only
    return {"name": name}

@router.delete("/presets/{name}")
def delete_preset(name: Annotated[str, PathParam(min_length=1, max_length=80)], store: ChatStore) -> dict:
    try:
        store.delete_preset(name)
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None
    return {"ok": True}

@router.get("/chats/{chat_id}/prompt")
def prompt(chat_id: RowId, engine: ChatEngine, store: ChatStore) -> dict:
    s = session(engine, store, chat_id)
    p = s.prompt()
    return {"prompt": p.text, "tokens": p.tokens, "messages_dropped": p.messages_dropped,
            "examples_dropped": p.examples_dropped, "format": p.format,
            "recalled": [{"number": n, "matched": words} for n, words in s.recalled(p)]}

@router.post("/messages/{message_id}/swipe")
def swipe(message_id: RowId, body: Step, store: ChatStore) -> dict:
    try:
        return {"swipe": store.swipe(message_id, body.step)}
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None

@router.put("/messages/{message_id}")
def edit(message_id: RowId, body: Text, store: ChatStore) -> dict:
    try:
        store.edit_message(message_id, body.text)
    except GalateaError as e:
        raise refused(e, "not_found", 404) from None
    return {"ok": True}

@router.delete("/messages/{message_id}")
def delete(message_id: RowId, store: ChatStore) -> dict:
    store.delete_message(message_id)
    return {"ok": True}

@router.post("/abort")
def abort(replies: Replies, body: Abort | None = None) -> dict:
    """Stop the page's reply in chat `chat_id` (every chat's without one). Never an API
    client's: those stop through their own routes."""
    return {"stopped": replies.stop(None if body is None else body.chat_id)}
