"""Character cards: every format, round trips, PNG chunks (checked with Pillow as the
independent PNG reader/writer), and broken cards."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import asdict

import pytest
from PIL import Image, PngImagePlugin

from galatea.chat.cards import Character, load_character, read_card
from galatea.errors import GalateaError

V2 = {
    "spec": "chara_card_v2", "spec_version": "2.0",
    "data": {
        "name": "Mira", "description": "A witch.", "personality": "sly", "scenario": "A tower.",
        "first_mes": "Welcome.", "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello.",
        "creator_notes": "notes", "system_prompt": "", "post_history_instructions": "",
        "alternate_greetings": ["Oh, hello."], "tags": ["fantasy"], "creator": "me", "character_version": "1",
        "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "x", "depth": 4}},
        "character_book": {"name": "lore", "entries": [{"keys": ["tower"], "content": "Tall.", "enabled": True,
                                                        "insertion_order": 1, "extensions": {"depth": 2}}]},
        "some_future_key": {"kept": True},
    },
}


def card_fields(c: Character) -> dict:
    d = asdict(c)
    d.pop("image")
    d.pop("source_format")
    return d


def png(texts: dict[str, str] | None = None, itxt: dict[str, str] | None = None, ztxt: bool = False) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (texts or {}).items():
        info.add_text(k, v, zip=ztxt)
    for k, v in (itxt or {}).items():
        info.add_itxt(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 50, 50)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def b64(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def test_v2_json_round_trip_keeps_extensions_and_unknown_keys():
    c = read_card(json.dumps(V2).encode())
    assert c.name == "Mira" and c.source_format == "v2"
    assert c.extensions == V2["data"]["extensions"] and c.extra == {"some_future_key": {"kept": True}}
    out = c.to_v2()
    assert out["data"]["some_future_key"] == {"kept": True}
    assert out["data"]["extensions"]["depth_prompt"] == {"prompt": "x", "depth": 4}
    assert out["name"] == "Mira" and out["first_mes"] == "Welcome."  # V1 fields repeated on top
    assert out["data"]["character_book"]["entries"][0]["extensions"] == {"depth": 2}
    again = read_card(json.dumps(out).encode())
    assert card_fields(again) == card_fields(c)


def test_v3_json():
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0",
          "data": {**V2["data"], "nickname": "Mi", "group_only_greetings": [], "assets": []}}
    c = read_card(json.dumps(v3).encode())
    assert c.source_format == "v3" and c.extra["nickname"] == "Mi"
    assert read_card(json.dumps(c.to_v3()).encode()).extra["nickname"] == "Mi"


def test_v1_json():
    c = read_card(json.dumps({"name": "Old", "description": "d", "personality": "p", "scenario": "s",
                              "first_mes": "f", "mes_example": "e", "avatar": "none"}).encode())
    assert (c.name, c.description, c.personality, c.scenario, c.first_mes, c.mes_example) == \
        ("Old", "d", "p", "s", "f", "e")
    assert c.source_format == "v1" and c.extra == {"avatar": "none"}


def test_gradio_pygmalion_json():
    c = read_card(json.dumps({"char_name": "Pyg", "char_persona": "persona", "char_greeting": "hi",
                              "world_scenario": "world", "example_dialogue": "You: a\nPyg: b"}).encode())
    assert (c.name, c.description, c.first_mes, c.scenario, c.mes_example, c.personality) == \
        ("Pyg", "persona", "hi", "world", "You: a\nPyg: b", "")


def test_textgen_yaml_and_json():
    y = b"name: Chiharu\ngreeting: Hey!\ncontext: |-\n  Chiharu's Persona: A programmer.\n  {{user}}: hi\n"
    c = read_card(y)
    assert (c.name, c.first_mes, c.source_format) == ("Chiharu", "Hey!", "textgen")
    assert c.description == "A programmer.\n{{user}}: hi"
    j = read_card(json.dumps({"name": "T", "greeting": "g", "context": "c"}).encode())
    assert (j.name, j.first_mes, j.description) == ("T", "g", "c")


def test_png_chara_and_ccv3_preference():
    v3 = {"spec": "chara_card_v3", "data": {**V2["data"], "name": "FromV3"}}
    assert read_card(png({"chara": b64(V2)})).name == "Mira"
    assert read_card(png({"chara": b64(V2), "ccv3": b64(v3)})).name == "FromV3"
    assert read_card(png({"Chara": b64(V2)})).name == "Mira"  # keyword case-insensitive


def test_png_itxt_and_ztxt():
    assert read_card(png(itxt={"chara": b64(V2)})).name == "Mira"
    assert read_card(png({"chara": b64(V2)}, ztxt=True)).name == "Mira"


def test_png_export_round_trip_read_by_pillow():
    c = read_card(json.dumps(V2).encode())
    data = c.to_png()  # no image: a generated placeholder
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (400, 600)
    chara = json.loads(base64.b64decode(img.text["chara"]))
    ccv3 = json.loads(base64.b64decode(img.text["ccv3"]))
    assert chara["spec"] == "chara_card_v2" and ccv3["spec"] == "chara_card_v3"
    again = read_card(data)
    assert card_fields(again) == card_fields(c)
    # exporting a PNG card keeps its picture and replaces (does not duplicate) the card chunks
    twice = again.to_png()
    img2 = Image.open(io.BytesIO(twice))
    img2.load()
    assert img2.size == (400, 600) and list(img2.text) == ["chara", "ccv3"]


def test_messy_cards_are_read_leniently():
    messy = {"spec": "chara_card_v2", "data": {"data": {
        "name": "Nest", "description": None, "personality": ["line one", "line two"], "scenario": 42,
        "alternate_greetings": "just one", "tags": "a, b", "first_mes": None, "extensions": None}}}
    c = read_card(json.dumps(messy).encode())
    assert c.name == "Nest" and c.description == "" and c.personality == "line one\nline two"
    assert c.scenario == "42" and c.alternate_greetings == ["just one"] and c.tags == ["a", "b"]


@pytest.mark.parametrize("data,message", [
    (json.dumps({"spec": "chara_card_v2", "data": {"name": "X", "description": {"a": 1}}}).encode(),
     "field 'description' should be text"),
    (json.dumps({"spec": "chara_card_v2", "data": {"name": ""}}).encode(), "field 'name' is empty"),
    (json.dumps({"hello": "world"}).encode(), "not a character card"),
    (json.dumps([1, 2]).encode(), "must be a JSON/YAML object"),
    (b"{not json", "card JSON is invalid"),
    (b"\xff\xfe\x00garbage\x80", "not a character card"),
    (json.dumps({"spec": "chara_card_v2", "data": {"name": "X", "character_book": "nope"}}).encode(),
     "'character_book' must be an object"),
])
def test_broken_json_cards(data, message):
    with pytest.raises(GalateaError, match=message):
        read_card(data, where="card.json")


def test_broken_png_cards():
    with pytest.raises(GalateaError, match=r"not valid base64 UTF-8|card JSON is invalid"):
        read_card(png({"chara": "!!!not base64!!!"}))
    with pytest.raises(GalateaError, match="no character card"):
        read_card(png())
    good = png({"chara": b64(V2)})
    with pytest.raises(GalateaError, match="truncated PNG"):
        read_card(good[: len(good) // 2])


def test_compressed_text_bomb_is_refused():
    """A zTXt chunk that inflates past the limit is refused instead of filling memory."""
    body = b"chara\x00\x00" + zlib.compress(b"A" * (80 << 20), 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    data = png()
    data = data[:-12] + chunk + data[-12:]  # before IEND
    with pytest.raises(GalateaError, match="corrupt"):
        read_card(data)


def test_huge_plain_text_chunk_still_reads():
    big = {**V2, "data": {**V2["data"], "description": "x" * (2 << 20)}}
    assert len(read_card(png({"chara": b64(big)})).description) == 2 << 20


def test_bundled_character_is_the_default():
    c = load_character(None)
    assert c.name == "Aria" and c.first_mes and c.mes_example and c.character_book
    with pytest.raises(GalateaError, match="no bundled character"):
        load_character("nobody-here")
