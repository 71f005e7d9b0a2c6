"""What a route gets from the app it runs in (`create_app` puts them on `app.state`), as FastAPI
dependencies: the routers are plain module-level objects, and the app carries the objects.

Models come from the app's shelf (engine/shelf.py): `Engine` is the default model (the Kobold
routes and the page's own API use it), `engine_for` the one a request names (OpenAI's and
Ollama's `model`). Either takes a lease on the model for the request's lifetime, which the
`Leases` middleware gives back once the response has been sent (streams included), so that a
model is never unloaded under a request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from galatea.chat.store import Store
from galatea.engine.scheduler import Scheduler
from galatea.engine.shelf import Shelf
from galatea.server.perf import Perf

LEASES = "galatea.leases"  # the scope key of the models a request holds


def served(request: Request) -> Shelf:
    return request.app.state.shelf


async def engine_for(request: Request, name: str | None) -> tuple[Any, float]:
    """The engine of the model `name` (None: the default), loaded if it is not, held for this
    request: (engine, seconds spent waiting for it to load)."""
    engine, load_s, resolved = await served(request).acquire(name)
    request.scope.setdefault(LEASES, []).append(resolved)
    return engine, load_s


async def _engine(request: Request) -> Scheduler:
    return (await engine_for(request, None))[0]


def _perf(request: Request) -> Perf:
    return request.app.state.perf


def _store(request: Request) -> Store:
    return request.app.state.store


class Leases:
    """Gives back the models a request held once its response is complete."""

    def __init__(self, app: ASGIApp, shelf: Shelf) -> None:
        self.app, self.shelf = app, shelf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[str] = []
        scope[LEASES] = held  # later middlewares copy the scope; the list stays the same object
        try:
            await self.app(scope, receive, send)
        finally:
            for name in held:
                self.shelf.release(name)


Engine = Annotated[Scheduler, Depends(_engine)]
Counters = Annotated[Perf, Depends(_perf)]
ChatStore = Annotated[Store, Depends(_store)]
