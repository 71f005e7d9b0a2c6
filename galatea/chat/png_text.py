"""Text chunks of PNG files: the carriers of character cards.

Cards live in `tEXt` chunks (keyword `ccv3` or `chara`, base64 JSON); some tools write `iTXt` or
`zTXt`. Chunks are walked by hand (length, type, data, CRC) so a truncated or odd file gives a
precise error instead of a decoder exception, and writing keeps every other chunk byte for byte.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Container, Iterator

from galatea.errors import GalateaError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A card's JSON is kilobytes (a large lorebook: a few MB); refuse absurd chunks instead of
# inflating them, and stop once the chunks read add up to MAX_TOTAL.
MAX_TEXT = 16 << 20
MAX_TOTAL = 32 << 20


def is_png(data: bytes) -> bool:
    return data.startswith(SIGNATURE)


def _chunks(data: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    pos = len(SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise GalateaError(f"{where}: truncated PNG (a chunk header is cut off); the file is incomplete")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise GalateaError(f"{where}: truncated PNG (chunk {kind.decode('latin-1')!r} is cut off); "
                               "the file is incomplete")
        yield kind, data[pos + 8 : pos + 8 + length]
        pos = end
        if kind == b"IEND":
            return
    raise GalateaError(f"{where}: truncated PNG (no IEND chunk); the file is incomplete")


def read_text_chunks(data: bytes, where: str = "PNG", keys: Container[str] | None = None) -> dict[str, str]:
    """keyword (lower-cased) -> text, from tEXt, zTXt and iTXt chunks; the first of a keyword
    wins. With `keys`, only those keywords are decoded (the others are never inflated)."""
    if not is_png(data):
        raise GalateaError(f"{where}: not a PNG file")
    out: dict[str, str] = {}
    total = 0
    for kind, body in _chunks(data, where):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        keyword, sep, rest = body.partition(b"\0")
        if not sep:
            continue
        key = keyword.decode("latin-1").lower()
        if key in out or (keys is not None and key not in keys):
            continue
        try:
            text = _decode(kind, rest)
        except (zlib.error, UnicodeDecodeError, ValueError) as e:
            raise GalateaError(f"{where}: PNG text chunk {key!r} is corrupt ({e})") from None
        total += len(text)
        if total > MAX_TOTAL:
            raise GalateaError(f"{where}: the PNG's text chunks hold over {MAX_TOTAL >> 20} MiB; not a card file")
        out[key] = text
    return out


def _decode(kind: bytes, rest: bytes) -> str:
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":  # compression method byte, then zlib data
        return _inflate(rest[1:]).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, utf-8 text
    flag, rest = rest[0], rest[2:]
    _, _, rest = rest.partition(b"\0")
    _, _, text = rest.partition(b"\0")
    return (_inflate(text) if flag else text).decode("utf-8")


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_TEXT)
    if d.unconsumed_tail:
        raise ValueError(f"text larger than {MAX_TEXT >> 20} MiB")
    return out


def write_text_chunks(data: bytes, texts: dict[str, str], where: str = "PNG") -> bytes:
    """The PNG with `texts` as tEXt chunks before IEND, replacing any chunk of those keywords."""
    drop = {k.lower() for k in texts}
    out = bytearray(SIGNATURE)
    for kind, body in _chunks(data, where):
        if kind in (b"tEXt", b"zTXt", b"iTXt") and body.partition(b"\0")[0].decode("latin-1").lower() in drop:
            continue
        if kind == b"IEND":
            for key, text in texts.items():
                out += _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
        out += _chunk(kind, body)
    return bytes(out)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
