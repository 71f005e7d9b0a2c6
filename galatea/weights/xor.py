"""XOR weight releases: rebuild a fine-tune from its payload, or make a payload to share one.

Byte-compatible with the codec PygmalionAI and OpenAssistant published (`xor_codec.py`): for each
file of the payload folder (flat), output = payload XOR the base file of the same name; the payload
drives the length (a shorter base is zero-padded, a longer one truncated). Payload `.json` files
that are plain JSON are copied as they are (PygmalionAI's "don't XOR the JSON files"); gzip
payloads (the codec's `--compress` variant) are recognised by their header and read through gzip.

Unlike the original (4 KiB blocks in a Python loop), files are streamed in large chunks XORed by
numpy, digests are computed in the same pass, and each output is written under a temporary name
and renamed only when complete, so an interrupted run never leaves a plausible broken file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from galatea import progress
from galatea.errors import GalateaError
from galatea.files import atomic_write
from galatea.progress import Progress
from galatea.weights.manifest import (
    ALGORITHMS,
    MANIFEST_NAME,
    Check,
    Manifest,
    check_file,
    choose_manifest,
    digests,
    needed_algorithms,
    verify_folder,
)

CHUNK = 16 << 20  # bytes per XOR step: large enough that numpy and syscalls dominate, not Python
_GZIP_MAGIC = b"\x1f\x8b\x08"
_MAX_JSON = 256 << 20



@dataclass
class PayloadFile:
    name: str
    path: Path
    compressed: bool
    copy: bool  # a plain JSON file, copied as it is
    size: int   # bytes of output it gives (for gzip: from the gzip trailer, mod 4 GiB, or a guess)


@dataclass
class ApplyResult:
    files: list[str]
    written: dict[str, dict[str, Any]]  # output file -> {"size", "md5", "sha256"}
    manifest: Manifest | None
    base_checks: list[Check] = field(default_factory=list)
    output_checks: list[Check] = field(default_factory=list)


# ---- reading payloads --------------------------------------------------------------------------

def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(_GZIP_MAGIC):
        return False
    try:  # a raw payload may start with the magic bytes by chance; gzip data must also inflate
        zlib.decompressobj(wbits=31).decompress(head, 1 << 16)
        return True
    except zlib.error:
        return False


def _open_payload(pf: PayloadFile) -> IO[bytes]:
    return gzip.open(pf.path, "rb") if pf.compressed else open(pf.path, "rb")


def _plain_json(pf: PayloadFile) -> bool:
    if not pf.name.endswith(".json"):
        return False
    with _open_payload(pf) as f:
        data = f.read(_MAX_JSON + 1)
    if len(data) > _MAX_JSON:
        return False
    try:
        json.loads(data.decode("utf-8"))
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def scan_payload(payload_dir: Path) -> list[PayloadFile]:
    """The payload's files (flat, like the original codec), with how each is to be decoded."""
    _need_dir(payload_dir, "payload")
    files = []
    for path in sorted(payload_dir.iterdir()):
        if not path.is_file() or path.name == MANIFEST_NAME or path.name.startswith("."):
            continue
        compressed = _is_gzip(path)
        size = path.stat().st_size
        if compressed:
            with open(path, "rb") as f:  # ISIZE: the uncompressed size mod 2**32
                f.seek(-4, 2)
                isize = int.from_bytes(f.read(4), "little")
            size = max(isize, size)
        pf = PayloadFile(path.name, path, compressed, False, size)
        pf.copy = _plain_json(pf)
        files.append(pf)
    if not files:
        raise GalateaError(f"{payload_dir}: the payload folder has no files; pass the folder holding the XOR files")
    return files


def _need_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise GalateaError(f"{path}: {what} folder not found")
    if not path.is_dir():
        raise GalateaError(f"{path}: is a file; the {what} must be a folder")


# ---- streaming XOR -----------------------------------------------------------------------------

class _Hasher:
    """md5 and sha256 of a stream, updated on a worker thread (hashlib releases the GIL), so
    hashing overlaps the next chunk's read and XOR."""

    def __init__(self, pool: ThreadPoolExecutor, algorithms: tuple[str, ...]) -> None:
        self.pool = pool
        self.algorithms = algorithms
        self.hashes = [hashlib.new(a) for a in algorithms]
        self.pending: list[Any] = []
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.wait()
        self.size += len(data)
        self.pending = [self.pool.submit(h.update, data) for h in self.hashes]

    def wait(self) -> None:
        for p in self.pending:
            p.result()
        self.pending = []

    def result(self) -> dict[str, Any]:
        self.wait()
        return {"size": self.size, **{a: h.hexdigest() for a, h in zip(self.algorithms, self.hashes, strict=True)}}


