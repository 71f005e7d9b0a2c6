"""Chat files of other front ends, in and out.

- SillyTavern JSONL: a metadata line (`user_name`, `character_name`, `create_date`,
  `chat_metadata`), then one message per line (`name`, `is_user`, `send_date`, `mes`, and for the
  character `swipes`/`swipe_id`/`swipe_info`). Lines that do not parse are skipped, as ST does.
- text-generation-webui history JSON: `{"internal": [[user, bot], ...], "visible": [...]}`,
  the first pair being `["<|BEGIN-VISIBLE-CHAT|>", greeting]` when the chat opens with one.
"""

from __future__ import annotations

import html
import json
import time
from datetime import datetime
from typing import Any

from galatea.chat.store import Message, Store, Swipe
from galatea.errors import GalateaError

TGW_START = "<|BEGIN-VISIBLE-CHAT|>"


def _st_date(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%B %d, %Y %I:%M%p").replace(" 0", " ").lower().capitalize()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat()


def _from_iso(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else None
    except ValueError:
        return None


def _st_time(value: Any) -> float | None:
    """A SillyTavern date as it has written them over the years: "November 30, 2026 10:05am",
    ISO 8601, "2026-11-30@10h05m03s" (create_date), or epoch milliseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1000 if value > 1e11 else float(value)
    text = str(value or "").strip()
    for fmt in ("%B %d, %Y %I:%M%p", "%B %d, %Y %I:%M %p", "%Y-%m-%d@%Hh%Mm%Ss", "%Y-%m-%d @%Hh %Mm %Ss %fms"):
        try:
            return datetime.strptime(text, fmt).timestamp()
        except ValueError:
            pass
    return _from_iso(text)


def character_name(text: str) -> str | None:
    """Whom a chat file says the chat is with (SillyTavern's `character_name`, else the first
    character message's name); None when it does not say (text-generation-webui histories)."""
    rows = json_lines(text)
    if not any("mes" in row for row in rows):
        return None
    meta = rows[0] if "mes" not in rows[0] else {}
    name = meta.get("character_name") or next((r.get("name") for r in rows if "mes" in r and not r.get("is_user")),
                                              None)
    return str(name) if name else None


def export_sillytavern(store: Store, chat_id: int) -> str:
    info = store.chat(chat_id)
    _, char = store.character(info.character_id)
    lines = [{"user_name": info.user_name, "character_name": char.name,
              "create_date": datetime.fromtimestamp(info.created_at).strftime("%Y-%m-%d@%Hh%Mm%Ss"),
              "chat_metadata": info.settings.get("chat_metadata", {})}]
    for m in store.messages(chat_id):
        reasoning = m.swipes[m.active].extra.get("reasoning")  # where SillyTavern keeps a thinking model's
        item: dict[str, Any] = {"name": m.name, "is_user": m.is_user, "is_system": False,
                                "send_date": _st_date(m.created_at), "mes": m.text,
                                "extra": {"reasoning": reasoning} if reasoning else {}}
        if not m.is_user:
            item["swipe_id"] = m.active
            item["swipes"] = [s.text for s in m.swipes]
            item["swipe_info"] = [{"send_date": _st_date(m.created_at), "gen_started": _iso(s.gen_started),
                                   "gen_finished": _iso(s.gen_finished), "extra": {**s.extra, "seed": s.seed}}
                                  for s in m.swipes]
            item["gen_started"], item["gen_finished"] = _iso(m.swipes[m.active].gen_started), \
                _iso(m.swipes[m.active].gen_finished)
        lines.append(item)
    return "\n".join(json.dumps(x, ensure_ascii=False) for x in lines)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL text; lines that do not parse are skipped, as ST does."""
    rows = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def import_sillytavern(store: Store, text: str, character_id: int, where: str = "chat file") -> int:
    rows = json_lines(text)
    if not rows:
        raise GalateaError(f"{where}: no SillyTavern chat lines found (expected JSON objects, one per line)")
    meta = rows[0] if "mes" not in rows[0] else {}
    messages = [r for r in rows if "mes" in r and not r.get("is_system")]
    user = str(meta.get("user_name") or next((r["name"] for r in messages if r.get("is_user")), "You"))
    dates = [_st_time(r.get("send_date")) for r in messages]
    began = _st_time(meta.get("create_date")) or next((d for d in dates if d), None)
    chat_id = store.new_chat(character_id, user_name=user, greeting=False, created_at=began,
                             title=f"{meta.get('character_name', 'chat')} (imported)")
    for r, date in zip(messages, dates, strict=True):
        swipes = r.get("swipes") if isinstance(r.get("swipes"), list) and r.get("swipes") else [r.get("mes", "")]
        infos = r.get("swipe_info") if isinstance(r.get("swipe_info"), list) else []
        built = []
        for i, s in enumerate(swipes):
            info = infos[i] if i < len(infos) and isinstance(infos[i], dict) else {}
            extra = info.get("extra") if isinstance(info.get("extra"), dict) else {}
            own = r.get("extra") if isinstance(r.get("extra"), dict) else {}
            if not infos and isinstance(own.get("reasoning"), str) and own["reasoning"]:
                extra = {**extra, "reasoning": own["reasoning"]}  # a single reply's thinking, on the message
            seed = extra.get("seed") if isinstance(extra.get("seed"), int) else None
            built.append(Swipe(str(s), seed, _from_iso(info.get("gen_started")), _from_iso(info.get("gen_finished")),
                               {k: v for k, v in extra.items() if k != "seed"}))
        active = r.get("swipe_id") if isinstance(r.get("swipe_id"), int) else 0
        active = max(0, min(active, len(built) - 1))
        name = str(r.get("name") or (user if r.get("is_user") else "?"))
        store.add_message_swipes(chat_id, bool(r.get("is_user")), name, built, active, created_at=date)
    return chat_id


def export_textgen(store: Store, chat_id: int) -> str:
    pairs: list[list[str]] = []
    msgs: list[Message] = store.messages(chat_id)
    i = 0
    if msgs and not msgs[0].is_user:
        pairs.append([TGW_START, msgs[0].text])
        i = 1
    while i < len(msgs):
        m = msgs[i]
        if m.is_user:
            reply = msgs[i + 1] if i + 1 < len(msgs) and not msgs[i + 1].is_user else None
            pairs.append([m.text, reply.text if reply else ""])
            i += 2 if reply else 1
        else:  # two character messages in a row: the second gets an empty user turn
            pairs.append(["", m.text])
            i += 1
    visible = [[html.escape(u) if u != TGW_START else u, html.escape(b)] for u, b in pairs]
    return json.dumps({"internal": pairs, "visible": visible}, ensure_ascii=False, indent=2)


def import_textgen(store: Store, text: str, character_id: int, user_name: str = "You",
                   where: str = "history file") -> int:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise GalateaError(f"{where}: not JSON ({e.msg}); expected a text-generation-webui history") from None
    if not isinstance(obj, dict):
        raise GalateaError(f"{where}: expected an object with 'internal' or 'visible' [user, bot] pairs")
    # "internal" holds the raw text; "visible" (and older "data_visible") is HTML-escaped.
    raw, escaped = obj.get("internal") or obj.get("data"), obj.get("visible") or obj.get("data_visible")
    pairs = raw if isinstance(raw, list) else escaped
    if not isinstance(pairs, list):
        raise GalateaError(f"{where}: no 'internal' or 'visible' list of [user, bot] pairs")
    unescape = html.unescape if pairs is escaped else str
    _, char = store.character(character_id)
    chat_id = store.new_chat(character_id, user_name=user_name, greeting=False, title=f"{char.name} (imported)")
    now = time.time()
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            continue
        u, b = (unescape(str(x)) for x in pair)
        if u and u != TGW_START:
            store.add_message_swipes(chat_id, True, user_name, [Swipe(u)])
        if b:
            store.add_message_swipes(chat_id, False, char.name, [Swipe(b, gen_finished=now)])
    return chat_id


def import_chat(store: Store, text: str, character_id: int, where: str = "chat file") -> int:
    """A chat file of either kind, told apart by its content: SillyTavern JSONL has messages
    with a "mes" field; anything else is read as a text-generation-webui history."""
    if any("mes" in row for row in json_lines(text)):
        return import_sillytavern(store, text, character_id, where=where)
    return import_textgen(store, text, character_id, where=where)
