"""Request bodies of the KoboldAI and OpenAI-style APIs, as the front ends really send them.

Unknown fields are ignored, never rejected (KoboldAI's own schema drops them; SillyTavern sends
many). Defaults are KoboldCpp's for Kobold routes and text-generation-webui's for OpenAI routes.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    sampler_order: list[int] = Field(default_factory=lambda: [6, 0, 1, 3, 4, 2, 5], max_length=16)
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


class EncodeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    text: str | None = None
    prompt: str | None = None
    content: str | None = None

    def value(self) -> str:
        return next((v for v in (self.text, self.prompt, self.content) if v is not None), "")
