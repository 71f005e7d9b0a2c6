"""A remote engine in place of Galatea's own model: any OpenAI-compatible completions server
(llama.cpp's server, llama-cpp-python's, vLLM, aphrodite-engine) behind the same interface as
the Scheduler, so the chat, the page and the KoboldAI/OpenAI routes work unchanged.

Galatea still builds every prompt with the model's own tokenizer (from `--model`, which may be a
vocabulary-only GGUF) and checks at start that the remote side counts the same tokens (through
its tokenize endpoint); a mismatch is refused, since the token-accurate window would be wrong.
Requests go to `/v1/completions` with `stream: true` (token ids as the prompt where the server
takes them); the text that comes back passes through the same stop-string matching as local
generation. Each of our samplers maps to the engine's own field; one the engine lacks, when it
is not at its neutral value, is refused with one line naming the engine - never silently
dropped - but for the repetition penalty's range, which an engine without one approximates by
its whole window (so the default persona chat works on every engine; said once at start). Stop
closes the stream (the servers stop generating when their client goes away); a failure
mid-reply ends the reply with what was written and a clear error.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galatea.engine.generate import Chunk
from galatea.engine.jobs import Cancellation, find_kobold
from galatea.engine.sampling import DEFAULT_ORDER, SamplingParams
from galatea.engine.text_stream import StopMatcher
from galatea.errors import GalateaError

# a sampler at this value does nothing, so an engine without it loses nothing
NEUTRAL: dict[str, Any] = {
    "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "tfs": 1.0, "top_a": 0.0, "repetition_penalty": 1.0,
    "repetition_penalty_range": 0, "repetition_penalty_slope": 0.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0,
    "dynatemp_range": 0.0, "smoothing_factor": 0.0, "ban_eos": False, "banned_tokens": (), "banned_phrases": (),
    "sampler_order": DEFAULT_ORDER, "logprobs": None,
}
# settings that only matter when their sampler is on
NEEDS = {"mirostat_tau": "mirostat", "mirostat_eta": "mirostat", "dry_base": "dry_multiplier",
         "dry_allowed_length": "dry_multiplier", "xtc_threshold": "xtc_probability",
         "dynatemp_exponent": "dynatemp_range"}


@dataclass(frozen=True)
class Dialect:
    """What one engine's completions endpoint understands."""

    name: str
    tokenize: tuple[str, str] | None  # (path, request field) of its tokenize endpoint; answers {"tokens"}
    token_prompt: bool  # takes the prompt as token ids
    fields: dict[str, str]  # SamplingParams name -> its request field
    extra: dict[str, Any] = field(default_factory=dict)  # sent with every request


LLAMA_CPP = Dialect("llama.cpp server", ("/tokenize", "content"), True, {
    "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
    "repetition_penalty": "repeat_penalty", "repetition_penalty_range": "repeat_last_n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
    "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold", "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta", "dynatemp_range": "dynatemp_range",
    "dynatemp_exponent": "dynatemp_exponent", "ban_eos": "ignore_eos"}, {"cache_prompt": True})
LLAMA_CPP_PYTHON = Dialect("llama-cpp-python server", ("/extras/tokenize", "input"), False, {
    "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"})
