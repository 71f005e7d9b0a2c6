"""Request bodies of the KoboldAI and OpenAI-style APIs, as the front ends really send them.

Unknown fields are ignored, never rejected (KoboldAI's own schema drops them; SillyTavern sends
many). Defaults are KoboldCpp's for Kobold routes and text-generation-webui's for OpenAI routes.
Each generation request has one `to_sampling_params()`: the only path from a body to the
sampler, where everything pydantic's fields cannot say (token ids in the vocabulary, the prompt
fitting the context, what Galatea refuses) is checked, once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from galatea.engine.modern_samplers import DRY_BREAKERS, dry_breaker_ids
from galatea.engine.sampling import DEFAULT_ORDER, SamplingParams
from galatea.errors import GalateaError, StoreUnavailable

if TYPE_CHECKING:
    from galatea.engine.scheduler import Scheduler

class BadRequest(Exception):
    """A request that cannot be served as sent; `code` is the OpenAI error code."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def refused(e: GalateaError, code: str, status: int = 400) -> Exception:
    """What a route raises for a user's error from below: a BadRequest with its message, except
    an unreachable chat store, which stays itself (a 503, not "not found")."""
    return e if isinstance(e, StoreUnavailable) else BadRequest(str(e), code, status)


MAX_LIST = 64  # stop strings, banned phrases: more is a mistake or an attack, not a setting
SEED_MAX = 2**64 - 1


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list | tuple):
        raise ValueError("must be a string or a list of strings")
    if len(value) > MAX_LIST:
        raise ValueError(f"at most {MAX_LIST} strings")
    return [str(v) for v in value if v]


def _no_surrogates(value: Any, where: str = "body") -> None:
    """Lone UTF-16 surrogates (JSON "\\ud800") are not text any tokenizer can read."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} contains a lone surrogate (not valid Unicode text)") from None
    elif isinstance(value, list | tuple):
        for v in value:
            _no_surrogates(v, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_surrogates(k, where)
            _no_surrogates(v, where)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _no_surrogates(getattr(value, name), name)


class RequestBody(BaseModel):
    """Every request body: unknown fields ignored, numbers finite, strings valid Unicode."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="after")
    def _text(self) -> RequestBody:
        _no_surrogates(self)
        return self


def _breakers(value: Any) -> list[str] | None:
    """DRY's sequence breakers: a list, or the JSON string SillyTavern's text completion sends."""
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]
    raise ValueError("dry_sequence_breakers must be a list of strings")


def _bias(raw: dict[str, float], vocab: int) -> dict[int, float]:
    out = {}
    for key, value in raw.items():
        try:
            out[int(key)] = float(value)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= int(key) < vocab:
            raise BadRequest(f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1})")
    return out


def refuse_unsupported(mirostat: int, grammar: str) -> None:
    """The same answer on every route for what Galatea does not do (rather than ignoring it)."""
    if mirostat not in (0, 1, 2):
        raise BadRequest(f"mirostat {mirostat} is not a Mirostat version; use 0 (off), 1 or 2")
    if grammar.strip():
        raise BadRequest("grammar-constrained sampling is not supported by Galatea; clear the grammar field")


def _token_bans(text: str, vocab: int) -> tuple[int, ...]:
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) >= vocab:
            raise BadRequest(f"custom_token_bans: {part!r} is not a token id of this model (0..{vocab - 1})")
        ids.append(int(part))
    return tuple(ids)


def _top_logprobs(req: CompletionRequest) -> int | None:
    """completions: `logprobs: n` (n alternatives); chat: `logprobs: true` + `top_logprobs: n`."""
    if req.logprobs is None or req.logprobs is False:
        return None
    if req.logprobs is True:
        return min(req.top_logprobs or 0, 20)
    if not 0 <= req.logprobs <= 20:
        raise BadRequest("logprobs must be between 0 and 20 alternatives")
    return req.logprobs


