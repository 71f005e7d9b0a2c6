"""OpenAI-compatible routes, with the extra sampler fields text-generation-webui and aphrodite
accept, and the token endpoints SillyTavern calls for those back ends."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from galatea.engine.generate import Chunk
from galatea.engine.sampling import SamplingParams
from galatea.engine.scheduler import Scheduler
from galatea.engine.shelf import Shelf
from galatea.model.tokenizer import Tokenizer
from galatea.server import serving, sse
from galatea.server.deps import Engine, engine_for, served
from galatea.server.disconnect import watch
from galatea.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    Encoded,
    ModelCard,
    ModelList,
    Usage,
    WebuiModelInfo,
)
from galatea.server.schemas import ChatCompletionRequest, CompletionRequest, EncodeRequest


class StreamedLogprobs:
    """Per choice of a stream: the token before the next entries and the text offset so far,
    so that each chunk carries the log probabilities of the tokens that became final with it."""

    def __init__(self, tokenizer: Tokenizer, prompt_last: int) -> None:
        self.tokenizer, self.prompt_last = tokenizer, prompt_last
        self.prev: dict[int, int] = {}
        self.offset: dict[int, int] = {}

    def _take(self, index: int, chunk: Chunk) -> tuple[int, list] | None:
        if not chunk.new_logprobs:
            return None
        prev = self.prev.get(index, self.prompt_last)
        self.prev[index] = chunk.new_logprobs[-1].token
        return prev, chunk.new_logprobs

    def legacy(self, index: int, chunk: Chunk) -> dict | None:
        taken = self._take(index, chunk)
        if taken is None:
            return None
        out = serving.logprobs_legacy(self.tokenizer, taken[0], taken[1], self.offset.get(index, 0))
        self.offset[index] = self.offset.get(index, 0) + sum(len(t) for t in out["tokens"])
        return out

    def content(self, index: int, chunk: Chunk) -> dict | None:
        taken = self._take(index, chunk)
        return None if taken is None else {"content": serving.logprobs_content(self.tokenizer, *taken)}


router = APIRouter(tags=["OpenAI"])


def model_card(shelf: Shelf, name: str) -> ModelCard:
    return ModelCard(id=name, created=int(shelf.entries[name].modified))


@router.get("/v1/models")
def models(request: Request) -> ModelList:
    """Every model served, the default first (SillyTavern shows `data[0]`)."""
    shelf = served(request)
    return ModelList(data=[model_card(shelf, name) for name in shelf.names()])


@router.get("/v1/models/{model_id:path}")
def model(model_id: str, request: Request) -> ModelCard:
    shelf = served(request)
    return model_card(shelf, shelf.resolve(model_id))


async def generations(engine: Scheduler, ids: list[int], params: SamplingParams, n: int,
                      request: Request) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) for each of `n`, all with the request's one set of parameters; a
    client that goes away stops them (see disconnect.py)."""
    async with watch(request) as gone:
        for index in range(n):
            # a seeded request gives n different choices, the same n each time
            choice = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + index) % 2**64)
            async for chunk in engine.generate(ids, choice, cancel=gone, origin="openai"):
                yield index, chunk
            if gone.is_set():
                return


