"""The model behind the server: one generation at a time, in arrival order, off the event loop.

Requests become jobs on a FIFO queue that one worker thread runs; each job streams its chunks
back to the request's event loop. A job can be cancelled (abort, client disconnect) and is
skipped if it was cancelled while waiting. This keeps the server responsive and never lets two
generations race on the model. Each job runs in the prompt cache slot that already holds most
of its prompt (prefix reuse, context shift), so alternating clients keep their caches.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from galatea.engine.generate import Chunk, stream_generate
from galatea.engine.prompt_cache import PromptCachePool
from galatea.engine.sampling import SamplingParams
from galatea.model.checkpoint import LoadedModel


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk | BaseException], None]  # hands a chunk (or the failure) to the requester
    genkey: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    text: str = ""  # what has been generated so far (for /api/extra/generate/check)


@dataclass
class Perf:
    last_process: float = 0.0  # seconds spent reading the last prompt
    last_eval: float = 0.0  # seconds per generated token, last generation
    last_token_count: int = 0
    last_input_count: int = 0
    last_cached_count: int = 0  # prompt tokens reused from the prompt cache
    last_shifted_count: int = 0  # of those, moved by a context shift
    last_seed: int = -1
    total_gens: int = 0
    stop_reason: int = -1  # KoboldCpp: 0 length, 1 EOS/stop string, 2 custom stopper (abort)
    started: float = field(default_factory=time.time)


class Engine:
    def __init__(self, lm: LoadedModel, max_context: int | None = None, name: str | None = None,
                 cache_slots: int = 4, cache_memory: int | None = None, context_shift: bool = True) -> None:
        self.lm = lm
        trained = lm.config.max_position_embeddings
        self.context = min(max_context or trained, trained)
        self.name = name or lm.path.stem
        self.perf = Perf()
        # Every client re-sending a growing prompt reuses its slot; slots are allocated on first
        # use, each a full-context KV cache, as many as `cache_memory` bytes allow.
        cfg = lm.config
        self.slot_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * self.context * cfg.head_dim * 4
        budget = cache_memory if cache_memory is not None else default_cache_memory()
        self.cache_slots = max(1, min(cache_slots, budget // self.slot_bytes))
        self.prompt_cache = PromptCachePool(self.cache_slots, context_shift)
        self.current: Job | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="galatea-engine", daemon=True)
        self._worker.start()

    # ---- called from request handlers ----------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.lm.tokenizer.encode(text, add_bos=add_bos)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, genkey: str = "",
                       cancel: threading.Event | None = None) -> AsyncIterator[Chunk]:
        """Chunks as the worker produces them; stopping iteration early cancels the job."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        job = self._submit(prompt_ids, params, lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
                           genkey, cancel)
        try:
            while True:
                chunk = _chunk_or_raise(await out.get())
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            job.cancel.set()  # no-op when finished; stops the work when the client went away

    def generate_sync(self, prompt_ids: Sequence[int], params: SamplingParams,
                      cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """The same, for code running in a thread (the chat sessions of the web page)."""
        out: queue.Queue = queue.Queue()
        job = self._submit(prompt_ids, params, out.put, "", cancel)
        try:
            while True:
                chunk = _chunk_or_raise(out.get())
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            job.cancel.set()

    def _submit(self, prompt_ids: Sequence[int], params: SamplingParams,
                emit: Callable[[Chunk | BaseException], None], genkey: str, cancel: threading.Event | None) -> Job:
        job = Job(list(prompt_ids), params, emit, genkey, cancel or threading.Event())
        self._jobs.put(job)
        return job

    def abort(self, genkey: str | None = None) -> bool:
        job = self.current
        if job is None or (genkey and job.genkey and genkey != job.genkey):
            return False
        job.cancel.set()
        return True

    def close(self) -> None:
        self._jobs.put(None)

    # ---- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                continue  # cancelled while queued
            self.current = job
            try:
                self._generate(job)
            except BaseException as e:  # handed to the request; never kills the worker
                job.emit(e)
            finally:
                self.current = None

    def _generate(self, job: Job) -> None:
        last = None
        slot = self.prompt_cache.acquire(job.prompt_ids)
        for chunk in stream_generate(self.lm.model, self.lm.tokenizer, job.prompt_ids, job.params, job.cancel,
                                     self.context, slot):
            job.text += chunk.text
            job.emit(chunk)
            last = chunk
        if last is not None:
            p = self.perf
            p.last_input_count, p.last_token_count = last.prompt_tokens, last.generated_tokens
            p.last_cached_count, p.last_shifted_count = last.cached_tokens, last.shifted_tokens
            read = last.prompt_tokens - last.cached_tokens
            p.last_process = read / last.prefill_tok_s if last.prefill_tok_s else 0.0
            p.last_eval = 1.0 / last.decode_tok_s if last.decode_tok_s else 0.0
            p.last_seed = last.seed if last.seed is not None else -1
            p.total_gens += 1
            p.stop_reason = {"length": 0, "stop": 1}.get(last.finish_reason or "", 2)


def default_cache_memory() -> int:
    """A quarter of the machine's memory for prompt cache slots."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _chunk_or_raise(item: Chunk | BaseException) -> Chunk:
    """The worker hands over either a chunk or the exception that ended the job."""
    if isinstance(item, BaseException):
        raise item
    return item
