"""The Pygmalion prompt, byte for byte, inside a token-accurate sliding window.

    {system prompt}                     (only when set: the chat's, else the card's)
    {lorebook entries before the char}  (activated ones, within their budget)
    {char}'s Persona: {description}
    Personality: {personality}          (only when non-empty)
    Scenario: {scenario}                (only when non-empty)
    {lorebook entries after the char}
    {user persona}                      (only when set: who the user is, SillyTavern's "persona")
    <START>
    {example block}                     (one <START> per block of mes_example)
    <START>
    {speaker}: {message}                (history, oldest first)
    {user}: {new message}
    {char}:

This is SillyTavern's classic Pygmalion story string (`{{system}}`, `{{wiBefore}}`, persona,
personality, scenario, `{{wiAfter}}`, `{{persona}}`, then `<START>`); with only a persona it is
exactly the model card's format. Entries without a position go after the character, as in
SillyTavern. When it does not fit in the context minus the reply budget, example blocks go first
(whole blocks, the last first), then the oldest messages (whole messages); persona, scenario and
the newest exchange always stay. Token counts come from the model's own tokenizer on the whole
prompt, so they are exact.

Other formats (chat/formats.py: Metharme, the instruct formats, the model's own chat template)
get the same pieces as a story (system prompt, entries before, description, `{char}'s
personality:`, `Scenario:`, entries after, the user's persona: SillyTavern's default story
string) and turns, and wrap them their way; the window is the same, counted on their text,
wrappers included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from galatea.chat import formats
from galatea.chat.cards import Character
from galatea.chat.formats import Format
from galatea.errors import GalateaError

START = "<START>"
DEFAULT_USER = "You"


class _Counter(Protocol):
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
    def fewest_tokens(self, text: str) -> int: ...


@dataclass
class Turn:
    """One message of the history."""

    is_user: bool
    text: str


@dataclass
class Prompt:
    text: str
    tokens: int  # with BOS when the tokenizer adds it: what the model will read
    examples_used: int
    examples_dropped: int
    messages_used: int
    messages_dropped: int
    lore_used: list[str] = field(default_factory=list)  # entry names (or first keys) inserted
    format: str = "pygmalion"
    stops: list[str] = field(default_factory=list)  # where the format says a reply ends
    recalled: list[int] = field(default_factory=list)  # history indices brought back as "Past events"


def substitute(text: str, char: str, user: str) -> str:
    """Replace {{char}}/<BOT> and {{user}}/<USER>, case-insensitively (the card spec's macros)."""
    text = re.sub(r"\{\{char\}\}|<bot>", lambda _: char, text, flags=re.IGNORECASE)
    return re.sub(r"\{\{user\}\}|<user>", lambda _: user, text, flags=re.IGNORECASE)


def example_blocks(mes_example: str) -> list[str]:
    """`mes_example` split on <START> (any case), each block trimmed, empty ones dropped."""
    return [b.strip() for b in re.split(re.escape(START), mes_example, flags=re.IGNORECASE) if b.strip()]


def build_prompt(char: Character, history: Sequence[Turn], new_message: str | None, tokenizer: _Counter,
                 context: int, max_new_tokens: int, user: str = DEFAULT_USER, end: str = "char",
                 system: str | None = None, persona: str = "", fmt: Format | None = None,
                 memories: Sequence[int] = (), memory_tokens: int = 0) -> Prompt:
    """The prompt for the character's next reply. `new_message` is the user's new line (None to
    reply to the history as it stands). `end`: "char" ends with `{char}:` (a reply), "user" with
    `{user}:` (impersonate: the model writes the user's line), "continue" with the last message
    itself, unterminated, so the model carries on writing it (other formats end with their model
    or user sequence instead of the name). `system`: a system prompt in place of the card's
    (`{{original}}` in it stands for the card's; in the card's, for the format's); `persona`: the
    user's. `fmt`: the prompt format (default: Pygmalion's). `memories`: history indices, best
    first, that recall found for the newest message; those that fell out of the window come back
    as a "Past events:" block after the scenario, in order, within `memory_tokens` tokens (the
    window is then fitted again with the block counted)."""
    fmt = fmt or formats.named("pygmalion")
    budget = context - max_new_tokens
    if budget <= 0:
        raise GalateaError(f"max_new_tokens {max_new_tokens} leaves no room in a context of {context}; lower it")
    name = char.name
    # the card's system prompt, its {{original}} the format's; the chat's, its {{original}} the card's
    card = _original(char.system_prompt, fmt.system_prompt) or fmt.system_prompt
    top = substitute(card if system is None else _original(system, card), name, user).strip()
    header = _header(char, user)
    bottom = substitute(persona, name, user).strip()
    examples = [substitute(b, name, user) for b in example_blocks(char.mes_example)]
    turns = [(user if t.is_user else name, substitute(t.text, name, user).strip()) for t in history]
    if new_message is not None:
        turns.append((user, substitute(new_message, name, user).strip()))
    from_user = [t.is_user for t in history] + ([True] if new_message is not None else [])
    lore = activate_lore(char, turns, user)

    def render(n_examples: int, first_turn: int, lore: tuple[str, str]) -> str:
        if fmt.kind != "pygmalion":
            story = _story(top, lore, char, user, bottom)
            shown = [t for block in examples[:n_examples] for t in formats.example_turns(block, name, user)]
            shown += [(from_user[i], text) for i, (_, text) in enumerate(turns) if i >= first_turn]
            return fmt.render(story, shown, end)
        parts = [f"{top}\n" if top else "", lore[0], header, lore[1], f"{bottom}\n" if bottom else ""]
        parts += [f"{START}\n{block}\n" for block in examples[:n_examples]]
        parts.append(f"{START}\n")
        parts += [f"{speaker}: {text}\n" for speaker, text in turns[first_turn:]]
        text = "".join(parts)
        if end == "continue":
            return text[:-1]
        return text + (f"{user}:" if end == "user" else f"{name}:")

    def size(text: str) -> int:
        least = tokenizer.fewest_tokens(text)
        if least > budget:  # cannot fit whatever it tokenizes to: a 10 MB message is not tokenized
            return least
        return len(tokenizer.encode(text))

    def window(lore_text: tuple[str, str]) -> tuple[int, int]:
        """(example blocks kept, first turn kept): examples go first, then the oldest turns."""
        n_ex = len(examples)
        while n_ex > 0 and size(render(n_ex, 0, lore_text)) > budget:
            n_ex -= 1
        if size(render(n_ex, 0, lore_text)) <= budget:
            return n_ex, 0
        # Oldest messages go next; keep at least the newest exchange (the last two turns).
        keep_from = max(0, len(turns) - 2)
        lo, hi = 1, keep_from  # smallest `first` that fits, by bisection (size falls as first grows)
        if size(render(0, keep_from, lore_text)) > budget:
            text = render(0, keep_from, lore_text)
            need = size(text)
            at_least = "at least " if need == tokenizer.fewest_tokens(text) else ""
            raise GalateaError(
                f"the persona and the newest exchange need {at_least}{need} tokens but only {budget} fit "
                f"(context {context} minus {max_new_tokens} for the reply); shorten the persona or the "
                "message, or lower max_new_tokens"
            )
        while lo < hi:
            mid = (lo + hi) // 2
            if size(render(0, mid, lore_text)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return 0, lo

    lore_text, lore_names = _fit_lore(lore, char, context, tokenizer)  # (before, after) the character
    n_ex, first = window(lore_text)
    recalled: list[int] = []
    if first > 0 and memory_tokens > 0:
        for i in memories:  # best first; only what the window lost, never what it holds
            if i < first and i not in recalled and size(_past_events(turns, sorted([*recalled, i]))) <= memory_tokens:
                recalled = sorted([*recalled, i])
        if recalled:
            lore_text = (lore_text[0], lore_text[1] + _past_events(turns, recalled))
            n_ex, first = window(lore_text)  # the block takes room: the window starts later, never earlier
    text = render(n_ex, first, lore_text)
    return Prompt(text, size(text), n_ex, len(examples) - n_ex, len(turns) - first, first, lore_names,
                  fmt.name, list(fmt.stops), recalled)


def _past_events(turns: Sequence[tuple[str, str]], chosen: Sequence[int]) -> str:
    """Recalled messages as one block, in the chat's order."""
    return "Past events:\n" + "".join(f"{turns[i][0]}: {turns[i][1]}\n" for i in chosen)


def _original(text: str, original: str) -> str:
    return re.sub(r"\{\{original\}\}", lambda _: original, text, flags=re.IGNORECASE)


def _story(top: str, lore: tuple[str, str], char: Character, user: str, persona: str) -> str:
    """SillyTavern's default story string: each piece on its own line when it has text."""
    name = char.name
    personality = substitute(char.personality, name, user).strip()
    scenario = substitute(char.scenario, name, user).strip()
    pieces = [top, lore[0].strip(), substitute(char.description, name, user).strip(),
              f"{name}'s personality: {personality}" if personality else "",
              f"Scenario: {scenario}" if scenario else "", lore[1].strip(), persona]
    return "\n".join(p for p in pieces if p)


def _header(char: Character, user: str) -> str:
    name = char.name
    lines = [f"{name}'s Persona: {substitute(char.description, name, user).strip()}".rstrip()]
    if char.personality.strip():
        lines.append(f"Personality: {substitute(char.personality, name, user).strip()}")
    if char.scenario.strip():
        lines.append(f"Scenario: {substitute(char.scenario, name, user).strip()}")
    return "\n".join(lines) + "\n"


# ---- lorebook ----------------------------------------------------------------------------------

@dataclass
class LoreEntry:
    label: str
    content: str
    order: int  # insertion_order: lower is inserted higher
    priority: int  # lower is dropped first when over budget
    before: bool = False  # position "before_char" (SillyTavern's wiBefore); else after the scenario


def activate_lore(char: Character, turns: Sequence[tuple[str, str]], user: str) -> list[LoreEntry]:
    """Entries of the character's book that apply: constant ones, and those whose keys occur in
    the last `scan_depth` messages (default 2, as SillyTavern). Selective entries also need one
    of their secondary keys."""
    book = char.character_book or {}
    depth = _int(book.get("scan_depth"), 2)
    scan = "\n".join(f"{s}: {t}" for s, t in turns[-depth:])
    out = []
    for i, e in enumerate(book.get("entries") or []):
        if not e.get("enabled", True) or not str(e.get("content", "")).strip():
            continue
        hit = bool(e.get("constant")) or _matches(e.get("keys") or [], scan, bool(e.get("case_sensitive")))
        if hit and e.get("selective") and e.get("secondary_keys"):
            hit = _matches(e["secondary_keys"], scan, bool(e.get("case_sensitive")))
        if hit:
            label = str(e.get("name") or e.get("comment") or (e.get("keys") or [f"entry {i}"])[0])
            out.append(LoreEntry(label, substitute(str(e["content"]).strip(), char.name, user),
                                 _int(e.get("insertion_order"), 0), _int(e.get("priority"), 0),
                                 e.get("position") == "before_char"))
    return out


def _matches(keys: Sequence[Any], text: str, case_sensitive: bool) -> bool:
    hay = text if case_sensitive else text.lower()
    for key in keys:
        k = str(key).strip()
        if k and (k if case_sensitive else k.lower()) in hay:
            return True
    return False


def _fit_lore(entries: list[LoreEntry], char: Character, context: int,
              tokenizer: _Counter) -> tuple[tuple[str, str], list[str]]:
    """The entries that fit the book's token budget (default a quarter of the context), higher
    priority first, rendered in insertion order: (the text before the character, after it)."""
    if not entries:
        return ("", ""), []
    budget = _int((char.character_book or {}).get("token_budget"), context // 4)
    chosen: list[LoreEntry] = []
    used = 0
    for e in sorted(entries, key=lambda e: (-e.priority, e.order)):
        cost = len(tokenizer.encode(e.content + "\n", add_bos=False))
        if used + cost <= budget:
            chosen.append(e)
            used += cost
    chosen.sort(key=lambda e: e.order)
    before = "".join(e.content + "\n" for e in chosen if e.before)
    after = "".join(e.content + "\n" for e in chosen if not e.before)
    return (before, after), [e.label for e in chosen]


def _int(value: object, default: int) -> int:
    """A lorebook number; a card stored by an older version may hold text there: the default."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return int(number) if number == number and abs(number) < 2**31 and number != 0 else default
