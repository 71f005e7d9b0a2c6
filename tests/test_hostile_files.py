"""Hostile and corrupt files get one line, fast, in bounded memory: card bombs (PNG text chunks
that inflate to gigabytes, YAML aliases, JSON nested thousands deep, lorebook numbers that are
text) and GGUF headers whose counts, sizes and numbers cannot be true."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from gguf import GGUFReader

from galatea.chat.cards import Character, placeholder_png, read_card
from galatea.errors import GalateaError
from galatea.model.checkpoint import load
from galatea.model.gguf_file import GGUFFile
from tests.checkpoints import hf_model, write_gguf


def card_png(bare: bool = False, **chunks: tuple[bytes, bytes]) -> bytes:
    """A PNG card (or a bare image) with extra raw chunks (any name -> (type, body))."""
    png = placeholder_png("x") if bare else Character(name="Ok", description="fine").to_png()
    end = png.rindex(b"IEND") - 4
    extra = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                     for kind, body in chunks.values())
    return png[:end] + extra + png[end:]


def zbomb(keyword: bytes, megabytes: int) -> tuple[bytes, bytes]:
    return b"zTXt", keyword + b"\0\0" + zlib.compress(b"A" * (megabytes << 20), 9)


def peak_rss_mb(code: str) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; its peak RSS in MB and what it printed. VmHWM belongs
    to the new address space (ru_maxrss would carry over the forking parent's, the test run's)."""
    tail = ("\nfor line in open('/proc/self/status'):\n    if line.startswith('VmHWM:'):\n"
            "        print('RSS', int(line.split()[1]) / 1024)")
    run = subprocess.run([sys.executable, "-c", code + tail], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rss = float(run.stdout.rsplit("RSS", 1)[1])
    return rss, run.stdout


@pytest.mark.slow
def test_png_text_bombs_are_never_inflated(tmp_path):
    """24 zTXt chunks of 60 MB each (1.4 GB inflated, 1.5 MB on disk) beside a real card: the
    card imports, and the other chunks are never inflated (peak RSS bounded)."""
    bombs = {f"b{i}": zbomb(f"junk{i}".encode(), 60) for i in range(24)}
    path = tmp_path / "bomb.png"
    path.write_bytes(card_png(**bombs))
    assert path.stat().st_size < 3 << 20
    rss, out = peak_rss_mb(f"from galatea.chat.cards import read_card\nprint(read_card(open({str(path)!r}, 'rb')"
                           ".read()).name)")
    assert "Ok" in out and rss < 700, rss
    inner = tmp_path / "chara-bomb.png"
    inner.write_bytes(card_png(bare=True, c=zbomb(b"chara", 40)))  # the card's own chunk is the bomb
    rss, out = peak_rss_mb(f"from galatea.chat.cards import read_card\nfrom galatea.errors import GalateaError\n"
                           f"try:\n    read_card(open({str(inner)!r}, 'rb').read())\n"
                           f"except GalateaError as e:\n    print('ERR', e)")
    assert "ERR" in out and "MiB" in out and rss < 700, (rss, out)


def test_a_yaml_alias_bomb_is_refused():
    bomb = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    for i in range(1, 9):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]\n"
    bomb += "name: Bomb\n"
    with pytest.raises(GalateaError) as e:
        read_card(bomb.encode(), "bomb.yaml")
    assert "aliases" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_refused(depth):
    text = '{"name": "x", "data": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(GalateaError) as e:
        read_card(text.encode(), "deep.json")
    assert "nests" in str(e.value) and "\n" not in str(e.value)


def test_lorebook_numbers_that_are_text_are_refused_at_import():
    card = {"spec": "chara_card_v2", "data": {"name": "Lore", "description": "d", "character_book": {
        "scan_depth": "abc", "entries": [{"keys": ["k"], "content": "c"}]}}}
    with pytest.raises(GalateaError) as e:
        read_card(json.dumps(card).encode(), "lore.json")
    assert "character_book.scan_depth" in str(e.value)
    card["data"]["character_book"] = {"entries": [{"keys": ["k"], "content": "c", "insertion_order": [1]}]}
    with pytest.raises(GalateaError) as e:
        read_card(json.dumps(card).encode(), "lore.json")
    assert "entries[0].insertion_order" in str(e.value)
    card["data"]["character_book"] = {"scan_depth": "3", "entries": [{"keys": ["k"], "content": "c"}]}
    assert read_card(json.dumps(card).encode(), "lore.json").character_book["scan_depth"] == 3


# ---- GGUF ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(hf_model("gqa"), tmp_path_factory.mktemp("g") / "tiny.gguf")


@pytest.mark.parametrize("key,value,message", [
    ("llama.attention.head_count", 0, "num_attention_heads"),
    ("llama.context_length", 2**32 - 1, "max_position_embeddings"),
    ("llama.embedding_length", 0, "hidden_size"),
    ("llama.block_count", 2**31, "num_hidden_layers"),
])
def test_gguf_numbers_that_cannot_be_true_are_one_line(tiny_gguf, tmp_path, key, value, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    field = GGUFReader(str(path), "r+").fields[key]
    field.parts[field.data[0]][0] = value
    with pytest.raises(GalateaError) as e:
        load(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def gguf_bytes(n_tensors: int, kvs: bytes, n_kv: int, tensors: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors + b"\0" * 64


def key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("data,message", [
    (gguf_bytes(0, key("general.alignment") + struct.pack("<II", 4, 0), 1), "alignment"),
    (gguf_bytes(0, b"", 2**60), "cannot fit"),
    (gguf_bytes(1, b"", 0, key("w") + struct.pack("<IQQ", 2, 2**32, 2**32) + struct.pack("<IQ", 0, 0)),
     "dimensions"),
    (gguf_bytes(0, key("deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 20_000, 1), "nest"),
    (gguf_bytes(0, key("s") + struct.pack("<IQ", 8, 2**62), 1), "past the end"),
])
def test_hostile_gguf_headers_are_one_line(tmp_path, data, message):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(GalateaError) as e:
        GGUFFile(path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
