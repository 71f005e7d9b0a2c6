"""The model behind the server: many requests at once, batched, off the event loop.

Requests become jobs on a queue. One worker thread runs continuous batching: it admits up to
`max_batch` jobs, reads each new prompt in chunks between decoding steps (so streams already
running keep going), and advances every running generation by one token per step with a single
batched forward pass (`Llama.decode_batch`: the weight-bound projections run once for all rows,
each row attends to its own cache). Sampling, stop strings and streaming stay per request; a
job can be cancelled (abort, client disconnect) without disturbing the others.

Each job runs in the prompt cache slot that already holds most of its prompt (prefix reuse,
context shift), so alternating clients keep their caches.
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

from galatea.engine.generate import Chunk, Generation
from galatea.engine.jobs import Cancellation, find_kobold
from galatea.engine.prompt_cache import PromptCachePool
from galatea.engine.sampling import SamplingParams
from galatea.errors import ModelUnavailable
from galatea.model.checkpoint import LoadedModel

# Rows a batched step may grow to with drafts: one pass of the AVX-512 kernel over each weight
# tile serves 8 rows, at 1.3x the cost of one (7B Q4_0 from memory); a second pass, for rows
# 9-16, is compute and costs 2.7x in all. Drafts only fill the first.
STEP_ROWS = 8
DEFAULT_CONTEXT = 32768


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Chunk | BaseException], None]  # hands a chunk (or the failure) to the requester
    key: str = ""  # the client's name for this job, to find or abort it (KoboldCpp's genkey)
    cancel: Cancellation = field(default_factory=Cancellation)  # its own; watches the caller's signal
    text: str = ""  # what has been generated so far (for /api/extra/generate/check)
    origin: str = "kobold"  # who asked: "kobold" or "openai" (the API routes), "page" (the chat page)
    ended: threading.Event = field(default_factory=threading.Event)  # set once it produces nothing more
    # told (prompt positions read, prompt length) after each chunk of a long prompt, from the worker
    progress: Callable[[int, int], None] | None = None


class Scheduler:
    def __init__(self, lm: LoadedModel, max_context: int | None = None, name: str | None = None,
                 cache_slots: int = 4, cache_memory: int | None = None, context_shift: bool = True,
                 max_batch: int = 8, prefill_chunk: int = 256, start: bool = True, speculative: bool = True,
                 wake: threading.Event | None = None) -> None:
        """`start`: run the scheduler on a thread of its own now. Pass False and call `run()`
        from the thread that loaded the model to get its full speed: torch's OpenMP kernels run
        2-3x slower from any thread other than the first that used them (measured on a 2-core
        CPU: int4 mat-vec 0.29 s vs 0.83 s for the same work), so `galatea serve` runs the
        scheduler on its main thread and the HTTP server beside it. Several schedulers (one per
        model) share one thread through `work()`; `wake` is set whenever a job arrives."""
        self.lm = lm
        trained = lm.config.max_position_embeddings
        # without --max-context, at most DEFAULT_CONTEXT positions: a slot is allocated whole,
        # and a file claiming a million positions would ask for terabytes
        self.context = min(max_context or min(trained, DEFAULT_CONTEXT), trained)
        self.chat_format = "auto"  # the prompt format of chats that name none (`serve --format`)
        stem = lm.path.stem if lm.path.is_file() else lm.path.name  # "Llama-3.1-8B/" is not "Llama-3"
        self.name = name or (f"{stem}+{lm.lora_name}" if lm.lora_name else stem)
        self.started = time.time()
        # called with each job's last chunk (its totals) when it ends: the server's perf counters
        self.finished: list[Callable[[Chunk], None]] = []
        # Every client re-sending a growing prompt reuses its slot; slots are allocated on first
        # use, each a full-context KV cache, as many as `cache_memory` bytes allow.
        cfg = lm.config
        dtype = lm.model.cache_dtype or lm.model.default_cache_dtype()
        entry = dtype.itemsize if dtype.is_floating_point else 34 / 32  # q8_0 blocks: 34 bytes per 32 values
        self.slot_bytes = int(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * self.context * cfg.head_dim * entry)
        budget = cache_memory if cache_memory is not None else default_cache_memory()
        self.cache_slots = max(1, min(cache_slots, budget // self.slot_bytes))
        self.prompt_cache = PromptCachePool(self.cache_slots, context_shift)
        self.max_batch, self.prefill_chunk = max(1, max_batch), prefill_chunk
        self.speculative = speculative  # draft from the text and verify in the same step (native kernels)
        self.running: list[Job] = []
        self.wake = wake or threading.Event()
        self.last_used = time.monotonic()  # when a job last arrived or ended (least recently used goes first)
        self._active: list[tuple[Job, Generation]] = []
        self._closing = threading.Event()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        if start:
            self._worker = threading.Thread(target=self.run, name="galatea-engine", daemon=True)
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

    def check(self, params: SamplingParams) -> SamplingParams:
        """The parameters, if this engine can honour them (every one, here)."""
        return params

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, key: str = "",
                       cancel: threading.Event | None = None, origin: str = "kobold") -> AsyncIterator[Chunk]:
        """Chunks as the worker produces them; stopping iteration early cancels the job. `cancel`
        is the caller's signal (a hang-up), watched and never set here."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        job = self._submit(prompt_ids, params, lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
                           key, cancel, origin)
        try:
            while True:
                chunk = _chunk_or_raise(await out.get())
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            job.cancel.set()  # no-op when finished; stops the work when the requester left the stream

    def generate_sync(self, prompt_ids: Sequence[int], params: SamplingParams,
                      cancel: threading.Event | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Iterator[Chunk]:
        """The same, for code running in a thread (the chat sessions of the web page)."""
        out: queue.Queue = queue.Queue()
        job = self._submit(prompt_ids, params, out.put, "", cancel, origin="page")
        job.progress = progress
        try:
            while True:
                chunk = _chunk_or_raise(out.get())
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            job.cancel.set()

    def _submit(self, prompt_ids: Sequence[int], params: SamplingParams,
                emit: Callable[[Chunk | BaseException], None], key: str, cancel: threading.Event | None,
                origin: str) -> Job:
        if self._closing.is_set():
            raise ModelUnavailable(f"{self.name} was unloaded while the request waited; send it again")
        job = Job(list(prompt_ids), params, emit, key, Cancellation(cancel), origin=origin)
        self.last_used = time.monotonic()
        self._jobs.put(job)
        self.wake.set()
        return job

    @property
    def busy(self) -> bool:
        """Jobs running or waiting (a busy model is never unloaded)."""
        return bool(self._active) or not self._jobs.empty()

    @property
    def current(self) -> Job | None:
        """The oldest running job (KoboldCpp's single-user view of the server)."""
        running = list(self.running)
        return running[0] if running else None

    def find(self, key: str = "") -> Job | None:
        """The running Kobold job with this key, or the newest (see `find_kobold`)."""
        return find_kobold(self.running, key)

    def abort(self, key: str | None = None) -> list[Job]:
        """Cancel the API job with `key` (running or queued); without a key, every running
        API job (KoboldCpp's rule: stop the current generation). The chat page's generations are
        never stopped from here: the page stops its own (`cancel` of its request). Returns the
        jobs cancelled; each one's `ended` is set once it produces nothing more."""
        queued = [j for j in list(self._jobs.queue) if j is not None]
        if key:
            jobs = [j for j in [*self.running, *queued] if j.key == key]
        else:
            jobs = list(self.running)
        jobs = [j for j in jobs if j.origin != "page"]
        for job in jobs:
            job.cancel.set()
        return jobs

    def close(self) -> None:
        """Stop the worker (running jobs are cancelled) and wait for it: a thread still inside
        a torch kernel at interpreter exit aborts the process."""
        self._closing.set()
        self._jobs.put(None)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30)

    # ---- the worker thread ---------------------------------------------------------------------

    def run(self) -> None:
        """The scheduler loop, until close()."""
        while self.work(block=True):
            pass

    def work(self, block: bool = False) -> bool:
        """Take the jobs that arrived and run one step; `block`: wait for a job when idle. False
        once closed (its running jobs ended as cancelled)."""
        if not self._admit(self._active, block):
            return False
        if self._active:
            self._step(self._active)
        return True

    def _admit(self, active: list[tuple[Job, Generation]], block: bool = True) -> bool:
        """Take queued jobs while there is room (waiting only when idle and `block`); False on close()."""
        if self._closing.is_set():  # running jobs end as cancelled, with their closing chunk
            for j, g in list(active):
                j.cancel.set()
                g.finish = g.finish or "cancelled"
                self._finish(active, j, g)
            return False
        while len(active) < self.max_batch:
            try:
                job = self._jobs.get(block=block and not active)
            except queue.Empty:
                return True
            if job is None:
                return self._admit(active, block)  # close(): handled above
            if job.cancel.is_set():  # cancelled while queued
                job.emit(Chunk("", None, finish_reason="cancelled"))
                job.ended.set()
                continue
            busy = {id(g.prompt_cache) for _, g in active if g.prompt_cache is not None}
            try:
                slot = self.prompt_cache.acquire(job.prompt_ids, busy)
                gen = Generation(self.lm.model, self.lm.tokenizer, job.prompt_ids, job.params, job.cancel,
                                 self.context, slot, self.speculative)
            except BaseException as e:  # handed to the request; never kills the worker
                job.emit(e)
                job.ended.set()
                continue
            active.append((job, gen))
            self.running.append(job)
        return True

    def _step(self, active: list[tuple[Job, Generation]]) -> None:
        """One scheduling step: a chunk of one new prompt, then a token for every running stream."""
        reading = [(j, g) for j, g in active if not g.prefilled and not g.joins_step]
        for _, gen in [(j, g) for j, g in active if g.joins_step and j.cancel.is_set()]:
            gen.finish = "cancelled"
        if reading:
            job, gen = reading[0]
            if job.cancel.is_set():
                gen.finish = "cancelled"
            else:
                # in chunks, so that running streams keep flowing between them and an abort or a
                # hang-up takes effect within one chunk's time
                self._guard(active, [(job, gen)], lambda: gen.prefill_step(self.prefill_chunk))
                if job.progress is not None and not gen.done:
                    job.progress(gen.read, gen.n_prompt)
        ready = [(j, g) for j, g in active if g.prefilled and not g.done and g.logits is not None]
        for job, gen in ready:
            while (job, gen) in active and not gen.done and gen.logits is not None:  # every accepted draft
                chunk = self._guard(active, [(job, gen)], gen.sample)
                if chunk is not None:
                    job.text += chunk.text
                    job.emit(chunk)
        for job, gen in [(j, g) for j, g in active if g.done]:
            self._finish(active, job, gen)
        going = [(j, g) for j, g in active if g.needs_forward or g.joins_step]
        if len(going) == 1:
            self._guard(active, going, going[0][1].forward)
        elif going:
            self._guard(active, going, lambda: self._forward_together([g for _, g in going]))

    def _forward_together(self, gens: list[Generation]) -> None:
        """One batched pass for every generation's rows (its last token, and drafts at the next
        positions of the same cache): the weights are read once for all of them. Drafts share a
        budget of STEP_ROWS rows: past that a row costs about what it would alone."""
        drafts = max(0, STEP_ROWS - len(gens)) // len(gens)
        rows = [g.rows(drafts) for g in gens]
        tokens = [t for r in rows for t in r]
        caches = [g.cache for g, r in zip(gens, rows, strict=True) for _ in r]
        positions = [g.position + i for g, r in zip(gens, rows, strict=True) for i in range(len(r))]
        # logits for every decoding row, and for a prompt's last row only
        keep, at = [], 0
        for g, r in zip(gens, rows, strict=True):
            keep += list(range(at, at + len(r))) if g.prompt_read else [at + len(r) - 1]
            at += len(r)
        logits = self.lm.model.decode_batch(tokens, caches, positions, keep)
        at = 0
        for g, r in zip(gens, rows, strict=True):
            n = len(r) if g.prompt_read else 1
            g.advance(logits[at : at + n])
            at += n

    def _guard(self, active: list[tuple[Job, Generation]], rows: list[tuple[Job, Generation]],
               fn: Callable[[], Any]) -> Any:
        """Run fn; if it fails, the failure goes to the jobs it concerned, which end."""
        try:
            return fn()
        except BaseException as e:
            for job, gen in rows:
                job.emit(e)
                self._drop(active, job, gen)
            return None

    def _drop(self, active: list[tuple[Job, Generation]], job: Job, gen: Generation) -> None:
        if (job, gen) in active:
            active.remove((job, gen))
        if job in self.running:
            self.running.remove(job)
        if gen.prompt_cache is not None:
            gen.prompt_cache.clear()
        job.ended.set()

    def _finish(self, active: list[tuple[Job, Generation]], job: Job, gen: Generation) -> None:
        self.last_used = time.monotonic()
        last = gen.close()
        job.text += last.text
        active.remove((job, gen))
        self.running.remove(job)
        job.emit(last)
        job.ended.set()
        for listener in self.finished:
            listener(last)


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
