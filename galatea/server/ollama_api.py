"""Ollama's API (`/api/generate`, `/api/chat`, `/api/tags`, `/api/show`, `/api/ps`,
`/api/version`), for the clients that speak only it: the `ollama` Python library, editor
assistants, desktop chat apps.

Replies stream as NDJSON (one object a line, `done: true` on the last, which carries Ollama's
counts and nanosecond durations), or come whole with `stream: false`. A chat is built in the
served model's format as on the OpenAI route (system messages are the persona); a reasoning
model's `<think>` block comes apart as `thinking`. `/api/generate` uses the same format unless
`raw` (the prompt as sent) or `template` (Ollama's Go template, see go_template.py), and returns
`context`, the token ids to send back for a next turn. Errors are Ollama's `{"error": "..."}`.
Embeddings and model management (pull, create, copy, delete) are refused in one line: Galatea
serves chat models, the files it was started with.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from galatea.chat import formats
from galatea.chat.reasoning import ThinkSplitter
from galatea.engine.generate import Chunk
from galatea.engine.sampling import SamplingParams
from galatea.engine.scheduler import DEFAULT_CONTEXT, Scheduler
from galatea.engine.shelf import Shelf, held_bytes
from galatea.errors import GalateaError
from galatea.server import go_template, ollama_models, serving
from galatea.server.deps import engine_for, served
from galatea.server.disconnect import watch
from galatea.server.ollama_schemas import OllamaChat, OllamaGenerate, OllamaMessage, OllamaModelRef, OllamaShow
from galatea.server.schemas import BadRequest

# What /api/version answers: clients gate on it (VS Code's provider needs >= 0.6.4; `think` and
# `/api/ps`'s context_length came with 0.9)
OLLAMA_VERSION = "0.9.0"
NDJSON = "application/x-ndjson"
FOREVER = "2318-01-01T00:00:00Z"  # expires_at of a model kept loaded for good (Ollama's keep_alive -1)

router = APIRouter(tags=["Ollama"])


@dataclass
class Prompt:
    """A request's prompt, ready to run."""

    ids: list[int]
    params: SamplingParams
    text: str = ""  # the prompt's text where we built it (a reasoning block may open in it)
    char: str = "Assistant"
    user: str = "You"
    templated: bool = True  # in the model's format: the reply is cleaned, a <think> block split off


@dataclass
class Reply:
    """What the stream has produced so far, and its totals at the end."""

    content: str = ""
    thinking: str = ""
    tokens: list[int] = field(default_factory=list)
    last: Chunk | None = None


def _nanos(seconds: float) -> int:
    return int(seconds * 1e9)


def _totals(prompt: Prompt, reply: Reply, started: float, load_s: float) -> dict[str, Any]:
    """Ollama's counts and nanosecond durations, from the closing chunk."""
    last = reply.last
    out: dict[str, Any] = {"total_duration": _nanos(time.perf_counter() - started), "load_duration": _nanos(load_s),
                           "prompt_eval_count": len(prompt.ids), "eval_count": 0}
    if last is not None:
        read = last.prompt_tokens - last.cached_tokens
        out["prompt_eval_duration"] = _nanos(read / last.prefill_tok_s) if last.prefill_tok_s else 0
        out["eval_count"] = last.generated_tokens
        out["eval_duration"] = _nanos(last.generated_tokens / last.decode_tok_s) if last.decode_tok_s else 0
    return out


def _done_reason(last: Chunk | None) -> str:
    return "length" if last is not None and last.finish_reason == "length" else "stop"


