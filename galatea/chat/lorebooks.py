"""Lorebooks (world info) that live on their own, not inside one card.

A lorebook is kept as a Character Card V2 `character_book` (entries with `keys`,
`secondary_keys`, `content`, `insertion_order`, `enabled`, `constant`, `selective`,
`case_sensitive`, `position`), so the prompt reads attached books exactly like a card's own.

Read from, detected by content: SillyTavern world-info files (`{"entries": {"0": {"key": [...],
"keysecondary", "comment", "order", "disable", "position", "depth", ...}}}`, e.g. its bundled
Eldoria), the V3 standalone export (`{"spec": "lorebook_v3", "data": {...}}`), a bare V2
`character_book`, and a character card's own book. SillyTavern's own fields (depth, probability,
selectiveLogic, ...) are kept in each entry's `extensions`, as SillyTavern itself does when it
embeds a world in a card, so an export gives SillyTavern back what it wrote.

Positions: `before_char` entries go before the persona, `after_char` ones after the scenario (as
in SillyTavern's Pygmalion story string); SillyTavern's other places (author's note, at a depth)
have no counterpart in this prompt and go after the scenario, their number kept for export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from galatea.chat.cards import Character, clean_book, from_object, parse_json, read_card
from galatea.errors import GalateaError

# SillyTavern's numeric positions (world_info_position) and the V2 names for the first two
ST_POSITIONS = {0: "before_char", 1: "after_char"}
ST_ONLY = ("depth", "probability", "useProbability", "selectiveLogic", "scanDepth", "matchWholeWords", "group",
           "groupOverride", "groupWeight", "sticky", "cooldown", "delay", "role", "excludeRecursion",
           "preventRecursion", "delayUntilRecursion", "displayIndex", "addMemo", "vectorized", "automationId")


@dataclass
class Lorebook:
    name: str
    book: dict[str, Any] = field(default_factory=lambda: {"entries": []})  # a V2 character_book

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.book.setdefault("entries", [])


def read_lorebook(data: bytes, where: str = "lorebook", name: str | None = None) -> Lorebook:
    """A lorebook from a file's bytes (any of the formats above)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = ""
    if not text.lstrip().startswith("{"):
        if data[:8] == b"\x89PNG\r\n\x1a\n":  # a card: its own book
            return _from_card(read_card(data, where), where, name)
        raise GalateaError(f"{where}: not a lorebook (expected SillyTavern world-info JSON or a V2/V3 "
                           "lorebook); character cards go to `galatea characters import`")
    obj = parse_json(text, where, "lorebook")
    if not isinstance(obj, dict):
        raise GalateaError(f"{where}: a lorebook is a JSON object, not {type(obj).__name__}")
    if obj.get("spec") == "lorebook_v3" and isinstance(obj.get("data"), dict):
        obj = obj["data"]
    elif obj.get("spec") in ("chara_card_v2", "chara_card_v3") or "char_name" in obj or "first_mes" in obj:
        return _from_card(from_object(obj, where), where, name)
    entries = obj.get("entries")
    if isinstance(entries, dict):  # SillyTavern world info: entries keyed by uid
        book = {k: v for k, v in obj.items() if k != "entries"}
        book["entries"] = [from_world_info_entry(e, where, i) for i, e in enumerate(entries.values())]
        return Lorebook(name or str(obj.get("name") or "") or "World info", clean_book(book, where))
    if isinstance(entries, list):
        return Lorebook(name or str(obj.get("name") or "") or "Lorebook", clean_book(obj, where))
    raise GalateaError(f"{where}: no 'entries' in it, so not a lorebook (SillyTavern world info has "
                       "\"entries\": {...})")


def _from_card(char: Character, where: str, name: str | None) -> Lorebook:
    if not char.character_book or not char.character_book.get("entries"):
        raise GalateaError(f"{where}: a character card without a lorebook; import it with "
                           "`galatea characters import`")
    return Lorebook(name or str(char.character_book.get("name") or "") or f"{char.name}'s lorebook",
                    copy.deepcopy(char.character_book))


def from_world_info_entry(e: Any, where: str, i: int) -> dict[str, Any]:
    """One SillyTavern world-info entry as a V2 book entry (its own fields in `extensions`)."""
    if not isinstance(e, dict):
        raise GalateaError(f"{where}: world-info entry {i} should be an object")
    own = e.get("extensions")
    if own is not None and not isinstance(own, dict):
        raise GalateaError(f"{where}: world-info entry {i}'s 'extensions' should be an object, not "
                           f"{type(own).__name__}")
    position = e.get("position", 0)
    out: dict[str, Any] = {
        "id": e.get("uid", i), "keys": e.get("key", []), "secondary_keys": e.get("keysecondary", []),
        "comment": e.get("comment") or "", "name": e.get("comment") or "", "content": e.get("content") or "",
        "constant": bool(e.get("constant")), "selective": bool(e.get("selective")),
        "insertion_order": e.get("order", 100), "enabled": not e.get("disable", False),
        "case_sensitive": bool(e.get("caseSensitive")),
        "position": ST_POSITIONS.get(position, "after_char") if isinstance(position, int) else "before_char",
        "extensions": {**(own or {}), "position": position,
                       **{k: e[k] for k in ST_ONLY if k in e}},
    }
    return out


def to_world_info(lorebook: Lorebook) -> dict[str, Any]:
    """SillyTavern's world-info file for this book."""
    entries = {}
    for i, e in enumerate(lorebook.entries):
        # (an older store may hold another type there)
        ext = e.get("extensions") if isinstance(e.get("extensions"), dict) else {}
        position = ext.get("position", 0 if e.get("position") == "before_char" else 1)
        entries[str(i)] = {
            "uid": i, "key": list(e.get("keys") or []), "keysecondary": list(e.get("secondary_keys") or []),
            "comment": e.get("comment") or e.get("name") or "", "content": e.get("content") or "",
            "constant": bool(e.get("constant")), "selective": bool(e.get("selective")),
            "order": e.get("insertion_order", 100), "position": position, "disable": not e.get("enabled", True),
            "caseSensitive": e.get("case_sensitive") or None, "depth": ext.get("depth", 4),
            **{k: ext[k] for k in ST_ONLY if k in ext and k != "depth"},
        }
    return {"name": lorebook.name, "entries": entries}


def with_lorebooks(char: Character, books: list[Lorebook]) -> Character:
    """The character as the prompt sees it: its own book's entries, then each attached book's."""
    if not books:
        return char
    own = char.character_book or {}
    entries = [*own.get("entries", []), *(e for b in books for e in b.entries)]
    return replace(char, character_book={**own, "entries": entries})
