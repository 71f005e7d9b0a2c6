"""Serving logic shared by the API dialects: request -> sampling parameters and prompt ids, and
errors in each dialect's shape.

Long prompts: Kobold clients (KoboldCpp's behaviour) get the prompt trimmed from the left,
keeping BOS and the `memory`; OpenAI-style clients get HTTP 400 `context_length_exceeded`, as
llama.cpp's server answers, since they count tokens themselves and expect to be told.
"""

from __future__ import annotations

from galatea.chat.cards import Character
from galatea.chat.prompt import Turn, build_prompt
from galatea.chat.session import clean_reply, reply_stops
from galatea.engine.generate import TokenLogprob
from galatea.engine.modern_samplers import DRY_BREAKERS, dry_breaker_ids
from galatea.engine.sampling import SamplingParams
from galatea.errors import GalateaError
from galatea.model.tokenizer import Tokenizer
from galatea.server.engine import Engine
from galatea.server.schemas import ChatCompletionRequest, CompletionRequest, KoboldGenerate, NewerSamplers


class BadRequest(Exception):
    """A request that cannot be served as sent; `code` is the OpenAI error code."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def error_body(path: str, message: str, kind: str, code: str | None = None) -> dict:
    """An error as the clients of `path`'s dialect read it: Kobold routes (/api...) as KoboldAI
    answers (`detail.msg`) and as SillyTavern reads it (`error.message`), the rest as OpenAI."""
    if path.startswith("/api"):
        return {"detail": {"msg": message, "type": kind}, "error": {"message": message, "type": kind}}
    return {"error": {"message": message, "type": kind, "code": code or kind}}


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


def newer_samplers(req: NewerSamplers, engine: Engine, mirostat: int) -> dict:
    """SamplingParams fields for DRY, XTC, dynamic temperature, smoothing, Mirostat and banned
    phrases (DRY's breakers, strings, as token ids: modern_samplers.dry_breaker_ids)."""
    breakers = DRY_BREAKERS if req.dry_sequence_breakers is None else req.dry_sequence_breakers
    ids = dry_breaker_ids(engine.tokenizer, breakers)
    extra: dict = {"dry_multiplier": req.dry_multiplier, "dry_base": req.dry_base,
                   "dry_allowed_length": req.dry_allowed_length, "dry_sequence_breakers": ids,
                   "dry_range": max(0, req.dry_penalty_last_n), "xtc_threshold": req.xtc_threshold,
                   "xtc_probability": req.xtc_probability, "dynatemp_range": req.dynatemp_range,
                   "dynatemp_exponent": req.dynatemp_exponent, "smoothing_factor": req.smoothing_factor,
                   "mirostat": mirostat, "mirostat_tau": req.mirostat_tau, "mirostat_eta": req.mirostat_eta,
                   "banned_phrases": tuple(dict.fromkeys([*req.banned_tokens, *req.banned_strings])),
                   "banned_tokens": _token_bans(req.custom_token_bans, engine.lm.config.vocab_size)}
    if req.dynamic_temperature and req.dynatemp_low is not None and req.dynatemp_high is not None:
        low, high = sorted((req.dynatemp_low, req.dynatemp_high))
        extra.update(temperature=(low + high) / 2, dynatemp_range=(high - low) / 2)
    return extra


# ---- KoboldAI ----------------------------------------------------------------------------------

def kobold_params(req: KoboldGenerate, engine: Engine, prompt_len: int) -> SamplingParams:
    refuse_unsupported(req.mirostat, req.grammar)
    rep_pen = max(v for v in (req.rep_pen, req.repetition_penalty, req.repeat_penalty) if v is not None)
    ban_eos = req.ban_eos_token if req.ban_eos_token is not None else req.use_default_badwordsids
    stops = list(req.stop_sequence) + (["\n"] if req.singleline else [])
    order = [i for i in req.sampler_order if 0 <= i <= 6] or [6, 0, 1, 3, 4, 2, 5]
    room = max(1, kobold_context(req, engine) - prompt_len)
    return SamplingParams(
        max_new_tokens=min(req.max_length, room), temperature=req.temperature, top_k=req.top_k,
        top_p=req.top_p, min_p=req.min_p, typical_p=req.typical, tfs=req.tfs, top_a=req.top_a,
        repetition_penalty=rep_pen, repetition_penalty_range=req.rep_pen_range,
        repetition_penalty_slope=req.rep_pen_slope, presence_penalty=req.presence_penalty,
        logit_bias=_bias(req.logit_bias, engine.lm.config.vocab_size), ban_eos=bool(ban_eos or req.bypass_eos),
        sampler_order=order,
        seed=None if req.sampler_seed < 0 else req.sampler_seed, stop=stops, include_stop=not req.trim_stop,
        logprobs=5 if req.logprobs else None,
        **{k: v for k, v in newer_samplers(req, engine, req.mirostat).items() if k != "temperature"},
    )


def kobold_context(req: KoboldGenerate, engine: Engine) -> int:
    """The client's max_context_length, never more than the server's context."""
    return min(req.max_context_length or engine.context, engine.context)


def kobold_prompt(req: KoboldGenerate, engine: Engine) -> list[int]:
    """memory + prompt, the prompt trimmed from the left so that prompt + max_length fits."""
    if not req.prompt and not req.memory:
        raise BadRequest("the prompt is empty; send some text to continue")
    context = kobold_context(req, engine)
    reply = min(req.max_length, max(1, context - 16))  # KoboldCpp clamps max_length the same way
    memory = engine.tokenize(req.memory) if req.memory else []
    prompt = engine.tokenize(req.prompt, add_bos=not memory) if req.prompt else []
    room = context - reply - len(memory)
    if room <= 0:
        raise BadRequest(f"memory is {len(memory)} tokens and leaves no room in a context of {context}")
    if len(prompt) > room:
        bos = prompt[:1] if not memory and engine.tokenizer.add_bos else []
        prompt = bos + prompt[len(prompt) - room + len(bos) :]
    return memory + prompt


# ---- OpenAI-style ------------------------------------------------------------------------------

def completion_params(req: CompletionRequest, engine: Engine, prompt_len: int, default_max: int = 512,
                      extra_stops: list[str] | None = None) -> SamplingParams:
    mirostat = req.mirostat_mode or req.mirostat or 0
    refuse_unsupported(mirostat, req.grammar_string or req.grammar or "")
    extra = newer_samplers(req, engine, mirostat)
    temperature = extra.pop("temperature", req.temperature)  # webui's dynatemp_low/high set it
    max_tokens = req.max_tokens or req.max_new_tokens or getattr(req, "max_completion_tokens", None) or default_max
    room = engine.context - prompt_len
    if room < 1:
        raise BadRequest(f"the prompt has {prompt_len} tokens and the context holds {engine.context}; "
                         "shorten it or start the server with a larger --max-context", "context_length_exceeded")
    rep = req.repetition_penalty or req.rep_pen or 1.0
    rep_range = req.repetition_penalty_range if req.repetition_penalty_range is not None else req.rep_pen_range
    seed = req.seed if req.seed is not None else req.sampler_seed
    return SamplingParams(
        max_new_tokens=min(max_tokens, room), temperature=temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, typical_p=req.typical_p if req.typical_p is not None else (req.typical or 1.0),
        tfs=req.tfs, top_a=req.top_a, repetition_penalty=rep, repetition_penalty_range=rep_range or 0,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logit_bias=_bias(req.logit_bias, engine.lm.config.vocab_size), ban_eos=req.ban_eos_token or req.ignore_eos,
        seed=None if seed is None or seed < 0 else seed,
        stop=list(dict.fromkeys([*req.stop, *req.stopping_strings, *(extra_stops or [])])),
        logprobs=_top_logprobs(req), **extra,
    )


def completion_prompt(req: CompletionRequest, engine: Engine) -> list[int]:
    prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt[:1])
    if not prompt:
        raise BadRequest("the prompt is empty; send some text to continue")
    return engine.tokenize(prompt)