async def _pieces(engine: Scheduler, prompt: Prompt, request: Request, reply: Reply,
                  logprobs: bool) -> AsyncIterator[tuple[str, str, list | None]]:
    """(content, thinking, logprobs) as they become final; `reply` keeps the totals. A client that
    goes away stops the generation."""
    split = ThinkSplitter.for_prompt(prompt.text) if prompt.templated else None
    prev = prompt.ids[-1]
    first = True
    async with watch(request) as gone:
        async for chunk in engine.generate(prompt.ids, prompt.params, cancel=gone, origin="ollama"):
            if chunk.token is not None:
                reply.tokens.append(chunk.token)
            content, thought = split.feed(chunk.text) if split is not None else (chunk.text, "")
            if chunk.finish_reason is not None:
                reply.last = chunk
                if split is not None:
                    tail, more = split.flush()
                    content, thought = content + tail, thought + more
            if first and prompt.templated and content:
                content, first = content.lstrip(), False  # a persona reply starts with a space
            entries = None
            if logprobs and chunk.new_logprobs:
                entries = serving.logprobs_content(engine.tokenizer, prev, chunk.new_logprobs)
                prev = chunk.new_logprobs[-1].token
            reply.content += content
            reply.thinking += thought
            if content or thought or entries:
                yield content, thought, entries


