"""OpenAI-compatible routes, with the extra sampler fields text-generation-webui and aphrodite
accept, and the token endpoints SillyTavern calls for those back ends."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from galatea.engine.generate import Chunk
from galatea.model.tokenizer import Tokenizer
from galatea.server import serving
from galatea.server.disconnect import watch
from galatea.server.engine import Engine
from galatea.server.schemas import ChatCompletionRequest, CompletionRequest, EncodeRequest


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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


def build_router(engine: Engine) -> APIRouter:
    r = APIRouter(tags=["OpenAI"])

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": int(engine.perf.started), "owned_by": "galatea"}

    @r.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @r.get("/v1/models/{model_id}")
    def model(model_id: str) -> dict:
        return model_card()

    async def generations(ids: list[int], req: CompletionRequest, request: Request, stops: list[str] | None = None,
                          default_max: int = 512) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) for each of `n`; a client that goes away stops them (see
        disconnect.py)."""
        async with watch(request) as gone:
            for index in range(req.n):
                params = serving.completion_params(req, engine, len(ids), default_max, stops)
                async for chunk in engine.generate(ids, params, cancel=gone):
                    yield index, chunk
                if gone.is_set():
                    return

    async def failing_safely(events: AsyncIterator[str]) -> AsyncIterator[str]:
        """A failure after the stream began: an error event (`error.message`, which SillyTavern
        and the openai client read), then the end of the stream."""
        try:
            async for event in events:
                yield event
        except Exception as e:
            yield _sse(serving.error_body("/v1", f"generation failed: {e}", "server_error"))
            yield "data: [DONE]\n\n"

    def finish(reason: str | None) -> str:
        return "length" if reason == "length" else "stop"

    async def collect(ids: list[int], req: CompletionRequest, request: Request,
                      stops: list[str] | None = None) -> tuple[list[str], list[str], int, list[Any]]:
        """All `n` generations whole: (texts, finish reasons, completion tokens in all, each one's
        token log probabilities or None)."""
        texts, reasons, used, logprobs = [""] * req.n, ["stop"] * req.n, 0, [None] * req.n
        async for index, chunk in generations(ids, req, request, stops):
            texts[index] += chunk.text
            if chunk.finish_reason is not None:
                reasons[index], used = finish(chunk.finish_reason), used + chunk.generated_tokens
                logprobs[index] = chunk.logprobs
        return texts, reasons, used, logprobs

    @r.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        ids = await asyncio.to_thread(serving.completion_prompt, req, engine)  # off the event loop
        serving.completion_params(req, engine, len(ids))  # refuse an over-long prompt before streaming
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            async def events() -> AsyncIterator[str]:
                streamed = StreamedLogprobs(engine.tokenizer, ids[-1])
                async for index, chunk in generations(ids, req, request):
                    text, reason = chunk.text, chunk.finish_reason
                    logprobs = streamed.legacy(index, chunk)
                    if text or reason is not None or logprobs:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                 "finish_reason": None if reason is None else finish(reason)}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(failing_safely(events()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts, reasons, used, logprobs = await collect(ids, req, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"index": i, "text": t, "finish_reason": reasons[i],
                             "logprobs": None if logprobs[i] is None else
                             serving.logprobs_legacy(engine.tokenizer, ids[-1], logprobs[i])}
                            for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}

    @r.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        ids, char, user = await asyncio.to_thread(serving.chat_prompt, req, engine)
        stops = serving.chat_stops(char, user, req)
        serving.completion_params(req, engine, len(ids), 512, stops)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            async def events() -> AsyncIterator[str]:
                started: set[int] = set()
                streamed = StreamedLogprobs(engine.tokenizer, ids[-1])
                async for index, chunk in generations(ids, req, request, stops):
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
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": engine.name,
                                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": None if reason is None else finish(reason)}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(failing_safely(events()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts, reasons, used, logprobs = await collect(ids, req, request, stops)
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": serving.chat_text(t, char, user)},
                             "finish_reason": reasons[i],
                             "logprobs": None if logprobs[i] is None else
                             {"content": serving.logprobs_content(engine.tokenizer, ids[-1], logprobs[i])}}
                            for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}

    # ---- token endpoints SillyTavern uses (text-generation-webui, llama.cpp, vLLM, aphrodite) ----

    @r.post("/v1/internal/encode")
    def encode(req: EncodeRequest) -> dict:
        ids = engine.tokenize(req.value())
        return {"tokens": ids, "length": len(ids)}

    @r.post("/v1/internal/token-count")
    def token_count(req: EncodeRequest) -> dict:
        return {"length": len(engine.tokenize(req.value()))}

    @r.get("/v1/internal/model/info")
    def model_info() -> dict:
        return {"model_name": engine.name, "lora_names": [engine.lm.lora_name] if engine.lm.lora_name else [],
                "loader": "galatea"}

    @r.post("/tokenize")
    def tokenize_llamacpp(req: EncodeRequest) -> dict:
        ids = engine.tokenize(req.value())
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context}

    @r.post("/v1/tokenize")
    def tokenize_aphrodite(req: EncodeRequest) -> dict:
        ids = engine.tokenize(req.value())
        return {"tokens": ids, "count": len(ids), "value": len(ids), "ids": ids, "max_model_len": engine.context}

    return r