def chat_prompt(req: ChatCompletionRequest, engine: Engine) -> tuple[list[int], str, str]:
    """The Pygmalion prompt for a chat request: system messages make the persona, the
    assistant's `name` (or `character`) is the character, users speak as `You` (or `user_name`).
    Returns (ids, character name, user name)."""
    char_name = req.character or next((m.name for m in req.messages if m.role == "assistant" and m.name), None) \
        or "Assistant"
    user = req.user_name or "You"
    persona = "\n".join(m.text().strip() for m in req.messages if m.role in ("system", "developer")).strip()
    history = [Turn(m.role == "user", m.text()) for m in req.messages if m.role in ("user", "assistant")]
    new = history.pop().text if history and history[-1].is_user else None
    reply = req.max_tokens or req.max_completion_tokens or req.max_new_tokens or 512
    char = Character(name=char_name, description=persona)
    try:
        prompt = build_prompt(char, history, new, engine.tokenizer, engine.context, min(reply, engine.context // 2),
                              user=user)
    except GalateaError as e:
        raise BadRequest(str(e), "context_length_exceeded") from None
    return engine.tokenize(prompt.text), char_name, user


def chat_stops(char: str, user: str, req: ChatCompletionRequest | None = None) -> list[str]:
    """Where a chat completion's one reply ends: besides the reply stops, a new line for any
    participant, `\n{name}:` for the user, the character (a second turn of its own) and every
    other name in the messages; the user's name in any common case (`you:`, `YOU:`), since
    small models write it either way."""
    names = [char] + ([m.name for m in req.messages if m.name] if req is not None else [])
    cases = [user, user.lower(), user.capitalize(), user.upper(), "You", "you"]
    extra = [f"\n{n}:" for n in [*cases, *names] if n]
    return list(dict.fromkeys([*reply_stops(char, user), *extra]))


def chat_text(text: str, char: str, user: str) -> str:
    return clean_reply(text, char, char, user)


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


def _token_text(tokenizer: Tokenizer, prev: int, token: int) -> str:
    """A token's text where it stands (after `prev`), leading space included."""
    return tokenizer.decode([prev, token])[len(tokenizer.decode([prev])) :]


def logprobs_content(tokenizer: Tokenizer, prev: int, log: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat's (and KoboldCpp's) shape: [{token, logprob, top_logprobs: [{token, logprob}]}].
    `prev`: the token before the first entry (the prompt's last, or the last one streamed)."""
    out = []
    for entry in log:
        out.append({"token": _token_text(tokenizer, prev, entry.token), "logprob": entry.logprob,
                    "top_logprobs": [{"token": _token_text(tokenizer, prev, t), "logprob": lp} for t, lp in entry.top]})
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