async def failing_safely(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A failure after the stream began: an error event (`error.message`, which SillyTavern and
    the openai client read), then the end of the stream."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        yield sse.event(serving.error_body("/v1", f"generation failed: {e}", "server_error"))
        yield sse.DONE


def finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def collect(engine: Scheduler, ids: list[int], params: SamplingParams, n: int,
                  request: Request) -> tuple[list[str], list[str], Usage, list[Any]]:
    """All `n` generations whole: (texts, finish reasons, token usage, each one's token log
    probabilities or None)."""
    texts, reasons, used, logprobs = [""] * n, ["stop"] * n, 0, [None] * n
    async for index, chunk in generations(engine, ids, params, n, request):
        texts[index] += chunk.text
        if chunk.finish_reason is not None:
            reasons[index], used = finish(chunk.finish_reason), used + chunk.generated_tokens
            logprobs[index] = chunk.logprobs
    return texts, reasons, Usage(prompt_tokens=len(ids), completion_tokens=used, total_tokens=len(ids) + used), \
        logprobs


@router.post("/v1/completions", response_model=Completion)
async def completions(req: CompletionRequest, request: Request) -> Any:
    engine, _ = await engine_for(request, req.model)
    ids = await asyncio.to_thread(serving.completion_prompt, req, engine)  # off the event loop
    params = engine.check(req.to_sampling_params(engine, len(ids)))  # refuses an over-long prompt before streaming
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        async def events() -> AsyncIterator[str]:
            streamed = StreamedLogprobs(engine.tokenizer, ids[-1])
            async for index, chunk in generations(engine, ids, params, req.n, request):
                text, reason = chunk.text, chunk.finish_reason
                logprobs = streamed.legacy(index, chunk)
                if text or reason is not None or logprobs:
                    yield sse.event({"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                                     "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                  "finish_reason": None if reason is None else finish(reason)}]})
            yield sse.DONE

        return sse.response(failing_safely(events()))
    texts, reasons, usage, logprobs = await collect(engine, ids, params, req.n, request)
    return Completion(id=rid, created=created, model=engine.name, usage=usage, choices=[
        CompletionChoice(index=i, text=t, finish_reason=reasons[i],
                         logprobs=None if logprobs[i] is None else
                         serving.logprobs_legacy(engine.tokenizer, ids[-1], logprobs[i]))
        for i, t in enumerate(texts)])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat(req: ChatCompletionRequest, request: Request) -> Any:
    engine, _ = await engine_for(request, req.model)
    reply = req.max_tokens or req.max_completion_tokens or req.max_new_tokens or 512
    thinking = (req.chat_template_kwargs or {}).get("enable_thinking")
    ids, char, user, format_stops = await asyncio.to_thread(
        serving.chat_prompt, req.messages, engine, reply, req.character, req.user_name,
        None if thinking is None else bool(thinking))
    names = [m.name for m in req.messages if m.name]
    params = engine.check(req.to_sampling_params(engine, len(ids), 512,
                                                 serving.chat_stops(char, user, names, format_stops)))
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            streamed = StreamedLogprobs(engine.tokenizer, ids[-1])
            async for index, chunk in generations(engine, ids, params, req.n, request):
                text, reason = chunk.text, chunk.finish_reason
                logprobs = streamed.content(index, chunk)
                delta: dict[str, Any] = {}
                if index not in started:
                    started.add(index)
                    delta["role"] = "assistant"
                    text = text.lstrip()  # the Pygmalion reply starts with a space
                if text:
                    delta["content"] = text
                if delta or reason is not None or logprobs:
                    yield sse.event({"id": rid, "object": "chat.completion.chunk", "created": created,
                                     "model": engine.name,
                                     "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": None if reason is None else finish(reason)}]})
            yield sse.DONE

        return sse.response(failing_safely(events()))
    texts, reasons, usage, logprobs = await collect(engine, ids, params, req.n, request)
    return ChatCompletion(id=rid, created=created, model=engine.name, usage=usage, choices=[
        ChatChoice(index=i, message=AssistantMessage(content=serving.chat_text(t, char, user)),
                   finish_reason=reasons[i],
                   logprobs=None if logprobs[i] is None else
                   {"content": serving.logprobs_content(engine.tokenizer, ids[-1], logprobs[i])})
        for i, t in enumerate(texts)])


# ---- token endpoints SillyTavern uses (text-generation-webui, llama.cpp, vLLM, aphrodite) ------

@router.post("/v1/internal/encode", response_model_exclude_none=True)
def encode(req: EncodeRequest, engine: Engine) -> Encoded:
    ids = engine.tokenize(req.value())
    return Encoded(tokens=ids, length=len(ids))


@router.post("/v1/internal/token-count", response_model_exclude_none=True)
def token_count(req: EncodeRequest, engine: Engine) -> Encoded:
    return Encoded(length=len(engine.tokenize(req.value())))


@router.get("/v1/internal/model/info")
def model_info(engine: Engine) -> WebuiModelInfo:
    return WebuiModelInfo(model_name=engine.name, loader="galatea",
                          lora_names=[engine.lm.lora_name] if engine.lm.lora_name else [])


@router.post("/tokenize", response_model_exclude_none=True)
def tokenize_llamacpp(req: EncodeRequest, engine: Engine) -> Encoded:
    ids = engine.tokenize(req.value())
    return Encoded(tokens=ids, count=len(ids), max_model_len=engine.context)


@router.post("/v1/tokenize", response_model_exclude_none=True)
def tokenize_aphrodite(req: EncodeRequest, engine: Engine) -> Encoded:
    ids = engine.tokenize(req.value())
    return Encoded(tokens=ids, count=len(ids), value=len(ids), ids=ids, max_model_len=engine.context)