class NewerSamplers(RequestBody):
    """KoboldCpp's and text-generation-webui's newer samplers, the same names on both dialects
    (defaults: KoboldCpp 1.76's)."""

    dry_multiplier: float = Field(default=0.0, ge=0)
    dry_base: float = Field(default=1.75, ge=1)
    dry_allowed_length: int = Field(default=2, ge=1)
    dry_sequence_breakers: list[str] | None = None  # None: SillyTavern's default ["\n", ":", "\"", "*"]
    dry_penalty_last_n: int = Field(default=320, ge=-1)  # <= 0: the whole context
    xtc_threshold: float = Field(default=0.2, ge=0, le=1)
    xtc_probability: float = Field(default=0.0, ge=0, le=1)
    dynatemp_range: float = Field(default=0.0, ge=0)  # KoboldCpp
    dynamic_temperature: bool = False  # text-generation-webui: temperature between low and high
    dynatemp_low: float | None = Field(default=None, ge=0)
    dynatemp_high: float | None = Field(default=None, ge=0)
    dynatemp_exponent: float = Field(default=1.0, gt=0)
    smoothing_factor: float = Field(default=0.0, ge=0)
    mirostat_tau: float = Field(default=5.0, gt=0)
    mirostat_eta: float = Field(default=0.1, gt=0)
    banned_tokens: list[str] = Field(default_factory=list)  # KoboldCpp: phrases, despite the name
    banned_strings: list[str] = Field(default_factory=list)  # text-generation-webui, SillyTavern
    custom_token_bans: str = ""  # token ids, comma-separated (SillyTavern, KoboldCpp)

    @field_validator("banned_tokens", "banned_strings", mode="before")
    @classmethod
    def _phrases(cls, v: Any) -> list[str]:
        return _as_list(v)

    @field_validator("dry_sequence_breakers", mode="before")
    @classmethod
    def _dry_breakers(cls, v: Any) -> list[str] | None:
        return _breakers(v)

    def newer_fields(self, engine: Scheduler, mirostat: int) -> dict:
        """SamplingParams fields for DRY, XTC, dynamic temperature, smoothing, Mirostat and banned
        phrases (DRY's breakers, strings, as token ids: modern_samplers.dry_breaker_ids)."""
        breakers = DRY_BREAKERS if self.dry_sequence_breakers is None else self.dry_sequence_breakers
        ids = dry_breaker_ids(engine.tokenizer, breakers)
        extra: dict = {"dry_multiplier": self.dry_multiplier, "dry_base": self.dry_base,
                       "dry_allowed_length": self.dry_allowed_length, "dry_sequence_breakers": ids,
                       "dry_range": max(0, self.dry_penalty_last_n), "xtc_threshold": self.xtc_threshold,
                       "xtc_probability": self.xtc_probability, "dynatemp_range": self.dynatemp_range,
                       "dynatemp_exponent": self.dynatemp_exponent, "smoothing_factor": self.smoothing_factor,
                       "mirostat": mirostat, "mirostat_tau": self.mirostat_tau, "mirostat_eta": self.mirostat_eta,
                       "banned_phrases": tuple(dict.fromkeys([*self.banned_tokens, *self.banned_strings])),
                       "banned_tokens": _token_bans(self.custom_token_bans, engine.lm.config.vocab_size)}
        if self.dynamic_temperature and self.dynatemp_low is not None and self.dynatemp_high is not None:
            low, high = sorted((self.dynatemp_low, self.dynatemp_high))
            extra.update(temperature=(low + high) / 2, dynatemp_range=(high - low) / 2)
        return extra


