"""The library behind the chat page: characters (import, edit, picture, export, delete) and
lorebooks (import SillyTavern world info, edit entries, attach to a character or a chat).
The same store as the terminal's `galatea characters` and `galatea lorebooks`."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import Field

from galatea.chat.cards import Character, from_object, placeholder_png, read_card
from galatea.chat.lorebooks import Lorebook, read_lorebook, to_world_info
from galatea.errors import GalateaError
from galatea.server.deps import ChatStore
from galatea.server.schemas import BadRequest, RequestBody, refused

RowId = Annotated[int, PathParam(ge=0, le=2**63 - 1)]
router = APIRouter(prefix="/galatea", tags=["Galatea library"])
MAX_PICTURE = 4096  # pixels per side an avatar may have


class Links(RequestBody):
    character_id: int | None = Field(default=None, ge=0, le=2**63 - 1)
    chat_id: int | None = Field(default=None, ge=0, le=2**63 - 1)
    attached: bool = True


class LorebookBody(RequestBody):
    name: str = Field(min_length=1, max_length=200)
    book: dict[str, Any]


def _not_found(e: GalateaError) -> Exception:
    return refused(e, "not_found", 404)


def _download(body: bytes, kind: str, name: str, suffix: str) -> Response:
    safe = "".join(c for c in name if c.isalnum() or c in " -_").strip() or "galatea"
    return Response(body, media_type=kind, headers={"Content-Disposition": f'attachment; filename="{safe}.{suffix}"'})


def _character(store: Any, character_id: int) -> Character:
    try:
        return store.character(character_id)[1]
    except GalateaError as e:
        raise _not_found(e) from None


def _lorebook(store: Any, lorebook_id: int) -> Lorebook:
    try:
        return store.lorebook(lorebook_id)[1]
    except GalateaError as e:
        raise _not_found(e) from None


# ---- characters --------------------------------------------------------------------------------

@router.get("/characters")
def characters(store: ChatStore) -> list[dict]:
    """Every character; `label` tells same-named ones apart ("Aria (2)", in import order)."""
    out, seen = [], {}
    for cid, name in sorted(store.characters(), key=lambda c: c[0]):
        char = store.character(cid)[1]
        seen[name.lower()] = seen.get(name.lower(), 0) + 1
        label = name if seen[name.lower()] == 1 else f"{name} ({seen[name.lower()]})"
        out.append({"id": cid, "name": name, "label": label, "description": char.description[:200],
                    "last_chat": store.last_chat(cid), "chats": len(store.chats(cid))})
    return sorted(out, key=lambda c: (c["name"].lower(), c["id"]))

@router.post("/characters")
async def import_character(request: Request, store: ChatStore,
                           copy: Annotated[bool, Query(description="import even if the same card is there")] = False,
                           ) -> dict:
    """A card file as the body. The same card again gives the character already there
    (`existing: true`) unless `copy` asks for a second one."""
    data = await request.body()
    if not data:
        raise BadRequest("send the card file (JSON, PNG or YAML) as the request body")

    def add() -> dict:  # parsing and the store off the event loop: a big card takes seconds
        try:
            char = read_card(data, where="uploaded card")
        except GalateaError as e:
            raise refused(e, "bad_card") from None
        existing = None if copy else store.find_character(char)
        if existing is not None:
            return {"id": existing, "name": char.name, "existing": True}
        return {"id": store.add_character(char), "name": char.name, "existing": False}

    return await asyncio.to_thread(add)

@router.get("/characters/{character_id}")
def character(character_id: RowId, store: ChatStore) -> dict:
    """Every field of the card (Character Card V2 `data`), for the editor."""
    char = _character(store, character_id)
    return {"id": character_id, "card": char.to_v2()["data"], "has_picture": char.image is not None,
            "chats": len(store.chats(character_id))}

@router.put("/characters/{character_id}")
def edit_character(character_id: RowId, card: dict[str, Any], store: ChatStore) -> dict:
    """Replace the card's fields with `card` (V2 `data` fields; what is left out keeps nothing
    but the lorebook and extensions, which the editor does not show)."""
    old = _character(store, character_id)
    merged = {"character_book": old.character_book, "extensions": old.extensions, **card}
    try:
        char = from_object({"spec": "chara_card_v2", "spec_version": "2.0", "data": merged}, where="the edited card")
    except GalateaError as e:
        raise refused(e, "bad_card") from None
    if not char.name.strip():
        raise BadRequest("the character needs a name")
    store.update_character(character_id, char)
    return {"id": character_id, "name": char.name}

@router.get("/characters/{character_id}/image")
def image(character_id: RowId, store: ChatStore) -> Response:
    char = _character(store, character_id)
    return Response(char.image or placeholder_png(char.name), media_type="image/png")

@router.put("/characters/{character_id}/image")
async def set_image(character_id: RowId, request: Request, store: ChatStore) -> dict:
    """A new picture (PNG, JPEG, WebP or GIF as the body), kept as PNG."""
    from PIL import Image, UnidentifiedImageError

    data = await request.body()

    def save() -> None:  # decoding a picture and the store off the event loop
        char = _character(store, character_id)
        try:
            with Image.open(io.BytesIO(data)) as im:
                if max(im.size) > MAX_PICTURE:
                    raise BadRequest(f"the picture is {im.size[0]}x{im.size[1]}; at most {MAX_PICTURE} pixels a side")
                out = io.BytesIO()
                im.convert("RGBA").save(out, "PNG")
        except (UnidentifiedImageError, OSError, ValueError):
            raise BadRequest("not a picture (send a PNG, JPEG, WebP or GIF file)", "bad_image") from None
        char.image = out.getvalue()
        store.update_character(character_id, char)

    await asyncio.to_thread(save)
    return {"ok": True}

@router.get("/characters/{character_id}/export")
def export_character(character_id: RowId, store: ChatStore,
                     format: Literal["png", "json"] = "png") -> Response:
    """The card as a PNG (the picture with the card inside, SillyTavern's) or V2 JSON."""
    char = _character(store, character_id)
    if format == "png":
        return _download(char.to_png(), "image/png", char.name, "png")
    return _download(json.dumps(char.to_v2(), indent=2, ensure_ascii=False).encode(), "application/json",
                     char.name, "json")

@router.delete("/characters/{character_id}")
def delete_character(character_id: RowId, store: ChatStore) -> dict:
    """The character and its chats (the page asks first)."""
    _character(store, character_id)
    store.delete_character(character_id)
    return {"ok": True}


# ---- lorebooks ---------------------------------------------------------------------------------

def _summary(store: Any, lid: int, book: Lorebook) -> dict:
    return {"id": lid, "name": book.name, "entries": len(book.entries), **store.lorebook_links(lid)}

@router.get("/lorebooks")
def lorebooks(store: ChatStore) -> list[dict]:
    return [_summary(store, lid, book) for lid, book in store.lorebooks()]

@router.post("/lorebooks")
async def import_lorebook(request: Request, store: ChatStore,
                          name: Annotated[str | None, Query(max_length=200)] = None) -> dict:
    """A SillyTavern world-info file (or a V2/V3 lorebook) as the body; `name` as the user
    called the file (world-info files carry no name of their own)."""
    data = await request.body()
    if not data:
        raise BadRequest("send the world-info file (JSON) as the request body")

    def add() -> dict:  # parsing and the store off the event loop
        try:
            book = read_lorebook(data, where="uploaded lorebook", name=name)
        except GalateaError as e:
            raise refused(e, "bad_lorebook") from None
        return _summary(store, store.add_lorebook(book), book)

    return await asyncio.to_thread(add)

@router.get("/lorebooks/{lorebook_id}")
def lorebook(lorebook_id: RowId, store: ChatStore) -> dict:
    book = _lorebook(store, lorebook_id)
    return {**_summary(store, lorebook_id, book), "book": book.book}

@router.put("/lorebooks/{lorebook_id}")
def edit_lorebook(lorebook_id: RowId, body: LorebookBody, store: ChatStore) -> dict:
    _lorebook(store, lorebook_id)
    try:
        book = read_lorebook(json.dumps(body.book).encode(), where="the edited lorebook", name=body.name)
    except GalateaError as e:
        raise refused(e, "bad_lorebook") from None
    store.update_lorebook(lorebook_id, book)
    return _summary(store, lorebook_id, book)

@router.put("/lorebooks/{lorebook_id}/links")
def link_lorebook(lorebook_id: RowId, body: Links, store: ChatStore) -> dict:
    """Attach the book to a character (all its chats) or one chat; `attached: false` detaches."""
    if (body.character_id is None) == (body.chat_id is None):
        raise BadRequest("give character_id or chat_id (one of the two)")
    try:
        store.attach_lorebook(lorebook_id, character_id=body.character_id, chat_id=body.chat_id,
                              attached=body.attached)
    except GalateaError as e:
        raise _not_found(e) from None
    return store.lorebook_links(lorebook_id)

@router.get("/lorebooks/{lorebook_id}/export")
def export_lorebook(lorebook_id: RowId, store: ChatStore) -> Response:
    """SillyTavern's world-info file of the book."""
    book = _lorebook(store, lorebook_id)
    return _download(json.dumps(to_world_info(book), indent=2, ensure_ascii=False).encode(), "application/json",
                     book.name, "json")

@router.delete("/lorebooks/{lorebook_id}")
def delete_lorebook(lorebook_id: RowId, store: ChatStore) -> dict:
    _lorebook(store, lorebook_id)
    store.delete_lorebook(lorebook_id)
    return {"ok": True}
