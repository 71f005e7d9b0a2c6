"""The server: `create_app(engine, store)` builds one FastAPI app serving every dialect.

- Kobold routes answer errors as KoboldAI does (`{"detail": {"msg", "type"}}`) and also as
  SillyTavern's readers look for them (`"error": {"message", "type"}`); OpenAI routes as OpenAI
  does (`{"error": {"message", "type", "code"}}`); no traceback ever reaches a client.
- guard.py: the host, origin, size and key checks every request passes, and the 500 of last
  resort. CORS is open on the KoboldAI and OpenAI APIs, as browser front ends (SillyTavern,
  KoboldAI Lite) need, on every response: errors, 401 and 500 included (the CORS layer is
  outermost), so a browser client shows our message rather than "failed to connect". The chat
  page's own API is same-origin only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from galatea import __version__
from galatea.chat.cards import load_character
from galatea.chat.store import Store
from galatea.engine.scheduler import Scheduler
from galatea.engine.shelf import Shelf
from galatea.errors import GalateaError, ModelNotFound, ModelUnavailable, StoreUnavailable
from galatea.server import galatea_api, kobold, library_api, ollama_api, openai_api
from galatea.server.deps import Leases
from galatea.server.guard import Guard, OpenCORS
from galatea.server.live import LiveReplies
from galatea.server.perf import Perf
from galatea.server.schemas import BadRequest
from galatea.server.serving import OLLAMA_ROUTES, error_body

STATIC = Path(__file__).parent / "static"


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


def create_app(models: Scheduler | Any, store: Store | None = None, api_key: str | None = None,
               hosts: frozenset[str] | None = None) -> FastAPI:
    """`models`: a Shelf of models, or one engine. `hosts`: the host names requests may be
    addressed to (`galatea serve` on a loopback address: the loopback names; None: any)."""
    shelf = models if isinstance(models, Shelf) else Shelf.single(models)
    app = FastAPI(title="Galatea", version=__version__,
                  description="KoboldAI, KoboldCpp, OpenAI and Ollama-compatible APIs for persona chat models.")
    app.state.shelf, app.state.store = shelf, store
    app.state.protected = bool(api_key)  # generation needs the key (guard.py); /api/extra/version says so
    # the last added runs first: leases, CORS (the APIs'), then the guard, then JSON bodies
    app.add_middleware(JSONBodies)
    app.add_middleware(Guard, api_key=api_key, hosts=hosts)
    app.add_middleware(OpenCORS)
    app.add_middleware(Leases, shelf=shelf)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        status = 422 if path.startswith("/api") and path not in OLLAMA_ROUTES else 400  # KoboldAI's 422
        return _error(request, status, f"invalid request: {_describe(exc.errors())}", "invalid_request_error",
                      "invalid_request")

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(request, exc.status, str(exc), "invalid_request_error", exc.code)

    @app.exception_handler(GalateaError)
    async def refused(request: Request, exc: GalateaError) -> JSONResponse:
        # what the engine cannot do for this request (a remote engine without a sampler it asks for)
        return _error(request, 400, str(exc), "invalid_request_error", "unsupported")

    @app.exception_handler(StoreUnavailable)
    async def unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return _error(request, 503, str(exc), "server_error", "store_unavailable")

    @app.exception_handler(ModelUnavailable)
    async def busy(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return _error(request, 503, str(exc), "server_error", "model_unavailable")

    @app.exception_handler(ModelNotFound)
    async def unknown_model(request: Request, exc: ModelNotFound) -> JSONResponse:
        return _error(request, 404, str(exc), "invalid_request_error", "model_not_found")

    @app.get("/health", tags=["Galatea"])
    def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "model": shelf.default, "queue": shelf.queued}
        if len(shelf.entries) > 1:
            body["models"] = {name: "loaded" for name, _, _ in shelf.loaded()} | \
                {name: "loading" for name in shelf.loading}
        if store is not None:
            try:
                store.ping()
                body["store"] = "ok"
            except StoreUnavailable as e:  # a load balancer takes this replica out until it heals
                return JSONResponse({**body, "status": "unavailable", "store": str(e)}, status_code=503)
        return JSONResponse(body)

    app.state.perf, app.state.replies = Perf(), LiveReplies()
    shelf.listen(app.state.perf.record)
    app.include_router(kobold.router)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    if store is not None:  # the chat page and its API work on the chat store
        store.add_first_character(load_character(None))  # a first start: the page has someone to talk to
        app.include_router(galatea_api.router)
        app.include_router(library_api.router)
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        def page() -> FileResponse:
            return FileResponse(STATIC / "index.html")

    return app
