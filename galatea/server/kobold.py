"""KoboldAI United + KoboldCpp routes (`/api/v1/...`, `/api/latest/...`, `/api/extra/...`).

We advertise KoboldCpp 1.76, and honour what clients send it: SSE streaming (>= 1.40), genkey
polling (>= 1.30), `memory` and `trim_stop` (>= 1.49), min_p (>= 1.48), Mirostat v1/v2, DRY
(>= 1.70), XTC (>= 1.74), dynamic temperature, smoothing factor, banned phrases
(`banned_tokens`/`banned_strings`) and `custom_token_bans`; `logprobs` too. Grammars, which
clients also gate on, are refused with a clear message rather than silently ignored. Its perf
figures are in KoboldCpp's units (milliseconds per token).

Stopping: a client that goes away cancels its generation (streaming or not, also while its
prompt is read); `/api/extra/abort` with a genkey stops that request, without one every running
API request (KoboldCpp's "stop the current generation"; never the chat page's), and answers
`done: "true"` only once they have really stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from galatea.server import serving, sse
from galatea.server.deps import Counters, Engine, served
from galatea.server.disconnect import watch
from galatea.server.responses import (
    KoboldAbort,
    KoboldGeneration,
    KoboldGenerations,
    KoboldPerf,
    KoboldResult,
    KoboldValue,
    KoboldVersion,
    TokenCount,
)
from galatea.server.schemas import KoboldGenerate, KoboldGenkey, KoboldTokenCount
from galatea.server.serving import error_body

KOBOLDCPP_VERSION = "1.76"
UNITED_VERSION = "1.2.5"


def sse_event(token: str, finish_reason: str | None) -> str:
    """Exactly `event: message\\ndata: <one-line JSON>\\n\\n` (KoboldAI Lite parses it with a regex)."""
    return sse.event({"token": token, "finish_reason": finish_reason or "null"}, "message")


def sse_error(message: str, kind: str = "server_error") -> str:
    """A failure after the stream began: an `error` event carrying both error shapes."""
    return sse.event(error_body("/api", message, kind), "error")


ABORT_WAIT_S = 15.0  # how long an abort waits for its generations to stop before answering


router = APIRouter(tags=["KoboldAI"])


def both(path: str, method: str = "GET", **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a route under /api/v1 and its /api/latest alias, each with its own operation id."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        for prefix in ("/api/v1", "/api/latest"):
            op = (prefix + path).strip("/").replace("/", "_")
            router.add_api_route(prefix + path, endpoint, methods=[method], operation_id=f"{method.lower()}_{op}",
                                 **kw)
        return endpoint
    return register


@both("/model")
def model(engine: Engine) -> KoboldResult:
    return KoboldResult(result=f"galatea/{engine.name}")


@both("/info/version")
def united_version() -> KoboldResult:
    return KoboldResult(result=UNITED_VERSION)


@both("/config/max_length")
def max_length(engine: Engine) -> KoboldValue:
    return KoboldValue(value=min(512, engine.context // 2))


@both("/config/max_context_length")
def max_context_length(engine: Engine) -> KoboldValue:
    return KoboldValue(value=engine.context)


@router.get("/api/extra/version")
def version(request: Request) -> KoboldVersion:
    # protected: Lite and SillyTavern ask for the key before generating (KoboldCpp's --password)
    return KoboldVersion(result="KoboldCpp", version=KOBOLDCPP_VERSION, protected=request.app.state.protected)


@router.get("/api/extra/true_max_context_length")
def true_max(engine: Engine) -> KoboldValue:
    return KoboldValue(value=engine.context)


@router.get("/api/extra/perf")
def perf_counters(request: Request, p: Counters) -> KoboldPerf:
    shelf = served(request)
    return KoboldPerf(last_process=round(p.last_process, 3), last_eval=round(p.last_eval, 3),
                      last_token_count=p.last_token_count, last_input_count=p.last_input_count,
                      last_cached_count=p.last_cached_count, last_shifted_count=p.last_shifted_count,
                      last_recomputed_count=p.last_recomputed_count, last_drafted_count=p.last_drafted_count,
                      last_accepted_count=p.last_accepted_count, last_seed=p.last_seed, total_gens=p.total_gens,
                      stop_reason=p.stop_reason, queue=shelf.queued,
                      idle=int(all(e.current is None for e in shelf.engines())),
                      uptime=round(time.time() - p.started, 1))


@both("/generate", "POST", response_model_exclude_none=True)
async def generate(req: KoboldGenerate, request: Request, engine: Engine) -> KoboldGenerations:
    results = []
    async with watch(request) as gone:
        for _ in range(req.n):
            ids = await asyncio.to_thread(serving.kobold_prompt, req, engine)  # off the event loop
            params = engine.check(req.to_sampling_params(engine, len(ids), serving.kobold_context(req, engine)))
            text, finish, logprobs = "", "stop", None
            async for chunk in engine.generate(ids, params, req.genkey, gone):
                text += chunk.text
                if chunk.finish_reason is not None:
                    finish = "length" if chunk.finish_reason == "length" else "stop"
                    if chunk.logprobs is not None:
                        logprobs = {"content": serving.logprobs_content(engine.tokenizer, ids[-1], chunk.logprobs)}
            results.append(KoboldGeneration(text=text, finish_reason=finish, logprobs=logprobs))
            if gone.is_set():
                break
    return KoboldGenerations(results=results)


@router.post("/api/extra/generate/stream")
async def stream(req: KoboldGenerate, request: Request, engine: Engine) -> StreamingResponse:
    ids = await asyncio.to_thread(serving.kobold_prompt, req, engine)  # a 10 MB prompt: seconds
    params = engine.check(req.to_sampling_params(engine, len(ids), serving.kobold_context(req, engine)))

    async def events() -> AsyncIterator[str]:
        try:
            async with watch(request) as gone:
                async for chunk in engine.generate(ids, params, req.genkey, gone):
                    if chunk.finish_reason is None:
                        if chunk.text:
                            yield sse_event(chunk.text, None)
                    else:
                        yield sse_event(chunk.text, "length" if chunk.finish_reason == "length" else "stop")
        except Exception as e:  # the status line is sent: say it in the stream, then end it
            yield sse_error(f"generation failed: {e}")

    return sse.response(events())


@router.get("/api/extra/generate/check", operation_id="get_api_extra_generate_check", response_model_exclude_none=True)
@router.post("/api/extra/generate/check", operation_id="post_api_extra_generate_check",
             response_model_exclude_none=True)
async def check(request: Request) -> KoboldGenerations:
    genkey = ""
    if request.method == "POST":
        try:
            genkey = KoboldGenkey.model_validate(await request.json()).genkey
        except ValueError:
            genkey = ""
    # every loaded model's jobs (a model is not loaded to be asked about)
    job = next((j for e in served(request).engines() if (j := e.find(genkey)) is not None), None)
    return KoboldGenerations(results=[KoboldGeneration(text=job.text if job is not None else "")])


@router.post("/api/extra/abort")
async def abort(request: Request) -> KoboldAbort:
    genkey = None
    try:
        genkey = KoboldGenkey.model_validate(await request.json()).genkey or None
    except ValueError:
        pass
    jobs = [j for e in served(request).engines() for j in e.abort(genkey)]
    ended = await asyncio.to_thread(lambda: all(j.ended.wait(ABORT_WAIT_S) for j in jobs))
    return KoboldAbort(success="true" if jobs else "false", done="true" if jobs and ended else "false")


@router.get("/api/extra/preloadstory")
def preloadstory() -> dict:
    return {}  # KoboldCpp without --preloadstory; Lite asks on connect


@router.get("/sdapi/v1/sd-models")
def sd_models() -> list:
    return []  # no image generation here; Lite asks on connect


@router.post("/api/extra/tokencount")
def tokencount(req: KoboldTokenCount, engine: Engine) -> TokenCount:
    ids = engine.tokenize(req.prompt)  # as the prompt will be read: BOS per the model
    return TokenCount(value=len(ids), ids=ids)
