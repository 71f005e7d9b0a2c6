"""Serving logic shared by the API dialects: request -> sampling parameters and prompt ids, and
errors in each dialect's shape.

Long prompts: Kobold clients (KoboldCpp's behaviour) get the prompt trimmed from the left,
keeping BOS and the `memory`; OpenAI-style clients get HTTP 400 `context_length_exceeded`, as
llama.cpp's server answers, since they count tokens themselves and expect to be told.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from galatea.chat import formats
from galatea.chat.cards import Character
from galatea.chat.prompt import Turn, build_prompt
from galatea.chat.session import clean_reply, reply_stops
from galatea.engine.generate import TokenLogprob
from galatea.engine.scheduler import Scheduler
from galatea.errors import GalateaError
from galatea.model.tokenizer import Tokenizer
from galatea.server.schemas import BadRequest, CompletionRequest, KoboldGenerate

OLLAMA_ROUTES = frozenset({"/api/generate", "/api/chat", "/api/tags", "/api/show", "/api/ps", "/api/version",
                           "/api/embed", "/api/embeddings", "/api/pull", "/api/push", "/api/create", "/api/copy",
                           "/api/delete"})


def error_body(path: str, message: str, kind: str, code: str | None = None) -> dict:
    """An error as the clients of `path`'s dialect read it: Ollama's routes as Ollama answers
    (`error`, a string), Kobold routes (/api...) as KoboldAI answers (`detail.msg`) and as
    SillyTavern reads it (`error.message`), the rest as OpenAI."""
    if path in OLLAMA_ROUTES:
        return {"error": message}
    if path.startswith("/api"):
        return {"detail": {"msg": message, "type": kind}, "error": {"message": message, "type": kind}}
    return {"error": {"message": message, "type": kind, "code": code or kind}}


# ---- KoboldAI ----------------------------------------------------------------------------------

def kobold_context(req: KoboldGenerate, engine: Scheduler) -> int:
    """The client's max_context_length, never more than the server's context."""
    return min(req.max_context_length or engine.context, engine.context)


def kobold_prompt(req: KoboldGenerate, engine: Scheduler) -> list[int]:
    """memory + prompt, the prompt trimmed from the left so that prompt + max_length fits."""
    if not req.prompt and not req.memory:
        raise BadRequest("the prompt is empty; send some text to continue")
    context = kobold_context(req, engine)
    reply = min(req.max_length, max(1, context - 16))  # KoboldCpp clamps max_length the same way
    if engine.tokenizer.fewest_tokens(req.memory) > context:
        raise BadRequest(f"memory is {len(req.memory)} characters, more than a context of {context} tokens holds")
    memory = engine.tokenize(req.memory) if req.memory else []
    # only the prompt's end can stay: what lies before it is not tokenized (a 10 MB prompt took seconds)
    text = _tail(req.prompt, context, engine.tokenizer)
    # the model's own BOS rule (SmolLM2 and Qwen add none) unless memory already opened the prompt
    prompt = engine.tokenize(text, add_bos=None if not memory else False) if text else []
    room = context - reply - len(memory)
    if room <= 0:
        raise BadRequest(f"memory is {len(memory)} tokens and leaves no room in a context of {context}")
    if len(prompt) > room:
        bos = prompt[:1] if not memory and engine.tokenizer.add_bos else []
        prompt = bos + prompt[len(prompt) - room + len(bos) :]
    return memory + prompt


# ---- OpenAI-style ------------------------------------------------------------------------------

def _tail(text: str, context: int, tokenizer: Tokenizer) -> str:
    """The end of `text` that holds at least `context` tokens (all of it when short)."""
    keep = 2 * tokenizer.max_token_chars * (context + 1)  # fewest_tokens(keep chars) > context
    return text if len(text) <= keep else text[-keep:]


def completion_prompt(req: CompletionRequest, engine: Scheduler) -> list[int]:
    prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
    if not prompt:
        raise BadRequest("the prompt is empty; send some text to continue")
    least = engine.tokenizer.fewest_tokens(prompt)
    if least >= engine.context:
        raise BadRequest(f"the prompt has at least {least} tokens but the context holds {engine.context}; "
                         "shorten the prompt", "context_length_exceeded")
    return engine.tokenize(prompt)


class Message(Protocol):
    """A chat message as every dialect has one (OpenAI's and Ollama's)."""

    role: str
    name: str | None

    def text(self) -> str: ...


def chat_prompt(messages: Sequence[Message], engine: Scheduler, reply: int, character: str | None = None,
                user_name: str | None = None, thinking: bool | None = None) -> tuple[list[int], str, str, list[str]]:
    """The prompt for a chat request in the served model's format (`serve --format`, else what
    its metadata says; Pygmalion's persona prompt for a Pygmalion model): system messages make
    the persona, the assistant's `name` (or `character`) is the character, users speak as `You`
    (or `user_name`); `thinking` turns a reasoning model's thinking on or off (None: the
    format's default, off). Returns (ids, character name, user name, the format's stop strings)."""
    char_name = character or next((m.name for m in messages if m.role == "assistant" and m.name), None) \
        or "Assistant"
    user = user_name or "You"
    persona = "\n".join(m.text().strip() for m in messages if m.role in ("system", "developer")).strip()
    history = [Turn(m.role == "user", m.text()) for m in messages if m.role in ("user", "assistant")]
    new = history.pop().text if history and history[-1].is_user else None
    char = Character(name=char_name, description=persona)
    try:
        fmt = formats.choose(engine.chat_format, engine.tokenizer)
        if thinking is not None:
            fmt = replace(fmt, thinking=thinking)
        prompt = build_prompt(char, history, new, engine.tokenizer, engine.context, min(reply, engine.context // 2),
                              user=user, fmt=fmt)
    except GalateaError as e:
        raise BadRequest(str(e), "context_length_exceeded") from None
    return engine.tokenize(prompt.text), char_name, user, prompt.stops


def chat_stops(char: str, user: str, names: Sequence[str] = (), extra: list[str] | None = None) -> list[str]:
    """Where a chat completion's one reply ends: besides the reply stops, a new line for any
    participant, `\n{name}:` for the user, the character (a second turn of its own) and every
    other name in the messages (`names`); the user's name in any common case (`you:`, `YOU:`),
    since small models write it either way."""
    cases = [user, user.lower(), user.capitalize(), user.upper(), "You", "you"]
    names_stops = [f"\n{n}:" for n in [*cases, char, *names] if n]
    return list(dict.fromkeys([*reply_stops(char, user), *names_stops, *(extra or [])]))


def chat_text(text: str, char: str, user: str) -> str:
    return clean_reply(text, char, char, user)


def _token_text(tokenizer: Tokenizer, prev: int, token: int) -> str:
    """A token's text where it stands (after `prev`), leading space included."""
    return tokenizer.decode([prev, token])[len(tokenizer.decode([prev])) :]


def logprobs_content(tokenizer: Tokenizer, prev: int, log: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat's (and KoboldCpp's) shape: [{token, logprob, top_logprobs: [{token, logprob}]}].
    `prev`: the token before the first entry (the prompt's last, or the last one streamed)."""
    out = []
    for entry in log:
        out.append({"token": _token_text(tokenizer, prev, entry.token), "logprob": entry.logprob,
                    "bytes": list(tokenizer.token_bytes(entry.token)),
                    "top_logprobs": [{"token": _token_text(tokenizer, prev, t), "logprob": lp,
                                      "bytes": list(tokenizer.token_bytes(t))} for t, lp in entry.top]})
        prev = entry.token
    return out


def logprobs_legacy(tokenizer: Tokenizer, prev: int, log: list[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI completions' shape: parallel lists, alternatives as {token: logprob}; text offsets
    count from `offset` (the text already streamed)."""
    content = logprobs_content(tokenizer, prev, log)
    offsets, at = [], offset
    for c in content:
        offsets.append(at)
        at += len(c["token"])
    return {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
            "top_logprobs": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
            "text_offset": offsets}
