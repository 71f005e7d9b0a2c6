"""Several models behind one server: each loaded on first use, kept while memory allows, the
least recently used idle one unloaded to make room (a reply that is running is never cut).

All models compute on one thread (`run()`, the server's main thread), one batched step of each
busy model in turn: the kernels' thread pool serves one caller at a time, and a model switch then
costs nothing but the step itself. Loading runs on a thread of its own, so the other models'
streams keep flowing while a new one is read (its progress is in `loading`).

A request holds a *lease* on the model it uses for as long as it runs (`acquire`/`release`,
the server releases when the response has been sent): a model with a lease or a job is never
unloaded. Memory is counted per model as what it holds (its weights' storage and the most its
prompt cache slots may take) against `budget` bytes.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galatea.errors import GalateaError, ModelNotFound, ModelUnavailable
from galatea.model.config import ModelConfig

LOAD_WAIT_S = 300.0  # how long a load waits for busy models to free the memory it needs
HOUSEKEEPING_S = 0.5  # how often an idle loop looks for models whose keep-alive ran out


@dataclass
class ModelEntry:
    """A model the server offers, known from its metadata alone (nothing loaded)."""

    name: str
    path: Path
    config: ModelConfig
    size: int  # bytes on disk
    modified: float  # the newest file's mtime
    _metadata: Any = field(default=False, repr=False)
    _types: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, path: Path, name: str | None = None) -> ModelEntry:
        from galatea.model.inspect import read_config

        files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
        return cls(name or (path.stem if path.is_file() else path.name), path, read_config(path),
                   sum(p.stat().st_size for p in files),
                   max((p.stat().st_mtime for p in files), default=0.0))

    @classmethod
    def found_in(cls, folder: Path) -> list[ModelEntry]:
        """Every model in `folder`: its GGUF files (not vocabulary-only ones, nor a vision model's
        projector) and its Hugging Face model folders (with a config.json), by name."""
        if not folder.is_dir():
            raise GalateaError(f"{folder}: no such folder; --models takes a folder of GGUF files and model folders")
        from galatea.model.gguf_file import GGUFFile

        entries = []
        for path in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if path.is_file() and path.suffix.lower() == ".gguf":
                try:
                    g = GGUFFile(path)
                except (GalateaError, OSError, ValueError):
                    continue  # not a GGUF after all; `galatea inspect` says why
                if not g.tensors or g.metadata.get("general.architecture") == "clip":
                    continue
            elif not (path.is_dir() and (path / "config.json").is_file()):
                continue
            try:
                entries.append(cls.of(path))
            except GalateaError:
                continue  # a family Galatea does not run; `galatea inspect` says why
        return entries

    def metadata(self) -> dict[str, Any] | None:
        """The GGUF file's metadata (None for a Hugging Face folder), read once."""
        self._read()
        return self._metadata

    def tensor_types(self) -> dict[str, int]:
        """The GGUF file's tensor types and how many of each ({} for a Hugging Face folder)."""
        self._read()
        return self._types

    def _read(self) -> None:
        if self._metadata is False:
            self._metadata, self._types = None, {}
            if self.path.is_file():
                from galatea.model.gguf_file import GGUFFile

                g = GGUFFile(self.path)
                self._metadata, self._types = g.metadata, g.tensor_types


@dataclass
class Loaded:
    engine: Any
    bytes: int  # what it holds: weights and the most its prompt cache may take
    leases: int = 0
    expires: float | None = None  # time.time() after which it is unloaded once idle; None: kept


def held_bytes(engine: Any) -> int:
    """A loaded model's memory: every distinct tensor storage of the model (the native kernels'
    tiles are buffers; a memory-mapped file counts once, whole), and its prompt cache slots at
    their most."""
    seen, total = set(), 0
    model = getattr(getattr(engine, "lm", None), "model", None)
    if model is not None:
        for t in [*model.parameters(), *model.buffers()]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total + getattr(engine, "cache_slots", 0) * getattr(engine, "slot_bytes", 0)