def _ndjson(objects: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for obj in objects:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        except Exception as e:  # the status line is sent: say it as Ollama does, then end
            yield json.dumps({"error": f"generation failed: {e}"}) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


def _loaded(model: str, kind: str, unloaded: bool) -> dict[str, Any]:
    """The answer to a request with nothing to generate: Ollama loads (or, keep_alive 0, unloads)."""
    body: dict[str, Any] = {"model": model, "created_at": ollama_models.timestamp(), "done": True,
                            "done_reason": "unload" if unloaded else "load"}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return body


# ---- /api/generate ---------------------------------------------------------------------------

def _fit(ids: list[int], engine: Scheduler, context: int, reserve: int) -> list[int]:
    """A raw prompt's tail that leaves `reserve` tokens of room (BOS kept), as Ollama truncates."""
    keep = max(1, context - reserve)
    if len(ids) <= keep:
        return ids
    bos = ids[:1] if ids and ids[0] == engine.tokenizer.bos_id else []
    return bos + ids[len(ids) - keep + len(bos):]


def generate_prompt(req: OllamaGenerate, engine: Scheduler) -> Prompt:
    """The prompt of /api/generate: raw, in `template`, or in the served model's chat format."""
    context = req.options.context(engine)
    reserve = req.options.num_predict if req.options.num_predict > 0 else min(512, context // 4)
    previous = list(req.context or [])
    vocab = engine.lm.config.vocab_size
    if any(not 0 <= t < vocab for t in previous):
        raise BadRequest(f"context holds ids that are not tokens of this model (0..{vocab - 1}); send the context "
                         "this model returned")
    if req.raw or req.template is not None:
        if req.raw:
            text = serving._tail(req.prompt, context, engine.tokenizer)
        else:
            try:
                text = go_template.render(req.template or "", {"System": req.system or "", "Prompt": req.prompt})
            except GalateaError as e:
                raise BadRequest(str(e)) from None
        ids = engine.tokenize(text, add_bos=not previous and None)
        ids = _fit(previous + ids, engine, context, reserve)
        stops = [] if req.raw else list(formats.choose(engine.chat_format, engine.tokenizer).stops)
        params = req.options.to_sampling_params(len(ids), context, stops, req.logprob_count())
        return Prompt(ids, params, text=text, templated=not req.raw)
    messages = [OllamaMessage(role="system", content=req.system)] if req.system else []
    messages.append(OllamaMessage(role="user", content=req.prompt))
    return _chat(messages, engine, req, previous)


async def _generate(req: OllamaGenerate, request: Request, started: float) -> Any:
    engine, load_s = await engine_for(request, req.model)
    served(request).keep_alive(engine.name, req.keep_alive_s())
    prompt = await asyncio.to_thread(generate_prompt, req, engine)  # off the event loop
    engine.check(prompt.params)
    name = ollama_models.ollama_name(engine.name)
    reply = Reply()

    def closing() -> dict[str, Any]:
        body: dict[str, Any] = {"model": name, "created_at": ollama_models.timestamp(), "response": "",
                                "done": True, "done_reason": _done_reason(reply.last)}
        if not req.raw:  # Ollama returns no context for a raw prompt
            body["context"] = prompt.ids + reply.tokens
        return {**body, **_totals(prompt, reply, started, load_s)}

    if req.stream:
        async def objects() -> AsyncIterator[dict[str, Any]]:
            async for content, thought, entries in _pieces(engine, prompt, request, reply, req.logprobs):
                obj: dict[str, Any] = {"model": name, "created_at": ollama_models.timestamp(), "response": content,
                                       "done": False}
                if thought:
                    obj["thinking"] = thought
                if entries:
                    obj["logprobs"] = entries
                yield obj
            yield closing()

        return _ndjson(objects())
    entries_all: list = []
    async for _, _, entries in _pieces(engine, prompt, request, reply, req.logprobs):
        entries_all += entries or []
    body = closing()
    body["response"] = serving.chat_text(reply.content, prompt.char, prompt.user) if prompt.templated and \
        not req.template else reply.content
    if reply.thinking:
        body["thinking"] = reply.thinking
    if req.logprobs:
        body["logprobs"] = entries_all
    return body


@router.post("/api/generate")
async def generate(req: OllamaGenerate, request: Request) -> Any:
    started = time.perf_counter()
    req.refuse_unsupported()
    if not req.prompt and not req.context:
        return await _load_or_unload(req, request, "generate")
    return await _generate(req, request, started)


async def _load_or_unload(req: OllamaGenerate | OllamaChat, request: Request, kind: str) -> dict[str, Any]:
    """A request with nothing to generate loads its model, or with keep_alive 0 unloads it (the
    unload holds no reference to the model: its memory goes back before the answer)."""
    shelf = served(request)
    name = shelf.resolve(req.model)
    if req.keep_alive_s() == 0:
        await shelf.unload(name)
        return _loaded(ollama_models.ollama_name(name), kind, unloaded=True)
    await engine_for(request, name)
    shelf.keep_alive(name, req.keep_alive_s())
    return _loaded(ollama_models.ollama_name(name), kind, unloaded=False)


# ---- /api/chat -------------------------------------------------------------------------------

def _chat(messages: list[OllamaMessage], engine: Scheduler, req: OllamaGenerate | OllamaChat,
          previous: list[int] | None = None) -> Prompt:
    context = req.options.context(engine)
    reply = req.options.num_predict if req.options.num_predict > 0 else 512
    ids, char, user, format_stops = serving.chat_prompt(messages, engine, min(reply, context // 2),
                                                        thinking=req.thinking())
    text = engine.tokenizer.decode(ids)
    if previous:  # the new turn goes on after the context; a BOS the encoding added would not
        added_bos = engine.tokenizer.add_bos and ids and ids[0] == engine.tokenizer.bos_id
        ids = previous + (ids[1:] if added_bos else ids)
    names = [m.name for m in messages if m.name]
    params = req.options.to_sampling_params(len(ids), context, serving.chat_stops(char, user, names, format_stops),
                                            req.logprob_count())
    return Prompt(ids, params, text=text, char=char, user=user)


@router.post("/api/chat")
async def chat(req: OllamaChat, request: Request) -> Any:
    started = time.perf_counter()
    req.refuse_unsupported()
    if not req.messages:
        return await _load_or_unload(req, request, "chat")
    engine, load_s = await engine_for(request, req.model)
    name = ollama_models.ollama_name(engine.name)
    served(request).keep_alive(engine.name, req.keep_alive_s())
    prompt = await asyncio.to_thread(_chat, req.messages, engine, req)
    engine.check(prompt.params)
    reply = Reply()

    def closing(message: dict[str, Any]) -> dict[str, Any]:
        return {"model": name, "created_at": ollama_models.timestamp(), "message": message, "done": True,
                "done_reason": _done_reason(reply.last), **_totals(prompt, reply, started, load_s)}

    if req.stream:
        async def objects() -> AsyncIterator[dict[str, Any]]:
            async for content, thought, entries in _pieces(engine, prompt, request, reply, req.logprobs):
                message = {"role": "assistant", "content": content, **({"thinking": thought} if thought else {})}
                yield {"model": name, "created_at": ollama_models.timestamp(), "message": message, "done": False,
                       **({"logprobs": entries} if entries else {})}
            yield closing({"role": "assistant", "content": ""})

        return _ndjson(objects())
    entries_all: list = []
    async for _, _, entries in _pieces(engine, prompt, request, reply, req.logprobs):
        entries_all += entries or []
    message = {"role": "assistant", "content": serving.chat_text(reply.content, prompt.char, prompt.user),
               **({"thinking": reply.thinking} if reply.thinking else {})}
    return {**closing(message), **({"logprobs": entries_all} if req.logprobs else {})}


# ---- models ----------------------------------------------------------------------------------

def _entry(shelf: Shelf, name: str) -> dict[str, Any]:
    e = shelf.entries[name]
    return {"name": ollama_models.ollama_name(name), "model": ollama_models.ollama_name(name),
            "modified_at": ollama_models.timestamp(e.modified), "size": e.size,
            "digest": ollama_models.digest(e.path),
            "details": ollama_models.details(e.path, e.config, e.metadata(), e.tensor_types())}


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    shelf = served(request)
    return {"models": await asyncio.to_thread(lambda: [_entry(shelf, n) for n in shelf.names()])}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    shelf = served(request)

    def running() -> list[dict[str, Any]]:
        return [{**_entry(shelf, name), "size": held_bytes(engine), "size_vram": 0, "context_length": engine.context,
                 "expires_at": FOREVER if expires is None else ollama_models.timestamp(expires)}
                for name, engine, expires in shelf.loaded()]
    return {"models": await asyncio.to_thread(running)}


@router.post("/api/show")
async def show(req: OllamaShow, request: Request) -> dict[str, Any]:
    shelf = served(request)
    name = shelf.resolve(req.which())
    e = shelf.entries[name]
    engine = shelf.engine_if_loaded(name)
    tokenizer = engine.tokenizer if engine is not None else None
    context = engine.context if engine is not None else min(e.config.max_position_embeddings, DEFAULT_CONTEXT)
    fmt = formats.choose(shelf.chat_format, tokenizer) if tokenizer is not None else None
    if fmt is not None and fmt.kind == formats.TEMPLATE:
        template = tokenizer.chat_template or ""
    else:
        template = ollama_models.go_template(fmt) if fmt is not None else ""

    def facts() -> dict[str, Any]:
        return {"modelfile": f"# Modelfile of a model Galatea serves\nFROM {e.path}\n",
                "parameters": ollama_models.parameters(list(fmt.stops) if fmt is not None else []),
                "template": template,
                "details": ollama_models.details(e.path, e.config, e.metadata(), e.tensor_types()),
                "model_info": ollama_models.model_info(e.path, e.config, context, e.metadata(), req.verbose),
                "capabilities": ollama_models.capabilities(tokenizer, e.metadata()),
                "modified_at": ollama_models.timestamp(e.modified)}
    return await asyncio.to_thread(facts)


@router.get("/api/version")
def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION}


def _refusal(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=501)


# Ollama's routes Galatea does not offer answer 501 Not Implemented with a line saying why (a
# client that probes them gets a clear refusal, not a 404 that looks like a wrong URL); they are
# left out of the OpenAPI schema, which lists what the server does.
@router.post("/api/embed", include_in_schema=False)
@router.post("/api/embeddings", include_in_schema=False)
def embed(req: OllamaModelRef) -> JSONResponse:
    return _refusal("embeddings are not supported: Galatea serves chat models; use an embedding server for them")


@router.post("/api/pull", include_in_schema=False)
@router.post("/api/push", include_in_schema=False)
@router.post("/api/create", include_in_schema=False)
@router.post("/api/copy", include_in_schema=False)
@router.delete("/api/delete", include_in_schema=False)
def manage(req: OllamaModelRef) -> JSONResponse:
    return _refusal("Galatea serves the model files it was started with (galatea serve --model PATH or --models "
                    "DIR); it does not pull, push, create, copy or delete models")
