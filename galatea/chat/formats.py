"""Prompt formats: how a persona chat becomes the text a model was trained on.

Three kinds, all data (formats.json) but the model's own template:
- `pygmalion`: the classic persona prompt (`{char}'s Persona:`, `<START>`, `Name: text` lines),
  rendered by chat/prompt.py.
- `instruct`: SillyTavern's instruct mode. The story (system prompt, lorebook entries,
  description, personality, scenario, the user's persona) is wrapped in the format's system
  sequences, then every message (example dialogue first, then the chat) in its user or model
  sequences, and the prompt ends with the model's sequence:

      {story_prefix}{story}{story_suffix}
      {input_sequence}{user text}{input_suffix}
      {output_sequence}{reply}{output_suffix}
      ...
      {last_output_sequence or output_sequence}

  A format without a system turn (`merge_story`, Mistral) puts the story at the head of the
  first user turn, adding one when the chat opens with the character's greeting.
- `template`: the model's own Jinja chat template (GGUF `tokenizer.chat_template`,
  `tokenizer_config.json`'s `chat_template`), rendered in jinja2's immutable sandbox as
  transformers renders it: the story as the system message, then user/assistant messages.

`choose` picks one by name, or from the model's metadata when the name is "auto" (a chat
template; Metharme's `<|model|>` token in the vocabulary; else Pygmalion).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Any

from galatea.errors import GalateaError
from galatea.model.tokenizer import Tokenizer

AUTO = "auto"
TEMPLATE = "template"
Turn = tuple[bool, str]  # (the user wrote it, its text)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "pygmalion", "instruct" or "template"
    title: str = ""
    system_prompt: str = ""  # the story's first line when neither the card nor the chat sets one
    story_prefix: str = ""
    story_suffix: str = ""
    input_sequence: str = ""
    input_suffix: str = ""
    output_sequence: str = ""
    output_suffix: str = ""
    last_output_sequence: str = ""
    merge_story: bool = False
    alternate: bool = False  # user and model turns must alternate: a run of one side's turns is one turn
    story_separator: str = "\n\n"
    stops: tuple[str, ...] = ()
    template: Any = field(default=None, compare=False, repr=False)  # a compiled jinja2 Template
    bos_token: str = ""
    eos_token: str = ""
    strip_bos: bool = False  # the tokenizer adds BOS itself: a template's leading BOS text is dropped
    thinking: bool = False  # a reasoning model's template: `enable_thinking` (Qwen3's; off by default in chat)

    def render(self, story: str, turns: Sequence[Turn], end: str) -> str:
        """The prompt for `turns` (examples first, then the chat) ending for `end`: "char" (the
        model writes the reply), "user" (it writes the user's line), "continue" (it carries on
        the last message, left open)."""
        if self.kind == TEMPLATE:
            return self._render_template(story, turns, end)
        turns = _alternating(turns) if self.alternate else list(turns)
        parts = []
        if self.merge_story:
            if not turns or not turns[0][0]:  # the first turn must be the user's: the story is one
                turns.insert(0, (True, story))
            elif story:
                turns[0] = (True, f"{story}{self.story_separator}{turns[0][1]}")
        else:
            parts.append(f"{self.story_prefix}{story}{self.story_suffix}")
        for i, (is_user, text) in enumerate(turns):
            head, tail = (self.input_sequence, self.input_suffix) if is_user else (self.output_sequence,
                                                                                   self.output_suffix)
            open_end = end == "continue" and i == len(turns) - 1
            parts.append(head + text + ("" if open_end else tail))
        if end == "char":
            parts.append(self.last_output_sequence or self.output_sequence)
        elif end == "user":
            parts.append(self.input_sequence)
        return "".join(parts)

    # ---- the model's own template -------------------------------------------------------------

    def _render_template(self, story: str, turns: Sequence[Turn], end: str) -> str:
        messages = [{"role": "user" if u else "assistant", "content": t} for u, t in turns]
        try:
            text = self._messages_text(story, messages, end)
        except _TemplateRefused:  # no system role, or turns must alternate from the user's
            folded = [{"role": "user" if u else "assistant", "content": t} for u, t in _alternating(turns)]
            if folded and folded[0]["role"] == "user":
                folded[0] = {"role": "user", "content": f"{story}\n\n{folded[0]['content']}" if story
                             else folded[0]["content"]}
            else:
                folded.insert(0, {"role": "user", "content": story})
            try:
                text = self._messages_text("", folded, end)
            except _TemplateRefused as e:
                raise GalateaError(f"the model's chat template refuses this chat ({e}); choose another format "
                                   "with --format or the chat's settings") from None
        if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text

    def _messages_text(self, story: str, messages: list[dict[str, str]], end: str) -> str:
        full = ([{"role": "system", "content": story}] if story else []) + messages
        if end == "char":
            return self._apply(full, True)
        text = self._apply(full, False)
        if end == "continue" and messages:
            content = messages[-1]["content"]
            at = text.rfind(content)
            return text[: at + len(content)] if at >= 0 and content else text
        if end == "user":  # what the template writes before a user's message
            mark = "\x00galatea-user\x00"
            longer = self._apply([*full, {"role": "user", "content": mark}], False)
            if longer.startswith(text) and mark in longer:
                return longer[: longer.index(mark)]
        return text

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token,
                                        enable_thinking=self.thinking)
        except TemplateError as e:
            raise _TemplateRefused(str(e) or type(e).__name__) from None

    def template_stops(self) -> tuple[str, ...]:
        """What the template writes right after a model's message (`<|im_end|>`): where a reply ends."""
        mark = "\x00galatea-reply\x00"
        try:
            text = self._apply([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}], False)
        except _TemplateRefused:
            return (self.eos_token,) if self.eos_token else ()
        after = text[text.index(mark) + len(mark):].strip() if mark in text else ""
        return tuple(s for s in dict.fromkeys([after, self.eos_token]) if s)


