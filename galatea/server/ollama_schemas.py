"""Request bodies of Ollama's API (`/api/generate`, `/api/chat`, `/api/show`), as its clients
send them (the `ollama` Python library, editor assistants, desktop chat apps).

Sampling comes in `options`, with Ollama's own defaults where a client sends none (temperature
0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over the last 64 tokens): a client written for
Ollama gets the replies it was tuned for. Load-time options (num_gpu, num_thread, use_mmap...)
are accepted and have nothing to do here. What Galatea cannot do - JSON mode and structured
outputs, images, tools, fill-in-the-middle - is refused in one line, never ignored.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, field_validator

from galatea.engine.sampling import SamplingParams
from galatea.server.schemas import SEED_MAX, BadRequest, RequestBody, _as_list

if TYPE_CHECKING:
    from galatea.engine.scheduler import Scheduler


class OllamaOptions(RequestBody):
    """Ollama's runtime options (its `api.Options`), Ollama's defaults."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    num_ctx: int | None = Field(default=None, ge=1)  # None: the server's context (Ollama: 4096)
    num_predict: int = Field(default=-1, ge=-2)  # -1: until the model stops, -2: fill the context
    temperature: float = Field(default=0.8, ge=0, le=100)
    top_k: int = Field(default=40, ge=0)
    top_p: float = Field(default=0.9, ge=0, le=1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    typical_p: float = Field(default=1.0, ge=0, le=1)
    tfs_z: float = Field(default=1.0, ge=0, le=1)
    repeat_last_n: int = Field(default=64, ge=-1)  # 0: off, -1: the whole context
    repeat_penalty: float = Field(default=1.1, gt=0)
    presence_penalty: float = Field(default=0.0, ge=-100, le=100)
    frequency_penalty: float = Field(default=0.0, ge=-100, le=100)
    mirostat: int = Field(default=0, ge=0, le=2)
    mirostat_tau: float = Field(default=5.0, gt=0)
    mirostat_eta: float = Field(default=0.1, gt=0)
    seed: int = Field(default=-1, ge=-1, le=SEED_MAX)  # -1: a new seed each time
    stop: list[str] = Field(default_factory=list)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        return _as_list(v)

    def context(self, engine: Scheduler) -> int:
        """The context this request may use: its num_ctx, never more than the server's."""
        return min(self.num_ctx or engine.context, engine.context)

    def to_sampling_params(self, prompt_len: int, context: int, stops: list[str] | None = None,
                           logprobs: int | None = None) -> SamplingParams:
        """The one mapping of these options to the engine's parameters."""
        room = context - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_len} tokens and the context holds {context}; shorten it "
                             "or raise num_ctx")
        limit = room if self.num_predict < 0 else min(self.num_predict, room)
        penalty = self.repeat_penalty if self.repeat_last_n != 0 else 1.0
        return SamplingParams(
            max_new_tokens=limit, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, typical_p=self.typical_p, tfs=self.tfs_z, repetition_penalty=penalty,
            repetition_penalty_range=max(0, self.repeat_last_n),  # -1 (whole context) is our 0
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            mirostat=self.mirostat, mirostat_tau=self.mirostat_tau, mirostat_eta=self.mirostat_eta,
            seed=None if self.seed < 0 else self.seed,
            stop=list(dict.fromkeys([*self.stop, *(stops or [])])), logprobs=logprobs)


_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's keep_alive (seconds as a number, or a Go duration "5m", "1h30m", "-1") in seconds;
    None when not sent; negative: keep loaded for good."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    text, total = value.strip(), 0.0
    if not text:
        return None
    for part in re.findall(r"-?\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h)?", text):
        m = _DURATION.match(part)
        assert m is not None
        total += float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
    if re.sub(r"-?\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h)?", "", text):
        raise BadRequest(f"keep_alive {value!r} is not a duration; send seconds or a duration such as \"5m\"")
    return total


class OllamaBase(RequestBody):
    """What /api/generate and /api/chat share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        return {} if v is None else v

    def refuse_unsupported(self) -> None:
        if self.format:
            raise BadRequest("format (JSON mode and structured outputs) is not supported by Galatea; leave it out "
                             "and ask for JSON in the prompt")

    def thinking(self) -> bool | None:
        """`think`: true/false, or a level ("low", "medium", "high": on)."""
        if self.think is None:
            return None
        return self.think if isinstance(self.think, bool) else self.think.lower() not in ("", "false", "none", "off")

    def logprob_count(self) -> int | None:
        return self.top_logprobs if self.logprobs else None

    def keep_alive_s(self) -> float | None:
        return keep_alive_seconds(self.keep_alive)


class OllamaGenerate(OllamaBase):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None  # deprecated by Ollama, still sent: the last reply's `context`
    suffix: str | None = None
    images: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise BadRequest("suffix (fill-in-the-middle) is not supported by Galatea; send the prompt alone")
        if self.images:
            raise BadRequest("images are not supported: Galatea serves text models; send text only")


class OllamaMessage(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    role: str
    content: str | None = ""
    name: str | None = None  # not Ollama's, but a persona chat's speaker where a client sends one
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        return self.content or ""


class OllamaChat(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise BadRequest("tools (function calling) are not supported by Galatea; send the chat without tools")
        for m in self.messages:
            if m.role not in ("system", "user", "assistant"):
                raise BadRequest(f"a message has role {m.role!r}; Galatea reads system, user and assistant "
                                 "messages (no tool results)")
            if m.images:
                raise BadRequest("images are not supported: Galatea serves text models; send text only")


class OllamaShow(RequestBody):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    name: str | None = None  # what older clients send
    verbose: bool = False

    def which(self) -> str:
        name = self.model or self.name
        if not name:
            raise BadRequest("model is required: the name of a model /api/tags lists")
        return name


class OllamaModelRef(RequestBody):
    """A body that names a model (/api/embed and the model-management routes)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
