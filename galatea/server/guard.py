"""What every request passes before a route: the host it was sent to, where it came from, its
size, the API key, and the last word on failures.

- **Host** (DNS rebinding): served on a loopback address, the server answers only requests
  addressed to a loopback name; a page on `attacker.example` that re-points its name to
  127.0.0.1 is refused, as Jupyter refuses it.
- **The chat page's own API** (`/galatea/...`) is same-origin only: no CORS headers, and a
  cross-site write (a form or `text/plain` POST from another site needs no preflight) is
  refused. The KoboldAI and OpenAI APIs keep open CORS: their browser clients (KoboldAI Lite)
  call them from their own origin.
- **Size**: bodies over MAX_BODY are refused whatever the transfer encoding (chunked included).
- **Key**: with `--api-key`, every route needs it, as `Authorization: Bearer`, an `apikey`
  header, or (the page's API only) the `galatea_key` cookie the page sets when it asks for the
  key - but `/health`, the page's shell and, as KoboldCpp keeps them, the routes a client reads to
  connect (versions, model, context sizes: `OPEN_ROUTES`), so that KoboldAI Lite and SillyTavern
  can see `protected: true` and ask for the key instead of failing to connect.
- **Failures**: an exception no handler took becomes a 500 in the route's dialect.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import unquote, urlsplit

from fastapi import Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from galatea.server.serving import error_body

MAX_BODY = 32 << 20  # KoboldCpp's payload limit
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
# what a keyed server still answers without the key (GET): what clients read to connect
OPEN_ROUTES = frozenset({
    "/health", "/api/extra/version", "/api/extra/true_max_context_length", "/api/extra/preloadstory",
    "/sdapi/v1/sd-models", "/v1/models", "/api/version", "/api/tags",
    *(f"/api/{v}/{route}" for v in ("v1", "latest")
      for route in ("model", "info/version", "config/max_length", "config/max_context_length")),
})
log = logging.getLogger("galatea.server")


def is_page(path: str) -> bool:
    """The chat page and its own API (same-origin only)."""
    return path == "/" or path.startswith(("/galatea", "/static"))


def _error(path: str, status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, message, kind, code), status_code=status)


class BodyTooLarge(Exception):
    pass


class OpenCORS:
    """CORS open to every origin on the APIs, absent on the chat page's own routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_page(scope["path"]):
            await self.app(scope, receive, send)
        else:
            await self.cors(scope, receive, send)


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None = None, hosts: frozenset[str] | None = None) -> None:
        """`hosts`: the host names requests may be addressed to (None: any)."""
        self.app, self.api_key, self.hosts = app, api_key, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        started, received, too_large = False, 0, False

        async def counted() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:  # a chunked body has no Content-Length to check first
                    too_large = True
                    raise BodyTooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if too_large:  # the route's answer to a body cut short is replaced by the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        path = request.url.path
        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            pass
        except Exception as exc:
            log.exception("request failed: %s %s", request.method, path)
            if not started:  # once the reply is under way all we can do is end it
                await _error(path, 500, f"internal error ({type(exc).__name__}); the server keeps running",
                             "server_error")(scope, receive, send)
        if too_large and not started:
            await _error(path, 413, f"the request body is over {MAX_BODY >> 20} MB",
                         "payload_too_large")(scope, receive, send)

    def _refusal(self, request: Request) -> JSONResponse | None:
        path, headers = request.url.path, request.headers
        if self.hosts is not None:
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
            if host not in self.hosts:
                return _error(path, 403, f"this server does not answer to the host name {host!r}; "
                              "open it by its loopback address (http://127.0.0.1:PORT)", "forbidden")
        if is_page(path) and request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            cross = headers.get("sec-fetch-site") == "cross-site" or \
                (origin is not None and urlsplit(origin).netloc != headers.get("host"))
            if cross:
                return _error(path, 403, "the chat page's API answers only the page itself (a cross-site "
                              "request was refused)", "forbidden")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY:
            return _error(path, 413, f"the request body is over {MAX_BODY >> 20} MB", "payload_too_large")
        open_route = request.method in ("GET", "HEAD") and (path in OPEN_ROUTES or path.startswith("/v1/models/"))
        if self.api_key and request.method != "OPTIONS" and not open_route and \
                not (path == "/" or path.startswith("/static")):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("apikey", "")
            if not token and path.startswith("/galatea"):
                token = unquote(request.cookies.get("galatea_key", ""))
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return _error(path, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                              "unauthorized", "invalid_api_key")
        return None