VLLM = Dialect("vLLM", ("/tokenize", "prompt"), True, {
    "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "ban_eos": "ignore_eos"},
    {"skip_special_tokens": False})
APHRODITE = Dialect("aphrodite-engine", ("/v1/tokenize", "prompt"), True, {
    **VLLM.fields, "typical_p": "typical_p", "tfs": "tfs", "top_a": "top_a", "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta", "smoothing_factor": "smoothing_factor",
    "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
    "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold"}, {"skip_special_tokens": False})
DIALECTS = {d.name: d for d in (LLAMA_CPP, LLAMA_CPP_PYTHON, VLLM, APHRODITE)}


def approximations(dialect: Dialect) -> list[str]:
    """What this engine does in place of a sampler it lacks (said once, when Galatea starts)."""
    if "repetition_penalty_range" not in dialect.fields:
        return [f"the {dialect.name} has no repetition penalty range: the penalty applies over its whole window "
                "(Pygmalion's default range is 1024 tokens)"]
    return []


def request_body(dialect: Dialect, model: str, prompt: str | list[int], params: SamplingParams,
                 max_tokens: int) -> dict[str, Any]:
    """The `/v1/completions` request for these sampling parameters; GalateaError naming the
    engine for a sampler it does not have."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                            "temperature": max(params.temperature, 0.0), **dialect.extra}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    for name, neutral in NEUTRAL.items():
        value = getattr(params, name)
        if isinstance(neutral, tuple):
            value = tuple(value)
        if value == neutral:
            continue
        if name in ("repetition_penalty_range", "repetition_penalty_slope") and params.repetition_penalty == 1.0:
            continue  # the shape of a penalty that is off
        if name == "repetition_penalty_range" and name not in dialect.fields:
            continue  # approximated: the engine penalizes over its whole window (said at start: APPROXIMATED)
        if name not in dialect.fields:
            raise GalateaError(f"the {dialect.name} has no {name.replace('_', ' ')} setting; set {name} to "
                               f"{neutral if neutral != () else 'nothing'} for this engine (or use Galatea's own)")
        body[dialect.fields[name]] = value
    for name, sampler in NEEDS.items():
        if name in dialect.fields and getattr(params, sampler) != NEUTRAL[sampler]:
            body[dialect.fields[name]] = getattr(params, name)
    return body


@dataclass
class RemoteModel:
    """What Galatea needs of the model when another engine runs it: its tokenizer and config."""

    tokenizer: Any
    config: Any
    path: Path
    lora_name: str | None = None


@dataclass
class _Job:
    key: str
    cancel: Cancellation
    text: str = ""
    origin: str = "kobold"
    ended: threading.Event = field(default_factory=threading.Event)


class RemoteEngine:
    """The Scheduler's interface over a remote completions server. Each request streams on the
    caller's thread (or a worker thread for the async API); the remote engine batches them."""

    def __init__(self, url: str, lm: RemoteModel, max_context: int | None = None, name: str | None = None,
                 timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/").removesuffix("/v1")
        self.lm = lm
        self.http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
        self.remote_model, self.dialect, remote_context = self._discover()
        trained = lm.config.max_position_embeddings
        self.context = min(max_context or remote_context or trained, remote_context or trained)
        self.chat_format = "auto"  # the prompt format of chats that name none (`serve --format`)
        self.name = name or self.remote_model
        self.started = time.time()
        self.finished: list[Callable[[Chunk], None]] = []
        self.running: list[_Job] = []
        self.cache_slots, self.slot_bytes, self.max_batch = 0, 0, 0  # the remote engine's business
        self._closing = threading.Event()
        self._check_tokenizer()

    # ---- discovery -------------------------------------------------------------------------------

    def _get(self, path: str) -> Any | None:
        import httpx

        try:
            r = self.http.get(self.url + path)
        except httpx.HTTPError as e:
            raise GalateaError(f"cannot reach the engine at {self.url} ({type(e).__name__}: {e}); is it "
                               "running? (--engine)") from None
        return r.json() if r.status_code == 200 else None

    def _discover(self) -> tuple[str, Dialect, int | None]:
        """Which engine answers, its model name and context (from the answers' shapes)."""
        models = self._get("/v1/models")
        if not models or not models.get("data"):
            raise GalateaError(f"{self.url} does not answer /v1/models as an OpenAI-compatible server does; "
                               "--engine takes the server's base URL (e.g. http://127.0.0.1:8000)")
        first = models["data"][0]
        owner = str(first.get("owned_by", "")).lower()
        context = first.get("max_model_len")
        if owner in ("vllm", "pygmalionai", "aphrodite"):
            return first["id"], (VLLM if owner == "vllm" else APHRODITE), context
        props = self._get("/props")
        if props is not None:
            n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
            return first["id"], LLAMA_CPP, n_ctx
        return first["id"], LLAMA_CPP_PYTHON, None

    def _check_tokenizer(self) -> None:
        """The remote side must count the same tokens as ours, or the window math is wrong."""
        samples = ["Aria's Persona: a bard.\n<START>\nYou: Hello! How are you?\nAria:",
                   "caf\u00e9 na\u00efve \u2014 \u3053\u3093\u306b\u3061\u306f \U0001f600 12345"]
        path, key = self.dialect.tokenize  # every dialect here has one
        for text in samples:
            r = self.http.post(self.url + path, json={key: text, "model": self.remote_model})
            if r.status_code != 200:
                raise GalateaError(f"the {self.dialect.name} at {self.url} did not tokenize a probe "
                                   f"(HTTP {r.status_code}); cannot check that its tokenizer is the model's")
            theirs = [t for t in r.json()["tokens"] if t != self.lm.tokenizer.bos_id]
            ours = self.lm.tokenizer.encode(text, add_bos=False)
            if theirs != ours:
                raise GalateaError(f"the engine's tokenizer is not the one of {self.lm.path.name} (a probe gives "
                                   f"{len(theirs)} tokens there, {len(ours)} here); pass --model with the model "
                                   "the engine serves (its GGUF or HF folder; a vocabulary-only GGUF will do)")

    # ---- the Scheduler's interface -------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def queued(self) -> int:
        return 0

    @property
    def current(self) -> _Job | None:
        running = list(self.running)
        return running[0] if running else None

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.lm.tokenizer.encode(text, add_bos=add_bos)

    def check(self, params: SamplingParams) -> SamplingParams:
        """The parameters, if the remote engine has every sampler they use (GalateaError naming
        the engine and the sampler if not), checked before a response starts."""
        request_body(self.dialect, self.remote_model, [], params, 1)
        return params

    def find(self, key: str = "") -> _Job | None:
        return find_kobold(self.running, key)

    def abort(self, key: str | None = None) -> list[_Job]:
        jobs = [j for j in list(self.running) if j.origin != "page" and (not key or j.key == key)]
        for job in jobs:
            job.cancel.set()
        return jobs

    def run(self) -> None:
        """Nothing runs here (the remote engine does the work): wait for close()."""
        self._closing.wait()

    def close(self) -> None:
        self._closing.set()
        for job in list(self.running):
            job.cancel.set()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, key: str = "",
                       cancel: threading.Event | None = None, origin: str = "kobold") -> AsyncIterator[Chunk]:
        """The API routes' view: chunks as they come; a remote failure is raised."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = Cancellation(cancel)  # this request's own: the caller's signal may serve several

        def work() -> None:
            try:
                for chunk in self._stream(prompt_ids, params, cancel, key, origin):
                    loop.call_soon_threadsafe(out.put_nowait, chunk)
            except BaseException as e:
                loop.call_soon_threadsafe(out.put_nowait, e)

        threading.Thread(target=work, name="galatea-remote", daemon=True).start()
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason == "error":
                    raise GalateaError(item.error or "the engine failed")
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancel.set()

    def generate_sync(self, prompt_ids: Sequence[int], params: SamplingParams,
                      cancel: threading.Event | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Iterator[Chunk]:
        """The chat sessions' view: a remote failure ends the reply with finish_reason "error"
        (and the message), so what was written can be kept."""
        yield from self._stream(prompt_ids, params, Cancellation(cancel), "", "page")

    # ---- one request -----------------------------------------------------------------------------

    def _stream(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Cancellation, key: str,
                origin: str) -> Iterator[Chunk]:
        import httpx

        params.validate()
        ids = list(prompt_ids)
        if len(ids) >= self.context:
            raise GalateaError(f"the prompt has {len(ids)} tokens but the context holds {self.context}; "
                               "shorten the prompt or raise --max-context")
        budget = min(params.max_new_tokens, self.context - len(ids))
        prompt: str | list[int] = ids if self.dialect.token_prompt else self._text(ids)
        body = request_body(self.dialect, self.remote_model, prompt, params, budget)
        job = _Job(key, cancel, origin=origin)
        self.running.append(job)
        stops = StopMatcher(params.stop, params.include_stop)
        parts: list[str] = []
        finish, error, t0, t_first = None, None, time.perf_counter(), None
        try:
            with self.http.stream("POST", self.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise GalateaError(self._refusal(r))
                for line in r.iter_lines():
                    if cancel.is_set() or self._closing.is_set():
                        finish = "cancelled"
                        break  # leaving the block closes the stream: the engine stops
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    choice = (json.loads(payload).get("choices") or [{}])[0]
                    text = choice.get("text") or ""
                    t_first = t_first or time.perf_counter()
                    shown, hit = stops.feed(text)
                    if shown:
                        parts.append(shown)
                        job.text += shown
                        yield Chunk(shown, None)
                    if hit:
                        finish = "stop"
                        break
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
        except httpx.HTTPError as e:
            finish, error = "error", (f"the engine at {self.url} stopped answering mid-reply ({type(e).__name__}); "
                                      "what was written is kept - check the engine and try again")
        finally:
            self.running.remove(job)
            job.ended.set()
        if finish not in ("stop", "cancelled", "error"):
            rest = stops.flush()
            if rest:
                parts.append(rest)
                yield Chunk(rest, None)
            finish = finish or "length"
        t_end = time.perf_counter()
        n_new = len(self.lm.tokenizer.encode("".join(parts), add_bos=False)) if parts else 0
        decode_s = max(t_end - (t_first or t_end), 1e-9)
        last = Chunk("", None, finish_reason=finish, prompt_tokens=len(ids), generated_tokens=n_new,
                     prefill_tok_s=len(ids) / max((t_first or t_end) - t0, 1e-9), decode_tok_s=n_new / decode_s,
                     stop_string=stops.matched, seed=params.seed, error=error)
        for listener in self.finished:
            listener(last)
        yield last

    def _text(self, ids: list[int]) -> str:
        """The prompt as text for an engine that takes only text (it adds BOS itself)."""
        bos = self.lm.tokenizer.bos_id
        return self.lm.tokenizer.decode(ids[1:] if ids and ids[0] == bos else ids)

    def _refusal(self, r: Any) -> str:
        r.read()
        try:
            err = r.json()
            inner = err.get("error")
            message = (inner.get("message") if isinstance(inner, dict) else inner) or err.get("detail") or r.text
        except ValueError:
            message = r.text
        return f"the {self.dialect.name} refused the request (HTTP {r.status_code}: {str(message)[:300]})"


def load_remote(url: str, model_path: Path, max_context: int | None = None) -> RemoteEngine:
    """The engine at `url`, with the tokenizer and configuration of the model at `model_path`."""
    from galatea.model.checkpoint import load_tokenizer
    from galatea.model.inspect import read_config

    return RemoteEngine(url, RemoteModel(load_tokenizer(model_path), read_config(model_path), model_path), max_context)
