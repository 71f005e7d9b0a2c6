"""`galatea bench --xor`: XOR apply throughput against the original codec's algorithm.

The original (`xor_codec.py`) reads 4096-byte blocks, turns each into a numpy array via
`bytearray`, pads or truncates the base block, XORs, and writes: one Python loop step per 4 KiB.
It is reproduced here only to be timed on the same files."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from galatea.weights.xor import apply


def original_xor(dst: Path, payload: Path, base: Path, block_size: int = 4096) -> None:
    with open(payload, "rb") as fp_payload, open(base, "rb") as fp_base, open(dst, "wb") as fp:
        while True:
            buf1 = np.array(bytearray(fp_payload.read(block_size)), dtype=np.uint8)
            buf2 = np.array(bytearray(fp_base.read(block_size)), dtype=np.uint8)
            padding = len(buf1) - len(buf2)
            if padding > 0:
                buf2 = np.pad(buf2, (0, padding), "constant", constant_values=(0,))
            if padding < 0:
                buf2 = buf2[: len(buf1)]
            buf = np.bitwise_xor(buf1, buf2)
            fp.write(buf.tobytes())
            if len(buf1) < block_size:
                break


def bench_xor(size_mb: int = 1024, workdir: str | None = None) -> dict[str, Any]:
    """Time both on one random payload/base pair of `size_mb` MiB. Files are written first and
    each run reads them from the page cache, as a re-run on a machine with enough memory would."""
    size = size_mb << 20
    with tempfile.TemporaryDirectory(dir=workdir, prefix="galatea-xor-bench-") as tmp:
        root = Path(tmp)
        (root / "payload").mkdir()
        (root / "base").mkdir()
        rng = np.random.default_rng(0)
        for folder in ("payload", "base"):
            with open(root / folder / "pytorch_model.bin", "wb") as f:
                for _ in range(0, size, 64 << 20):
                    f.write(rng.integers(0, 256, size=min(64 << 20, size), dtype=np.uint8).tobytes())
        payload, base = root / "payload" / "pytorch_model.bin", root / "base" / "pytorch_model.bin"

        os.sync()  # every timed run starts with no dirty pages from the previous one
        t = time.perf_counter()
        original_xor(root / "original.bin", payload, base)
        original_s = time.perf_counter() - t
        os.sync()
        original_synced_s = time.perf_counter() - t
        os.remove(root / "original.bin")

        os.sync()
        t = time.perf_counter()
        apply(root / "payload", root / "base", root / "out", manifest="none", log=lambda s: None)
        galatea_s = time.perf_counter() - t
        shutil.rmtree(root / "out")
        os.sync()
        t = time.perf_counter()
        apply(root / "payload", root / "base", root / "out", manifest="none", log=lambda s: None, durable=False)
        cached_s = time.perf_counter() - t
    mb = size / 1e6
    return {
        "bench": "xor apply", "size_mb": round(mb, 1),
        "original_s": round(original_s, 2), "original_mb_s": round(mb / original_s, 1),
        "original_then_sync_s": round(original_synced_s, 2),
        "original_then_sync_mb_s": round(mb / original_synced_s, 1),
        "galatea_s": round(galatea_s, 2), "galatea_mb_s": round(mb / galatea_s, 1),
        "speedup": round(original_synced_s / galatea_s, 1),
        "galatea_no_fsync_s": round(cached_s, 2), "galatea_no_fsync_mb_s": round(mb / cached_s, 1),
        "speedup_no_fsync": round(original_s / cached_s, 1),
        "note": "galatea hashes the output (sha256) and by default fsyncs it before renaming it into place, so "
                "galatea_s is bound by the disk's write speed: compare it with original_then_sync_s (the original, "
                "then its file on disk); original_s and galatea_no_fsync_s both leave the output in the page cache",
    }
