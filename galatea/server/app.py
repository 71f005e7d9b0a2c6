"""The server: `create_app(engine, store)` builds one FastAPI app serving every dialect.

- Kobold routes answer errors as KoboldAI does (`{"detail": {"msg", "type"}}`) and also as
  SillyTavern's readers look for them (`"error": {"message", "type"}`); OpenAI routes as OpenAI
  does (`{"error": {"message", "type", "code"}}`); no traceback ever reaches a client.
- `api_key` protects every route but `/health` (Bearer token, constant-time compare).
- CORS is open, as browser front ends (SillyTavern, KoboldAI Lite) need, on every response:
  errors, 401 and 500 included (the CORS layer is outermost), so a browser client shows our
  message rather than "failed to connect".
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from galatea import __version__
from galatea.chat.store import Store
from galatea.server import galatea_api, kobold, openai_api
from galatea.server.engine import Engine
from galatea.server.serving import BadRequest, error_body

MAX_BODY = 32 << 20  # KoboldCpp's payload limit
STATIC = Path(__file__).parent / "static"
log = logging.getLogger("galatea.server")


def _error(request: Request, status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, message, kind, code), status_code=status)


def _describe(errors: list[dict]) -> str:
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the body is not valid JSON"
    parts = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


class Guard:
    """Body size limit, API key, and the last word on failures: an exception no handler took
    becomes a 500 in the route's dialect (inside the CORS layer, unlike Starlette's own)."""

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY:
            await _error(request, 413, f"the request body is over {MAX_BODY >> 20} MB",
                         "payload_too_large")(scope, receive, send)
            return
        if self.api_key and request.method != "OPTIONS" and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("apikey", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await _error(request, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                             "unauthorized", "invalid_api_key")(scope, receive, send)
                return
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("request failed: %s %s", request.method, request.url.path)
            if started:  # the reply is under way: all we can do is end it
                return
            await _error(request, 500, f"internal error ({type(exc).__name__}); the server keeps running",
                         "server_error")(scope, receive, send)


class JSONBodies:
    """Read every POST body as JSON, whatever content type it claims: KoboldCpp does, and
    clients (curl -d, some front ends) send JSON as text/plain or form data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def create_app(engine: Engine, store: Store | None = None, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="Galatea", version=__version__,
                  description="KoboldAI, KoboldCpp and OpenAI-compatible APIs for persona chat models.")
    app.state.engine, app.state.store = engine, store
    # the last added runs first: CORS, then the guard, then JSON bodies
    app.add_middleware(JSONBodies)
    app.add_middleware(Guard, api_key=api_key)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status = 400 if not request.url.path.startswith("/api") else 422
        return _error(request, status, f"invalid request: {_describe(exc.errors())}", "invalid_request_error",
                      "invalid_request")

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(request, exc.status, str(exc), "invalid_request_error", exc.code)

    @app.get("/health", tags=["Galatea"])
    def health() -> dict:
        return {"status": "ok", "model": engine.name, "queue": engine.queued}

    app.include_router(kobold.build_router(engine))
    app.include_router(openai_api.build_router(engine))
    if store is not None:  # the chat page and its API work on the chat store
        app.include_router(galatea_api.build_router(engine, store))
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        def page() -> FileResponse:
            return FileResponse(STATIC / "index.html")

    return app