class KoboldGenerate(NewerSamplers):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    memory: str = ""
    max_context_length: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=180, ge=1)
    n: int = Field(default=1, ge=1, le=5)
    temperature: float = Field(default=0.7, ge=0, le=100)
    top_k: int = Field(default=100, ge=0)
    top_a: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=0.92, ge=0, le=1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    typical: float = Field(default=1.0, ge=0, le=1)
    tfs: float = Field(default=1.0, ge=0, le=1)
    rep_pen: float = Field(default=1.0, gt=0)
    repetition_penalty: float | None = None  # aliases some clients send; the largest wins (KoboldCpp)
    repeat_penalty: float | None = None
    rep_pen_range: int = Field(default=320, ge=0)
    rep_pen_slope: float = Field(default=1.0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-100, le=100)
    sampler_order: list[int] = Field(default_factory=lambda: list(DEFAULT_ORDER), max_length=16)
    sampler_seed: int = Field(default=-1, ge=-1, le=SEED_MAX)
    stop_sequence: list[str] = Field(default_factory=list)
    trim_stop: bool = False
    singleline: bool = False
    ban_eos_token: bool | None = None
    use_default_badwordsids: bool = False
    bypass_eos: bool = False
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=1024)
    genkey: str = ""
    mirostat: int = 0
    grammar: str = ""
    logprobs: bool = False  # KoboldCpp: each token's log probability and 5 alternatives

    @field_validator("stop_sequence", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        return _as_list(v)

    def to_sampling_params(self, engine: Scheduler, prompt_len: int, context: int) -> SamplingParams:
        """The one mapping of this request to the engine's parameters, validated once. `context`:
        the client's context, never more than the server's."""
        refuse_unsupported(self.mirostat, self.grammar)
        rep_pen = max(v for v in (self.rep_pen, self.repetition_penalty, self.repeat_penalty) if v is not None)
        ban_eos = self.ban_eos_token if self.ban_eos_token is not None else self.use_default_badwordsids
        stops = list(self.stop_sequence) + (["\n"] if self.singleline else [])
        order = [i for i in self.sampler_order if 0 <= i <= 6] or DEFAULT_ORDER
        room = max(1, context - prompt_len)
        return SamplingParams(
            max_new_tokens=min(self.max_length, room), temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, min_p=self.min_p, typical_p=self.typical, tfs=self.tfs, top_a=self.top_a,
            repetition_penalty=rep_pen, repetition_penalty_range=self.rep_pen_range,
            repetition_penalty_slope=self.rep_pen_slope, presence_penalty=self.presence_penalty,
            logit_bias=_bias(self.logit_bias, engine.lm.config.vocab_size), ban_eos=bool(ban_eos or self.bypass_eos),
            sampler_order=order,
            seed=None if self.sampler_seed < 0 else self.sampler_seed, stop=stops, include_stop=not self.trim_stop,
            logprobs=5 if self.logprobs else None,
            **{k: v for k, v in self.newer_fields(engine, self.mirostat).items() if k != "temperature"},
        )


class KoboldTokenCount(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    prompt: str = ""
    special: bool = True


class KoboldGenkey(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    genkey: str = ""


class CompletionRequest(NewerSamplers):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str | list[str] = ""
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_p: float = Field(default=1.0, ge=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    typical_p: float | None = Field(default=None, ge=0, le=1)
    typical: float | None = Field(default=None, ge=0, le=1)
    tfs: float = Field(default=1.0, ge=0, le=1)
    top_a: float = Field(default=0.0, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    rep_pen: float | None = Field(default=None, gt=0)
    repetition_penalty_range: int | None = Field(default=None, ge=0)
    rep_pen_range: int | None = Field(default=None, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-100, le=100)
    frequency_penalty: float = Field(default=0.0, ge=-100, le=100)
    stop: list[str] = Field(default_factory=list)
    stopping_strings: list[str] = Field(default_factory=list)
    ban_eos_token: bool = False
    ignore_eos: bool = False
    seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    sampler_seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    logit_bias: dict[str, float] = Field(default_factory=dict, max_length=1024)
    logprobs: bool | int | None = None  # completions: how many alternatives; chat: on/off
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # chat: how many alternatives
    # text-generation-webui's and KoboldCpp's names; a grammar is refused as on the Kobold routes
    mirostat_mode: int | None = None
    mirostat: int | None = None
    grammar_string: str | None = None
    grammar: str | None = None

    @field_validator("stop", "stopping_strings", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        return _as_list(v)

    def to_sampling_params(self, engine: Scheduler, prompt_len: int, default_max: int = 512,
                           extra_stops: list[str] | None = None) -> SamplingParams:
        """The one mapping of this request to the engine's parameters (computed once per request,
        shared by its `n` choices)."""
        mirostat = self.mirostat_mode or self.mirostat or 0
        refuse_unsupported(mirostat, self.grammar_string or self.grammar or "")
        extra = self.newer_fields(engine, mirostat)
        temperature = extra.pop("temperature", self.temperature)  # webui's dynatemp_low/high set it
        max_tokens = self.max_tokens or self.max_new_tokens or getattr(self, "max_completion_tokens", None) \
            or default_max
        room = engine.context - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_len} tokens and the context holds {engine.context}; "
                             "shorten it or start the server with a larger --max-context", "context_length_exceeded")
        rep = self.repetition_penalty or self.rep_pen or 1.0
        rep_range = self.repetition_penalty_range if self.repetition_penalty_range is not None else self.rep_pen_range
        seed = self.seed if self.seed is not None else self.sampler_seed
        return SamplingParams(
            max_new_tokens=min(max_tokens, room), temperature=temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, typical_p=self.typical_p if self.typical_p is not None else (self.typical or 1.0),
            tfs=self.tfs, top_a=self.top_a, repetition_penalty=rep, repetition_penalty_range=rep_range or 0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=_bias(self.logit_bias, engine.lm.config.vocab_size),
            ban_eos=self.ban_eos_token or self.ignore_eos,
            seed=None if seed is None or seed < 0 else seed,
            stop=list(dict.fromkeys([*self.stop, *self.stopping_strings, *(extra_stops or [])])),
            logprobs=_top_logprobs(self), **extra,
        )


class ChatMessage(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    role: str
    content: str | list[dict[str, Any]] | None = ""
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        return self.content or ""


class ChatCompletionRequest(CompletionRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    character: str | None = None  # text-generation-webui's field for the character's name
    user_name: str | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # vLLM's and llama.cpp's: {"enable_thinking": true} lets a reasoning model's template think
    chat_template_kwargs: dict[str, Any] | None = None


class EncodeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    text: str | None = None
    prompt: str | None = None
    content: str | None = None

    def value(self) -> str:
        return next((v for v in (self.text, self.prompt, self.content) if v is not None), "")
