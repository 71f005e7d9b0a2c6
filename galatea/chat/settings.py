"""A chat's settings: how its replies are sampled and how its prompt is built.

Numbers: every sampler (starting from the Pygmalion preset; the newer ones off), the reply length
and the context size (0: the model's, or the server's); the samplers' KoboldAI order. Text: extra
stop strings, the user's persona (who "You" are, SillyTavern's persona description) and a system
prompt in place of the card's (`{{original}}` stands for the card's; empty: the card's).

A chat reads, each over the one before: these defaults, the library's defaults (kept in the
store, "for every chat"), the chat's own, and what the command line set.

Presets are named sets of samplers (numbers and order): the built-in ones below and the user's,
kept in the store. Applying one changes only the samplers; reply length, context and texts stay.
"""

from __future__ import annotations

import math
from typing import Any

from galatea.chat import formats
from galatea.engine.sampling import DEFAULT_ORDER, PYGMALION_PRESET
from galatea.errors import GalateaError

# every sampler of the engine, by its SamplingParams name; the ones the Pygmalion preset leaves
# out start off (neutral values)
SAMPLERS: dict[str, Any] = {
    **{k: v for k, v in PYGMALION_PRESET.items() if k != "max_new_tokens"},
    "typical_p": 1.0, "tfs": 1.0, "top_a": 0.0, "repetition_penalty_slope": 0.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2,
    "xtc_probability": 0.0, "xtc_threshold": 0.1, "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
    "dynatemp_range": 0.0, "dynatemp_exponent": 1.0, "smoothing_factor": 0.0,
}
ORDER_DEFAULT: list[int] = list(DEFAULT_ORDER)  # KoboldAI's sampler ids, in the order they apply
# "recall_tokens": room for old messages recall brings back once they fall out of the window (0: off)
DEFAULT_SETTINGS: dict[str, Any] = {"max_new_tokens": PYGMALION_PRESET["max_new_tokens"], **SAMPLERS, "max_context": 0,
                                    "recall_tokens": 200}
# "format": the prompt format's name (chat/formats.py); "auto" follows the model's metadata
# "thinking": a reasoning model (Qwen3) thinks before replying: off, as persona chat wants replies
TEXT_DEFAULTS: dict[str, Any] = {"stop": [], "persona": "", "system_prompt": "", "sampler_order": ORDER_DEFAULT,
                                 "format": "auto", "thinking": False}

BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    # PygmalionAI's recommendation for Pygmalion 7B (and Galatea's default)
    "Pygmalion (recommended)": {**SAMPLERS, "sampler_order": ORDER_DEFAULT},
    # the same reply every time: for comparing prompts and models
    "Deterministic": {**SAMPLERS, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0},
    # Min-P alone, the modern simple choice: truncation scaled by the top token's probability
    "Min-P": {**SAMPLERS, "temperature": 1.0, "top_p": 1.0, "min_p": 0.1, "repetition_penalty": 1.0},
    # livelier prose; DRY instead of a strong repetition penalty
    "Creative": {**SAMPLERS, "temperature": 1.15, "top_p": 1.0, "min_p": 0.05, "repetition_penalty": 1.05,
                 "dry_multiplier": 0.8},
    # Mirostat 2 holds the text's surprise near tau instead of truncating
    "Mirostat": {**SAMPLERS, "temperature": 1.0, "top_p": 1.0, "mirostat": 2, "mirostat_tau": 5.0},
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text_ok(key: str, value: Any) -> bool:
    if key == "stop":
        return isinstance(value, list) and all(isinstance(s, str) and s for s in value)
    if key == "sampler_order":
        return isinstance(value, list) and order_ok(value)
    if key == "format":
        return isinstance(value, str) and value in (formats.AUTO, formats.TEMPLATE, *formats.names())
    if key == "thinking":
        return isinstance(value, bool)
    return isinstance(value, str)


def order_ok(order: list[Any]) -> bool:
    """A KoboldAI sampler order: ids 0..6, each at most once, at least one."""
    ids = [i for i in order if isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 6]
    return len(ids) == len(order) == len(set(ids)) > 0


def resolve(*layers: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The settings a chat uses, from its layers (lowest first), and the stored keys ignored
    because their value is unusable (an older version let `/set temperature nan` through):
    reported, never fatal."""
    settings: dict[str, Any] = {**DEFAULT_SETTINGS, **TEXT_DEFAULTS}
    ignored: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            if (key in DEFAULT_SETTINGS and not _number(value)) or (key in TEXT_DEFAULTS and not _text_ok(key, value)):
                ignored.append(key)
            else:
                settings[key] = value
    return settings, sorted(set(ignored))


def parse(key: str, value: str) -> Any:
    """A `/set KEY VALUE` of the terminal: stop strings are separated by `|` (`\\n` for a line
    break); `-` clears a text setting."""
    value = value.strip()
    if key in TEXT_DEFAULTS:
        if value == "-":
            return TEXT_DEFAULTS[key]
        if key == "sampler_order":
            try:
                order = [int(i) for i in value.replace(" ", "").split(",")]
            except ValueError:
                order = []
            if not order_ok(order):
                raise GalateaError(f"/set sampler_order: {value!r} is not a KoboldAI order (ids 0-6, comma-separated, "
                                   "each once: 6,0,1,3,4,2,5)")
            return order
        if key == "stop":
            return [s.replace("\\n", "\n") for s in value.split("|") if s]
        if key == "format" and not _text_ok(key, value.lower()):
            raise GalateaError(f"/set format: {value!r} is not a prompt format; one of "
                               f"{', '.join([formats.AUTO, formats.TEMPLATE, *formats.names()])}")
        if key == "format":
            return value.lower()
        if key == "thinking":
            if value.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                raise GalateaError(f"/set thinking: {value!r} is not on or off")
            return value.lower() in ("on", "true", "1", "yes")
        return value.replace("\\n", "\n")
    kinds = {**{k: type(v) for k, v in DEFAULT_SETTINGS.items()}, "seed": int}
    if key not in kinds:
        raise GalateaError(f"unknown setting {key!r}; one of {', '.join([*kinds, *TEXT_DEFAULTS])}")
    try:
        parsed = kinds[key](value)
    except ValueError:
        raise GalateaError(f"/set {key}: {value!r} is not a {kinds[key].__name__}") from None
    if not math.isfinite(parsed):
        raise GalateaError(f"/set {key}: {value!r} is not a finite number")
    return parsed
