"""What a route gets from the app it runs in (`create_app` puts them on `app.state`), as FastAPI
dependencies: the routers are plain module-level objects, and the app carries the objects."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from galatea.chat.store import Store
from galatea.engine.scheduler import Scheduler
from galatea.server.perf import Perf


def _engine(request: Request) -> Scheduler:
    return request.app.state.engine


def _perf(request: Request) -> Perf:
    return request.app.state.perf


def _store(request: Request) -> Store:
    return request.app.state.store


Engine = Annotated[Scheduler, Depends(_engine)]
Counters = Annotated[Perf, Depends(_perf)]
ChatStore = Annotated[Store, Depends(_store)]
