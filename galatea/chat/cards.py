"""Character cards in every format users carry, detected from content, never from file names.

Formats: TavernAI V1 JSON; Character Card V2/V3 JSON (`spec`/`data`); PNG cards (base64 JSON in
a `ccv3` or `chara` text chunk, `ccv3` preferred); the old Pygmalion/gradio JSON (`char_name`,
`char_persona`, ...); text-generation-webui YAML/JSON (`name`, `greeting`, `context`).

Real cards are messy, so reading is lenient where the meaning is clear (null -> "", a list of
lines where a string belongs, one string where a list belongs, a card nested twice) and strict
where it is not (an object where text belongs is refused, naming the field). Everything not
understood is kept: `extensions` and unknown keys survive a re-export untouched.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from galatea.chat import png_text
from galatea.errors import GalateaError

TEXT_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example", "creator_notes",
               "system_prompt", "post_history_instructions", "creator", "character_version")
LIST_FIELDS = ("alternate_greetings", "tags")


@dataclass
class Character:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    creator: str = ""
    character_version: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    character_book: dict[str, Any] | None = None  # V2 `CharacterBook`, kept as written
    extensions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown `data` keys, kept for re-export
    image: bytes | None = None  # the PNG the card came in, if any
    source_format: str = "v2"  # v1, v2, v3, gradio, textgen

    def to_v2(self) -> dict[str, Any]:
        """A Character Card V2 object; V1 fields are repeated at the top level, as SillyTavern
        writes them, so V1-only readers understand it too."""
        data: dict[str, Any] = copy.deepcopy(self.extra)
        for name in TEXT_FIELDS:
            data[name] = getattr(self, name)
        data["alternate_greetings"] = list(self.alternate_greetings)
        data["tags"] = list(self.tags)
        data["extensions"] = copy.deepcopy(self.extensions)
        if self.character_book is not None:
            data["character_book"] = copy.deepcopy(self.character_book)
        top = {k: data[k] for k in ("name", "description", "personality", "scenario", "first_mes", "mes_example")}
        return {**top, "spec": "chara_card_v2", "spec_version": "2.0", "data": data}

    def to_v3(self) -> dict[str, Any]:
        card = self.to_v2()
        card["data"].setdefault("group_only_greetings", [])
        return {"spec": "chara_card_v3", "spec_version": "3.0", "data": card["data"]}

    def to_png(self) -> bytes:
        """A PNG card: the character's own image (or a generated placeholder) carrying the card
        as `chara` (V2) and `ccv3` (V3) text chunks, as SillyTavern writes them."""
        image = self.image if self.image and png_text.is_png(self.image) else placeholder_png(self.name)
        texts = {
            "chara": _b64(json.dumps(self.to_v2(), ensure_ascii=False)),
            "ccv3": _b64(json.dumps(self.to_v3(), ensure_ascii=False)),
        }
        return png_text.write_text_chunks(image, texts, where=self.name)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def placeholder_png(name: str) -> bytes:
    """A 400x600 portrait card with the character's initial, for cards that came without one."""
    from PIL import Image, ImageDraw, ImageFont

    hue = sum(name.encode("utf-8")) % 360
    img = Image.new("RGB", (400, 600), _hsv(hue, 0.35, 0.55))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=220)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    initial = (name.strip()[:1] or "?").upper()
    draw.text((200, 300), initial, fill=(255, 255, 255), font=font, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h / 360, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


# ---- reading -----------------------------------------------------------------------------------

def read_card(data: bytes, where: str = "card") -> Character:
    """Parse any supported card from the bytes of a file."""
    image = None
    if png_text.is_png(data):
        texts = png_text.read_text_chunks(data, where, keys={"ccv3", "chara"})
        raw = texts.get("ccv3") or texts.get("chara")
        if raw is None:
            raise GalateaError(f"{where}: this PNG carries no character card (no 'ccv3' or 'chara' text chunk)")
        try:
            text = base64.b64decode(raw.strip(), validate=False).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError) as e:
            raise GalateaError(f"{where}: the card in the PNG is not valid base64 UTF-8 ({e})") from None
        obj = parse_json(text, where)
        image = data
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise GalateaError(f"{where}: not a character card (neither PNG nor UTF-8 text)") from None
        obj = _parse_text(text, where)
    char = from_object(obj, where)
    char.image = image
    return char


MAX_DEPTH = 64  # cards nest a few levels; deeper is a malformed or hostile file


