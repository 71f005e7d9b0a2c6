"""Checksum manifests: which bytes a model folder should hold, and what to say when it doesn't.

A manifest names a release and lists, for its `base` (the weights the XOR payload was made
against) and its `output` (the rebuilt model), each file's expected digests (md5 and/or sha256,
optionally its size). Built-in manifests carry the checksums PygmalionAI published;
`galatea xor create` writes one next to every payload it makes, and `galatea xor apply` picks it up.

Verification hashes each file once (md5 and sha256 in the same pass) and, for a file that
differs, says the likely cause instead of only "mismatch": a text file with Windows line
endings (checked by hashing it again with CRLF turned into LF), a truncated download (size), or
a `.bin` base converted by another transformers version (pickled shards are not byte-stable).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from galatea.errors import GalateaError

FORMAT = "galatea-xor-manifest/1"
MANIFEST_NAME = "xor-manifest.json"
ALGORITHMS = ("md5", "sha256")
TEXT_SUFFIXES = (".json", ".txt", ".md", ".yaml", ".yml")
_CHUNK = 8 << 20


@dataclass
class Manifest:
    name: str
    description: str = ""
    base: dict[str, dict[str, Any]] = field(default_factory=dict)    # file -> {"md5", "sha256", "size"}
    output: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_hint: str = ""  # how the base must have been made, said when a base file differs

    def to_json(self, payload: dict[str, dict[str, Any]] | None = None) -> str:
        doc: dict[str, Any] = {"format": FORMAT, "name": self.name, "description": self.description,
                               "base": {"hint": self.base_hint, "files": self.base},
                               "output": {"files": self.output}}
        if payload is not None:
            doc["payload"] = {"files": payload}
        return json.dumps(doc, indent=2) + "\n"


def builtin_names() -> list[str]:
    folder = resources.files("galatea.weights") / "manifests"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_manifest(spec: str) -> Manifest:
    """A built-in manifest by name, or a manifest JSON file by path."""
    if spec in builtin_names():
        text = (resources.files("galatea.weights") / "manifests" / f"{spec}.json").read_text(encoding="utf-8")
        return parse_manifest(text, spec)
    path = Path(spec)
    if not path.is_file():
        raise GalateaError(f"manifest {spec!r}: no such file and no built-in manifest of that name "
                           f"(built-in: {', '.join(builtin_names())})")
    return parse_manifest(path.read_text(encoding="utf-8", errors="replace"), str(path))


def parse_manifest(text: str, where: str) -> Manifest:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise GalateaError(f"{where}: not a manifest (invalid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GalateaError(f"{where}: not a Galatea XOR manifest (expected \"format\": \"{FORMAT}\")")

    def files(section: str) -> dict[str, dict[str, Any]]:
        got = (doc.get(section) or {}).get("files") or {}
        if not isinstance(got, dict) or not all(isinstance(v, dict) for v in got.values()):
            raise GalateaError(f"{where}: '{section}.files' must map file names to checksum objects")
        return got

    return Manifest(name=str(doc.get("name") or where), description=str(doc.get("description") or ""),
                    base=files("base"), output=files("output"),
                    base_hint=str((doc.get("base") or {}).get("hint") or ""))


def choose_manifest(spec: str | None, names: Iterable[str], payload_dir: Path | None = None) -> Manifest | None:
    """The manifest to verify against. `spec` "none" turns checking off; None means automatic:
    the payload folder's own manifest, else a built-in release whose files are exactly `names`
    (the 7B releases all share one file list, so that is the shape check, not an identity)."""
    if spec == "none":
        return None
    if spec:
        return load_manifest(spec)
    if payload_dir is not None and (payload_dir / MANIFEST_NAME).is_file():
        return load_manifest(str(payload_dir / MANIFEST_NAME))
    wanted = set(names)
    for name in builtin_names():
        m = load_manifest(name)
        if wanted == set(m.output):
            return m
    return None


def digests(path: Path, progress: Callable[[int], None] | None = None,
            algorithms: tuple[str, ...] = ALGORITHMS) -> dict[str, Any]:
    """The digests of a file (md5 and sha256 by default), and its size, in one read."""
    hashes = [hashlib.new(a) for a in algorithms]
    size = 0
    with open(path, "rb") as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            for h in hashes:
                h.update(view[:n])
            size += n
            if progress:
                progress(n)
    return {"size": size, **{a: h.hexdigest() for a, h in zip(algorithms, hashes, strict=True)}}


@dataclass
class Check:
    file: str
    ok: bool
    status: str  # "ok", "missing", "differs", "size", "unchecked"
    detail: str = ""


def matches(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    """Every digest both sides have agrees (at least one must be shared)."""
    shared = [a for a in ALGORITHMS if expected.get(a) and got.get(a)]
    return bool(shared) and all(expected[a].lower() == got[a] for a in shared)


def needed_algorithms(expected: dict[str, Any] | None) -> tuple[str, ...]:
    """The digests to compute to check `expected`: every one it lists (each runs on its own
    thread during XOR), or sha256 alone when nothing is expected."""
    listed = tuple(a for a in ALGORITHMS if expected and expected.get(a))
    return listed or ("sha256",)


def check_file(path: Path, expected: dict[str, Any], hint: str = "",
               got: dict[str, Any] | None = None) -> Check:
    """Compare one file with its expected digests and explain a difference."""
    name = path.name
    if not path.is_file():
        return Check(name, False, "missing", f"{name} is missing from {path.parent}")
    got = got or digests(path)
    if matches(expected, got):
        return Check(name, True, "ok", ", ".join(f"{a} {got[a][:12]}…" for a in ALGORITHMS
                                                 if expected.get(a) and got.get(a)))
    size = expected.get("size")
    if size is not None and int(size) != got["size"]:
        shorter = got["size"] < int(size)
        return Check(name, False, "size",
                     f"{got['size']} bytes, expected {int(size)}: "
                     + ("truncated; the copy or download was interrupted, fetch it again" if shorter
                        else "not the expected file (larger); fetch the right one"))
    return Check(name, False, "differs", _diagnose(path, expected, hint))


def _diagnose(path: Path, expected: dict[str, Any], hint: str) -> str:
    algo = next(a for a in ALGORITHMS if expected.get(a))
    head = f"{algo} differs (expected {expected[algo][:12]}…)"
    if path.suffix in TEXT_SUFFIXES or path.name == "tokenizer.model":
        data = path.read_bytes() if path.stat().st_size < (64 << 20) else b""
        if b"\r\n" in data:
            fixed = data.replace(b"\r\n", b"\n")
            if matches(expected, {a: hashlib.new(a, fixed).hexdigest() for a in ALGORITHMS}):
                return (f"{head}: it has Windows line endings (CRLF) and matches once they are LF; "
                        "convert it back (dos2unix, or git config core.autocrlf false and check out again)")
            return f"{head}: it has Windows line endings (CRLF), which change its bytes; re-download it unmodified"
    if path.suffix == ".bin":
        return (f"{head}: pickled .bin shards differ byte-wise between conversions; "
                + (hint or "this base was probably converted by another transformers version")
                + " (a damaged download looks the same: compare the sizes with the original)")
    return f"{head}: the file was modified or is another version; fetch the original"


def verify_folder(folder: Path, expected: dict[str, dict[str, Any]], hint: str = "",
                  known: dict[str, dict[str, Any]] | None = None,
                  progress: Callable[[int], None] | None = None) -> list[Check]:
    """Check every file of `expected` in `folder`; `known` holds digests already computed."""
    checks = []
    for name in sorted(expected):
        got = (known or {}).get(name)
        if got is None and (folder / name).is_file():
            got = digests(folder / name, progress, needed_algorithms(expected[name]))
        checks.append(check_file(folder / name, expected[name], hint, got))
    return checks


def format_table(title: str, checks: list[Check]) -> str:
    width = max([len(c.file) for c in checks] + [4])
    lines = [title, f"  {'file':<{width}}  result  detail"]
    for c in checks:
        lines.append(f"  {c.file:<{width}}  {'PASS' if c.ok else 'FAIL':<6}  {c.detail}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"  {len(checks) - failed} of {len(checks)} files pass" + (f", {failed} fail" if failed else ""))
    return "\n".join(lines)