def _alternating(turns: Sequence[Turn]) -> list[Turn]:
    """Consecutive turns of one side joined (an example's last reply and the greeting)."""
    out: list[Turn] = []
    for is_user, text in turns:
        if out and out[-1][0] == is_user:
            out[-1] = (is_user, f"{out[-1][1]}\n\n{text}")
        else:
            out.append((is_user, text))
    return out


class _TemplateRefused(Exception):
    """The template raised (its `raise_exception`, or a Jinja error)."""


# ---- choosing a format -------------------------------------------------------------------------

@cache
def _data() -> dict[str, dict[str, Any]]:
    text = resources.files("galatea.chat").joinpath("formats.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def names() -> list[str]:
    """Every format a user can name (besides "auto" and "template")."""
    return list(_data())


def named(name: str) -> Format:
    spec = _data().get(name)
    if spec is None:
        raise GalateaError(f"unknown prompt format {name!r}; use one of {', '.join([AUTO, TEMPLATE, *names()])}")
    spec = dict(spec, stops=tuple(spec.get("stops", ())))
    return Format(name=name, **spec)


def from_template(template: str, tokenizer: Tokenizer) -> Format:
    """The model's own chat template, compiled in jinja2's immutable sandbox (no attribute access
    to Python internals, no mutation of what it is given), with transformers' helpers."""
    from datetime import datetime

    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise GalateaError(f"the model's chat template is not valid Jinja ({e}); choose a format with --format") \
            from None
    fmt = Format(name=TEMPLATE, kind=TEMPLATE, title="the model's chat template", template=compiled,
                 bos_token=tokenizer.piece(tokenizer.bos_id), eos_token=tokenizer.piece(tokenizer.eos_id),
                 strip_bos=tokenizer.add_bos)
    return replace(fmt, stops=fmt.template_stops())


def choose(name: str | None, tokenizer: Tokenizer) -> Format:
    """The format called `name`, or for "auto" (or nothing) the one the model's metadata says."""
    name = (name or AUTO).strip().lower()
    if name == AUTO:
        if tokenizer.chat_template:
            return from_template(tokenizer.chat_template, tokenizer)
        if tokenizer.has_piece("<|model|>") and tokenizer.has_piece("<|user|>"):
            return named("metharme")
        return named("pygmalion")
    if name == TEMPLATE:
        if not tokenizer.chat_template:
            raise GalateaError(f"this model has no chat template; use one of {', '.join([AUTO, *names()])}")
        return from_template(tokenizer.chat_template, tokenizer)
    return named(name)


def example_turns(block: str, char: str, user: str) -> list[Turn]:
    """One example-dialogue block as turns: lines starting `{user}:` or `{char}:` open a
    message, other lines continue the one before (as SillyTavern splits them)."""
    turns: list[Turn] = []
    for line in block.splitlines():
        for is_user, name in ((True, user), (False, char)):
            if line.startswith(f"{name}:"):
                turns.append((is_user, line[len(name) + 1:].strip()))
                break
        else:
            if turns:
                turns[-1] = (turns[-1][0], f"{turns[-1][1]}\n{line}".rstrip())
            elif line.strip():
                turns.append((False, line.strip()))
    return turns