def _depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply `obj` nests (iteratively, so a hostile file cannot exhaust the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


MAX_JSON = 8 << 20  # a card or world-info file's JSON: real ones, big lorebooks included, are under 2 MiB
MAX_YAML = 1 << 20  # YAML parses ~100x slower than JSON: a 24 MB card held a server for minutes


def parse_json(text: str, where: str, what: str = "card") -> Any:
    """`what` the file should be ("card", "lorebook"), for the messages."""
    if len(text) > MAX_JSON:
        raise GalateaError(f"{where}: {len(text) >> 20} MiB of JSON is too large for a {what} (at most "
                           f"{MAX_JSON >> 20} MiB); check that this is the right file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise GalateaError(f"{where}: {what} JSON is invalid ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise GalateaError(f"{where}: {what} JSON nests too deeply; not a {_long(what)}") from None
    if _depth(obj) > MAX_DEPTH:
        raise GalateaError(f"{where}: {what} JSON nests over {MAX_DEPTH} levels; not a {_long(what)}")
    return obj


def _long(what: str) -> str:
    return "character card" if what == "card" else what


def _parse_text(text: str, where: str) -> Any:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return parse_json(text, where)
    import yaml

    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML:
        raise GalateaError(f"{where}: a YAML card of {len(text) >> 10} KiB is too large (at most "
                           f"{MAX_YAML >> 10} KiB); save the card as JSON or PNG")
    try:
        # aliases let 500 bytes expand to gigabytes ("billion laughs"); cards never need them
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise GalateaError(f"{where}: YAML aliases (*name) are not accepted in cards; write the text out")
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GalateaError(f"{where}: neither JSON nor YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise GalateaError(f"{where}: card YAML nests too deeply; not a character card") from None
    if _depth(obj) > MAX_DEPTH:
        raise GalateaError(f"{where}: card YAML nests over {MAX_DEPTH} levels; not a character card")
    return obj


def from_object(obj: Any, where: str = "card") -> Character:
    """Detect the format of a decoded card object and read it."""
    if not isinstance(obj, dict):
        raise GalateaError(f"{where}: a card must be a JSON/YAML object, not {type(obj).__name__}")
    spec = obj.get("spec")
    data = obj.get("data")
    if isinstance(data, dict) and isinstance(data.get("data"), dict) and "name" not in data:
        data = data["data"]  # nested twice by some exporters
    if isinstance(data, dict) and (spec or "name" in data):
        fmt = "v3" if str(spec).startswith("chara_card_v3") else "v2"
        return _from_v2_data(data, fmt, where)
    if "char_name" in obj:
        return _from_gradio(obj, where)
    if "name" in obj and ("context" in obj or "greeting" in obj) and "first_mes" not in obj:
        return _from_textgen(obj, where)
    if "name" in obj or "bot" in obj:
        return _from_v2_data(obj, "v1", where)
    raise GalateaError(f"{where}: not a character card (no 'name', 'char_name' or 'data.name' field)")


def _from_v2_data(data: dict[str, Any], fmt: str, where: str) -> Character:
    known = set(TEXT_FIELDS) | set(LIST_FIELDS) | {"character_book", "extensions"}
    v1_top = {"spec", "spec_version", "data"}
    fields = {name: _text(data.get(name), name, where) for name in TEXT_FIELDS}
    if not fields["name"].strip():
        raise GalateaError(f"{where}: field 'name' is empty; a character needs a name")
    book = data.get("character_book")
    if book is not None and not isinstance(book, dict):
        raise GalateaError(f"{where}: field 'character_book' must be an object, not {type(book).__name__}")
    extensions = data.get("extensions") or {}
    if not isinstance(extensions, dict):
        raise GalateaError(f"{where}: field 'extensions' must be an object, not {type(extensions).__name__}")
    extra = {k: v for k, v in data.items() if k not in known and k not in v1_top}
    if extra.get("group_only_greetings") == []:
        del extra["group_only_greetings"]  # V3's required default; to_v3() writes it back
    return Character(
        **fields,
        alternate_greetings=_list(data.get("alternate_greetings"), "alternate_greetings", where),
        tags=_list(data.get("tags"), "tags", where, split_commas=True),
        character_book=clean_book(book, where) if book else None,
        extensions=extensions, extra=extra, source_format=fmt,
    )


def _from_gradio(obj: dict[str, Any], where: str) -> Character:
    name = _text(obj.get("char_name"), "char_name", where)
    if not name.strip():
        raise GalateaError(f"{where}: field 'char_name' is empty; a character needs a name")
    return Character(
        name=name,
        description=_text(obj.get("char_persona"), "char_persona", where),
        first_mes=_text(obj.get("char_greeting"), "char_greeting", where),
        scenario=_text(obj.get("world_scenario"), "world_scenario", where),
        mes_example=_text(obj.get("example_dialogue"), "example_dialogue", where),
        source_format="gradio",
    )


def _from_textgen(obj: dict[str, Any], where: str) -> Character:
    """text-generation-webui: `context` is the whole persona block (often already in
    `{char}'s Persona: ...` form); keep it as the description, minus that prefix."""
    name = _text(obj.get("name") or obj.get("bot") or obj.get("char_name"), "name", where)
    if not name.strip():
        raise GalateaError(f"{where}: field 'name' is empty; a character needs a name")
    context = _text(obj.get("context"), "context", where).strip()
    prefix = re.compile(rf"^{re.escape(name)}'s Persona:\s*", re.IGNORECASE)
    return Character(name=name, description=prefix.sub("", context),
                     first_mes=_text(obj.get("greeting"), "greeting", where), source_format="textgen")


def _text(value: Any, name: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise GalateaError(f"{where}: field {name!r} should be text, not a boolean")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return "\n".join(str(v) for v in value)  # lines written as a list
    raise GalateaError(f"{where}: field {name!r} should be text, not {type(value).__name__}")


def _list(value: Any, name: str, where: str, split_commas: bool = False) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if split_commas else [value]
    if isinstance(value, list):
        return [_text(v, name, where) for v in value if v is not None]
    raise GalateaError(f"{where}: field {name!r} should be a list of text, not {type(value).__name__}")


def clean_book(book: dict[str, Any], where: str) -> dict[str, Any]:
    """The book as written, with each entry's keys and content readable as text/lists."""
    entries = book.get("entries") or []
    if isinstance(entries, dict):  # SillyTavern world files key entries by id
        entries = list(entries.values())
    if not isinstance(entries, list):
        raise GalateaError(f"{where}: field 'character_book.entries' should be a list")
    if book.get("extensions") is not None and not isinstance(book["extensions"], dict):
        raise GalateaError(f"{where}: field 'character_book.extensions' should be an object, "
                           f"not {type(book['extensions']).__name__}")
    clean = copy.deepcopy(book)
    clean["entries"] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise GalateaError(f"{where}: character_book entry {i} should be an object")
        e = copy.deepcopy(entry)
        if e.get("extensions") is not None and not isinstance(e["extensions"], dict):
            raise GalateaError(f"{where}: field 'character_book.entries[{i}].extensions' should be an object, "
                               f"not {type(e['extensions']).__name__}")
        e["keys"] = _list(entry.get("keys", entry.get("key")), f"character_book.entries[{i}].keys", where,
                          split_commas=True)
        e["secondary_keys"] = _list(entry.get("secondary_keys", entry.get("keysecondary")),
                                    f"character_book.entries[{i}].secondary_keys", where, split_commas=True)
        e["content"] = _text(entry.get("content"), f"character_book.entries[{i}].content", where)
        for key in ("insertion_order", "priority"):
            if key in entry:
                e[key] = _whole(entry[key], f"character_book.entries[{i}].{key}", where)
        clean["entries"].append(e)
    for key in ("scan_depth", "token_budget"):
        if key in book:
            clean[key] = _whole(book[key], f"character_book.{key}", where)
    return clean


def _whole(value: Any, name: str, where: str) -> int | None:
    """A lorebook number as the prompt uses it (a whole number, or absent)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GalateaError(f"{where}: field '{name}' should be a whole number, not {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise GalateaError(f"{where}: field '{name}' should be a whole number, not {value!r}") from None
    if not math.isfinite(number) or abs(number) > 2**31:
        raise GalateaError(f"{where}: field '{name}' is out of range ({value!r})")
    return int(number)


# ---- where characters come from ----------------------------------------------------------------

DEFAULT_CHARACTER = "aria"


def bundled_names() -> list[str]:
    from importlib.resources import files

    return sorted(p.name.removesuffix(".json") for p in files("galatea.characters").iterdir()
                  if p.name.endswith(".json"))


def load_character(spec: str | None) -> Character:
    """A card file's path, or the name of a bundled character (default: Aria)."""
    from importlib.resources import files
    from pathlib import Path

    spec = spec or DEFAULT_CHARACTER
    path = Path(spec).expanduser()
    if path.is_file():
        return read_card(path.read_bytes(), where=str(path))
    if spec.lower() in bundled_names():
        res = files("galatea.characters") / f"{spec.lower()}.json"
        return read_card(res.read_bytes(), where=f"bundled character {spec}")
    raise GalateaError(f"character {spec!r}: no such file and no bundled character of that name "
                       f"(bundled: {', '.join(bundled_names())})")