def xor_stream(src: IO[bytes], base: IO[bytes] | None, dst: IO[bytes], pool: ThreadPoolExecutor,
               progress: Progress | None = None, algorithms: tuple[str, ...] = ALGORITHMS) -> dict[str, Any]:
    """dst = src XOR base (no base: a copy), src driving the length; returns the digests of
    what was written.

    Two buffer pairs alternate: chunk i is read and XORed into one pair while chunk i-1, in the
    other, is still being hashed on the pool."""
    out_hash = _Hasher(pool, algorithms)
    bufs = [(np.empty(CHUNK, np.uint8), np.empty(CHUNK, np.uint8)) for _ in range(2)]
    i = 0
    while True:
        a, b = bufs[i % 2]
        n = src.readinto(memoryview(a)) or 0
        if not n:
            break
        if base is not None:
            m = base.readinto(memoryview(b)[:n]) or 0
            if m < n:  # base shorter than the payload: zero-padded, the payload passes through
                b[m:n] = 0
            np.bitwise_xor(a[:n], b[:n], out=a[:n])
        chunk = memoryview(a)[:n]
        out_hash.update(chunk)  # waits for chunk i-1's hash, then hashes chunk i in the background
        dst.write(chunk)
        if progress:
            progress(n)
        i += 1
    return out_hash.result()