class Shelf:
    """The models a server offers (the first is the default), loaded within `budget` bytes.
    `load(entry, wake)` builds a model's engine (a Scheduler sharing the `wake` event)."""

    def __init__(self, entries: list[ModelEntry], load: Callable[[ModelEntry, threading.Event], Any] | None = None,
                 budget: int | None = None) -> None:
        if not entries:
            raise GalateaError("no models to serve; pass --model PATH or --models DIR")
        names = [e.name for e in entries]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise GalateaError(f"two models are named {twice!r}; give them different file or folder names")
        self.entries = {e.name: e for e in entries}
        self.default = entries[0].name
        self.budget = budget
        self.chat_format = "auto"  # the prompt format of chats that name none (`serve --format`)
        self.wake = threading.Event()
        self.loading: dict[str, float] = {}  # model -> seconds it has been loading (the page shows it)
        self._load = load
        self._loaded: dict[str, Loaded] = {}
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()  # guards _loaded, _futures and the leases
        self._load_lock = threading.Lock()  # one load at a time: each may have to make room
        self._closing = threading.Event()
        self._listeners: list[Callable[[Any], None]] = []  # told each job's closing chunk, every model
        self._running = False  # run() is the engine loop now
        self._collections: list[threading.Event] = []  # unloads waiting for the loop to collect

    @classmethod
    def single(cls, engine: Any) -> Shelf:
        """One model, already loaded (`galatea serve --model`, `--engine`, the tests)."""
        lm = engine.lm
        files = [lm.path] if lm.path.is_file() else [p for p in lm.path.iterdir() if p.is_file()]
        entry = ModelEntry(engine.name, lm.path, lm.config, sum(p.stat().st_size for p in files),
                           max((p.stat().st_mtime for p in files), default=0.0))
        shelf = cls([entry])
        shelf.chat_format = engine.chat_format
        shelf.put(entry.name, engine)
        return shelf

    def put(self, name: str, engine: Any) -> None:
        """A model loaded by the caller (the default, read before the server starts)."""
        self._ready(engine)
        with self._lock:
            self._loaded[name] = Loaded(engine, held_bytes(engine))

    def _ready(self, engine: Any) -> None:
        engine.chat_format = self.chat_format
        if hasattr(engine, "wake"):
            engine.wake = self.wake  # its jobs wake this loop
        engine.finished.extend(self._listeners)

    def listen(self, fn: Callable[[Any], None]) -> None:
        """`fn(last chunk)` when any model's job ends (the server's performance counters)."""
        self._listeners.append(fn)
        for engine in self.engines():
            engine.finished.append(fn)

    @property
    def queued(self) -> int:
        return sum(getattr(e, "queued", 0) for e in self.engines())

    # ---- what the routes ask -------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.entries)

    def resolve(self, asked: str | None) -> str:
        """The model a request means: the default when it names none or the server has only one
        (clients send whatever name they were set up with); else its name, `:latest` implied,
        any case."""
        if not asked or len(self.entries) == 1:
            return self.default
        want = asked.strip().lower().removesuffix(":latest")
        for name in self.entries:
            if name.lower() == want:
                return name
        raise ModelNotFound(f"model {asked!r} is not served here; this server has {', '.join(self.entries)}")

    def engine_if_loaded(self, name: str) -> Any | None:
        with self._lock:
            held = self._loaded.get(name)
            return held.engine if held is not None else None

    def loaded(self) -> list[tuple[str, Any, float | None]]:
        """(name, engine, expiry time or None) of each loaded model."""
        with self._lock:
            return [(n, h.engine, h.expires) for n, h in self._loaded.items()]

    def engines(self) -> list[Any]:
        with self._lock:
            return [h.engine for h in self._loaded.values()]

    def held(self) -> int:
        """Bytes the loaded models hold, together."""
        with self._lock:
            return sum(h.bytes for h in self._loaded.values())

    async def acquire(self, asked: str | None) -> tuple[Any, float, str]:
        """The engine of the model a request names, loading it if needed, with a lease the
        caller must `release`: (engine, seconds spent loading, its name)."""
        name = self.resolve(asked)
        started, waited = time.monotonic(), False
        while True:
            with self._lock:
                held = self._loaded.get(name)
                if held is not None:
                    held.leases += 1
                    return held.engine, time.monotonic() - started if waited else 0.0, name
                future = self._futures.get(name)
                if future is None:
                    future = self._futures[name] = Future()
                    threading.Thread(target=self._load_into, args=(name, future), name=f"galatea-load-{name}",
                                     daemon=True).start()
            waited = True
            await asyncio.wrap_future(future)  # raises what the load raised

    def release(self, name: str) -> None:
        with self._lock:
            held = self._loaded.get(name)
            if held is not None and held.leases > 0:
                held.leases -= 1

    def keep_alive(self, name: str, seconds: float | None) -> None:
        """Keep `name` loaded `seconds` after now (negative: for good; 0: unload once idle)."""
        if seconds is None:
            return
        with self._lock:
            held = self._loaded.get(name)
            if held is not None:
                held.expires = None if seconds < 0 else time.time() + seconds
        self.wake.set()

    async def unload(self, name: str) -> bool:
        """Unload `name` now if nothing uses it (Ollama's keep_alive 0); whether it was unloaded.
        A busy model goes once idle (its keep-alive ends now)."""
        if await asyncio.to_thread(self._unload_if_idle, name, 0):
            return True
        self.keep_alive(name, 0)
        return False

    # ---- loading and unloading -----------------------------------------------------------------

    def _load_into(self, name: str, future: Future) -> None:
        try:
            with self._load_lock:
                engine = self._load_now(name)
            with self._lock:
                self._loaded[name] = Loaded(engine, held_bytes(engine))
                self._futures.pop(name, None)
            self.wake.set()
            future.set_result(engine)
        except BaseException as e:  # the waiting requests get it; the server keeps running
            with self._lock:
                self._futures.pop(name, None)
            future.set_exception(e)
        finally:
            self.loading.pop(name, None)

    def _load_now(self, name: str) -> Any:
        if self._load is None:
            raise ModelUnavailable(f"{name} is not loaded and this server cannot load models on demand")
        entry = self.entries[name]
        need = entry.size
        if self.budget is not None and need > self.budget:
            raise GalateaError(f"{name} needs about {need / 2**30:.1f} GiB, more than --memory-budget "
                               f"{self.budget / 2**30:.1f} GiB; raise the budget")
        self._make_room(name, need)
        self.loading[name] = 0.0
        started = time.monotonic()
        ticker = threading.Thread(target=self._tick, args=(name, started), daemon=True)
        ticker.start()
        engine = self._load(entry, self.wake)
        self._ready(engine)
        return engine

    def _tick(self, name: str, started: float) -> None:
        while name in self.loading:
            self.loading[name] = round(time.monotonic() - started, 1)
            time.sleep(0.25)

    def _make_room(self, name: str, need: int) -> None:
        """Unload idle models, least recently used first, until `need` more bytes fit the budget;
        wait for busy ones to finish if that is not enough."""
        if self.budget is None:
            return
        deadline = time.monotonic() + LOAD_WAIT_S
        while self.held() + need > self.budget:
            with self._lock:
                idle = sorted(((h.engine.last_used if hasattr(h.engine, "last_used") else 0.0, n)
                               for n, h in self._loaded.items() if h.leases == 0 and not _busy(h.engine)))
            if idle:
                self._unload_if_idle(idle[0][1], 0)
                continue
            if time.monotonic() > deadline:
                raise ModelUnavailable(f"cannot load {name}: the memory budget is held by models that are busy; "
                                       "try again when their replies end, or raise --memory-budget")
            time.sleep(0.2)

    def _unload_if_idle(self, name: str, leases_allowed: int) -> bool:
        """Unload `name` if it has no job and at most `leases_allowed` leases (the asker's own)."""
        with self._lock:
            held = self._loaded.get(name)
            if held is None or held.leases > leases_allowed or _busy(held.engine):
                return False
            del self._loaded[name]
        held.engine.close()  # a late submit is refused (ModelUnavailable)
        del held
        self._collect()
        return True

    def _collect(self) -> None:
        """Give an unloaded model's memory back now: its modules hold reference cycles, which only
        a collection frees, and it must run where the engine loop holds no reference any more (the
        loop does it between turns, and this waits for it)."""
        if not self._running:
            gc.collect()
            return
        done = threading.Event()
        with self._lock:
            self._collections.append(done)
        self.wake.set()
        done.wait(10)

    def _due(self) -> list[str]:
        """Models whose keep-alive ran out."""
        now = time.time()
        with self._lock:
            return [n for n, h in self._loaded.items() if h.expires is not None and h.expires <= now]

    def _expire(self, due: list[str]) -> None:
        for name in due:
            self._unload_if_idle(name, 0)

    # ---- the engine thread ---------------------------------------------------------------------

    def _steppable(self) -> list[Any]:
        return [e for e in self.engines() if hasattr(e, "work")]

    def _turn(self) -> None:
        """One step of every loaded model (a function: no engine stays referenced between turns)."""
        for engine in self._steppable():
            engine.work(block=False)

    def run(self) -> None:
        """Every loaded model's steps, in turn, until close(); waits while all are idle."""
        self._running = True
        last_check = 0.0
        try:
            while not self._closing.is_set():
                if not any(e.busy for e in self._steppable()):
                    self.wake.wait(HOUSEKEEPING_S)
                    self.wake.clear()
                with self._lock:
                    collections, self._collections = self._collections, []
                if collections:
                    gc.collect()
                    for done in collections:
                        done.set()
                if time.monotonic() - last_check > HOUSEKEEPING_S:
                    last_check = time.monotonic()
                    if due := self._due():  # on a thread: an unload waits for this loop to collect
                        threading.Thread(target=self._expire, args=(due,), daemon=True).start()
                self._turn()
        finally:
            self._running = False
            for engine in self.engines():  # running replies end as cancelled, with their closing chunk
                engine.close()
                if hasattr(engine, "work"):
                    engine.work(block=False)

    def close(self) -> None:
        self._closing.set()
        self.wake.set()
        for engine in self.engines():
            if not hasattr(engine, "work"):  # a remote engine: nothing of it runs on our loop
                engine.close()


def _busy(engine: Any) -> bool:
    return bool(getattr(engine, "busy", False)) or bool(getattr(engine, "running", []))
