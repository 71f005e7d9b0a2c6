"""The part of Go's text/template that Ollama's classic prompt templates use, for `/api/generate`'s
`template` field: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if .X }}...{{ else }}
...{{ end }}`, comments, and the `{{-`/`-}}` markers that trim the white space beside an action.
The prompt ends where `{{ .Response }}` stands (the model writes the response), as in Ollama.
Anything else (`range`, functions, `.Messages`) is refused by name rather than rendered wrong.
"""

from __future__ import annotations

import re

from galatea.errors import GalateaError

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
FIELDS = ("System", "Prompt", "Response")


class _Cut(Exception):
    """Rendering reached `{{ .Response }}`: the prompt ends there."""


def _tokens(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", body) in order, with trim markers applied to the text."""
    out: list[tuple[str, str]] = []
    at = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[at:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, at = bool(m.group(3)), m.end()
    tail = template[at:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _field(expr: str) -> str:
    name = expr.removeprefix(".")
    if not expr.startswith(".") or name not in FIELDS:
        raise GalateaError(f"template: {{{{ {expr} }}}} is not supported (only .System, .Prompt and .Response, "
                           "with if/else/end); send raw: true with a prompt you formatted yourself")
    return name


def render(template: str, values: dict[str, str]) -> str:
    """The prompt `template` makes of `values` (System, Prompt), up to where the response goes."""
    out: list[str] = []
    # each open `if` on a stack: (this branch is taken, the condition was true)
    stack: list[tuple[bool, bool]] = []

    def live() -> bool:
        return all(taken for taken, _ in stack)

    try:
        for kind, body in _tokens(template):
            if kind == "text":
                if live():
                    out.append(body)
            elif body.startswith("/*"):
                continue
            elif body.startswith("if "):
                cond = bool(values.get(_field(body[3:].strip()), ""))
                stack.append((cond, cond))
            elif body == "else":
                if not stack:
                    raise GalateaError("template: {{ else }} outside an {{ if }}")
                _, cond = stack.pop()
                stack.append((not cond, cond))
            elif body == "end":
                if not stack:
                    raise GalateaError("template: {{ end }} without an {{ if }}")
                stack.pop()
            else:
                name = _field(body)
                if live():
                    if name == "Response":
                        raise _Cut
                    out.append(values.get(name, ""))
    except _Cut:
        return "".join(out)
    if stack:
        raise GalateaError("template: an {{ if }} is never closed with {{ end }}")
    return "".join(out)