def _prepare_out(out_dir: Path, names: list[str], needed: int, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GalateaError(f"{out_dir}: is a file; the output must be a folder")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not force:
        raise GalateaError(f"{out_dir}: already holds {', '.join(existing[:3])}"
                           + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
                           + "; pass --force to overwrite or choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    reclaimed = sum((out_dir / n).stat().st_size for n in existing)
    if needed - reclaimed > free:
        raise GalateaError(f"{out_dir}: needs {_gb(needed - reclaimed)} of free space and has {_gb(free)}; "
                           "free some space or choose another output folder")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ---- apply -------------------------------------------------------------------------------------

def apply(payload_dir: Path, base_dir: Path, out_dir: Path, *, force: bool = False,
          manifest: str | None = None, check_base: bool = True, log: Callable[[str], None] = print,
          progress_factory: Callable[[str, int], Any] | None = None, durable: bool = True) -> ApplyResult:
    """Rebuild a model: out_dir/name = payload_dir/name XOR base_dir/name for each payload file.
    `durable` fsyncs each file before renaming it into place (off only for benchmarks)."""
    files = scan_payload(payload_dir)
    _need_dir(base_dir, "base")
    xored = [pf for pf in files if not pf.copy]
    missing = [pf.name for pf in xored if not (base_dir / pf.name).is_file()]
    if missing:
        raise GalateaError(f"{base_dir}: the base has no {', '.join(missing)}, which the payload XORs against; "
                           "pass the folder of the converted base model")
    chosen = choose_manifest(manifest, [pf.name for pf in files], payload_dir)
    result = ApplyResult([pf.name for pf in files], {}, chosen)
    if chosen:
        log(f"checksums: {chosen.name}" + (f" ({chosen.description})" if chosen.description else ""))
    else:
        log("checksums: no manifest matches this payload, outputs are not verified (pass --manifest)")

    # Before writing anything: the base files that will be XORed, against known checksums.
    if chosen and check_base:
        expected = {pf.name: chosen.base[pf.name] for pf in xored if pf.name in chosen.base}
        if expected:
            total = sum((base_dir / n).stat().st_size for n in expected)
            with progress.bar(progress_factory, "checking base", total) as bar:
                result.base_checks = verify_folder(base_dir, expected, chosen.base_hint, progress=bar)
            bad = [c for c in result.base_checks if not c.ok]
            if bad:
                return result  # the caller prints the table; nothing was written

    _prepare_out(out_dir, [pf.name for pf in files], sum(pf.size for pf in files), force)
    total = sum(pf.size for pf in files)
    with ThreadPoolExecutor(max_workers=len(ALGORITHMS)) as pool, progress.bar(progress_factory, "xor", total) as bar:
        for pf in files:
            algos = needed_algorithms(chosen.output.get(pf.name) if chosen else None)

            def body(dst: IO[bytes], pf: PayloadFile = pf, algos: tuple[str, ...] = algos) -> dict[str, Any]:
                with _open_payload(pf) as src:
                    if pf.copy:
                        return xor_stream(src, None, dst, pool, bar, algos)
                    with open(base_dir / pf.name, "rb") as base:
                        return xor_stream(src, base, dst, pool, bar, algos)

            try:
                result.written[pf.name] = atomic_write(out_dir / pf.name, body, durable)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise GalateaError(f"{pf.path}: corrupt or truncated gzip payload ({e}); download it again") from None

    if chosen:
        expected = {n: chosen.output[n] for n in result.files if n in chosen.output}
        result.output_checks = [check_file(out_dir / n, expected[n], got=result.written[n]) for n in sorted(expected)]
        unknown = sorted(set(result.files) - set(expected))
        result.output_checks += [Check(n, True, "unchecked", "no checksum in the manifest") for n in unknown]
    for pf in xored:  # a JSON file that was XORed must come out as JSON
        if pf.name.endswith(".json") and not _valid_json_file(out_dir / pf.name):
            result.output_checks.append(Check(pf.name, False, "differs",
                                              f"{pf.name} is not valid JSON after XOR: the base's {pf.name} "
                                              "differs (Windows line endings?)"))
    return result


def _valid_json_file(path: Path) -> bool:
    try:
        json.loads(path.read_bytes().decode("utf-8"))
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


# ---- create ------------------------------------------------------------------------------------

def create(finetune_dir: Path, base_dir: Path, out_dir: Path, *, compress: bool = False, force: bool = False,
           name: str | None = None, progress_factory: Callable[[str, int], Any] | None = None) -> Manifest:
    """Make a payload: out_dir/name = finetune_dir/name XOR base_dir/name (gzip-compressed with
    `compress`), JSON files copied as they are; and out_dir/xor-manifest.json with the checksums of the
    base files used, of the files `apply` must rebuild, and of the payload itself."""
    _need_dir(finetune_dir, "fine-tune")
    _need_dir(base_dir, "base")
    sources = [p for p in sorted(finetune_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not sources:
        raise GalateaError(f"{finetune_dir}: the fine-tune folder has no files")
    copies = {p.name for p in sources if p.suffix == ".json"}
    missing = [p.name for p in sources if p.name not in copies and not (base_dir / p.name).is_file()]
    if missing:
        raise GalateaError(f"{base_dir}: the base has no {', '.join(missing)}; every non-JSON file of the fine-tune "
                           "is XORed against the base file of the same name (remove the file or add it to the base)")
    needed = sum(p.stat().st_size for p in sources)
    _prepare_out(out_dir, [p.name for p in sources] + [MANIFEST_NAME], needed, force)

    manifest = Manifest(name=name or finetune_dir.name,
                        description=f"{finetune_dir.name} as an XOR payload against {base_dir.name}",
                        base_hint=f"the payload was made against {base_dir.name}; use exactly those files")
    payload: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=len(ALGORITHMS)) as pool, \
            progress.bar(progress_factory, "xor", needed) as bar:
        for src_path in sources:
            gz = compress and src_path.name not in copies  # JSON stays plain, as PygmalionAI's codec had it

            def body(dst: IO[bytes], src_path: Path = src_path, gz: bool = gz) -> dict[str, Any]:
                sink: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=dst, compresslevel=6, mtime=0) \
                    if gz else dst
                with open(src_path, "rb") as src:
                    if src_path.name in copies:
                        got = xor_stream(src, None, sink, pool, bar)
                    else:
                        with open(base_dir / src_path.name, "rb") as base:
                            got = xor_stream(src, base, sink, pool, bar)
                if gz:
                    sink.close()  # writes the gzip trailer; `dst` stays open
                return got

            written = atomic_write(out_dir / src_path.name, body, durable=True)
            payload[src_path.name] = digests(out_dir / src_path.name) if gz else written
            manifest.output[src_path.name] = digests(src_path)
            if src_path.name not in copies:
                manifest.base[src_path.name] = digests(base_dir / src_path.name)
    (out_dir / MANIFEST_NAME).write_text(manifest.to_json(payload), encoding="utf-8")
    return manifest
