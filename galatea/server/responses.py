"""Response bodies of the KoboldAI and OpenAI-style APIs, as their clients read them: the types
in our OpenAPI schema, and what FastAPI checks each answer against."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

# ---- KoboldAI / KoboldCpp ------------------------------------------------------------------------


class KoboldResult(BaseModel):
    result: str


class KoboldValue(BaseModel):
    value: int


class KoboldVersion(BaseModel):
    result: str  # "KoboldCpp": what clients check to unlock its features
    version: str
    protected: bool = False
    txt2img: bool = False
    vision: bool = False
    transcribe: bool = False
    multiplayer: bool = False
    websearch: bool = False


class KoboldPerf(BaseModel):
    last_process: float  # milliseconds per prompt token (KoboldCpp's unit)
    last_eval: float  # milliseconds per generated token
    last_token_count: int
    last_input_count: int
    last_cached_count: int
    last_shifted_count: int
    last_recomputed_count: int
    last_drafted_count: int
    last_accepted_count: int
    last_seed: int
    total_gens: int
    stop_reason: int
    queue: int
    idle: int
    uptime: float


class KoboldGeneration(BaseModel):
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class KoboldGenerations(BaseModel):
    results: list[KoboldGeneration]


class KoboldAbort(BaseModel):
    success: Literal["true", "false"]
    done: Literal["true", "false"]


class TokenCount(BaseModel):
    value: int
    ids: list[int]


# ---- OpenAI-style --------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "galatea"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Encoded(BaseModel):
    """The token endpoints' answers (each back end's own field names, all of them filled)."""

    tokens: list[int] | None = None
    length: int | None = None
    count: int | None = None
    value: int | None = None
    ids: list[int] | None = None
    max_model_len: int | None = None


class WebuiModelInfo(BaseModel):
    model_name: str
    lora_names: list[str]
    loader: str
