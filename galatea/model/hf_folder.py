"""Reading a Hugging Face model folder: config.json and the weight files, tensor by tensor.

Safetensors are memory-mapped by our own small reader (the format is an 8-byte length, a JSON
header and raw data): a tensor already in the compute dtype is used in place, and after each
tensor its pages are released from this process (`madvise(DONTNEED)`; they are file-backed, so a
later read simply faults them in again). That keeps peak memory near the final model size even
when converting dtypes. Pytorch `.bin` pickles are read with `weights_only=True` (no code from
the file is ever executed) and `mmap=True`.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from galatea.errors import GalateaError


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GalateaError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GalateaError(f"{path}: not valid JSON ({e}); the file is corrupt or truncated") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in a fixed order, checking that indexed shards exist."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise GalateaError(f"{index}: has no 'weight_map'; the index file is corrupt")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise GalateaError(f"{f}: shard listed in {index_name} is missing; copy it into the folder")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    raise GalateaError(
        f"{folder}: no weights found (expected model.safetensors, pytorch_model.bin or a sharded index)"
    )


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor of every file; tensors are mmap-backed where possible."""
    for f in files:
        if f.suffix == ".safetensors":
            yield from _safetensors(f)
        else:
            state = _torch_load(f)
            names = list(state)
            for name in names:
                yield name, state.pop(name)


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    header, data_start, mm = _open_safetensors(path)
    page = mmap.PAGESIZE
    for name, info in header.items():
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise GalateaError(f"{path}: tensor {name} has dtype {info['dtype']}, which Galatea cannot load")
        shape = [int(d) for d in info["shape"]]
        count = end - begin
        tensor = torch.frombuffer(mm, dtype=dtype, count=count // dtype.itemsize, offset=begin) if count \
            else torch.empty(0, dtype=dtype)
        yield name, tensor.view(shape)
        lo = begin // page * page
        if end > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)


def _open_safetensors(path: Path) -> tuple[dict[str, Any], int, mmap.mmap]:
    bad = f"{path}: corrupt or truncated safetensors file"
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size < 8:
            raise GalateaError(f"{bad} ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise GalateaError(f"{bad} (header of {n} bytes in a {size}-byte file); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GalateaError(f"{bad} (header is not JSON: {e}); download it again") from None
        # Copy-on-write map: torch wants a writable buffer; weights are never written during loading.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GalateaError(f"{bad} (tensor {name} has no valid data_offsets); download it again") from None
        if not 0 <= begin <= end or data_start + end > size:
            raise GalateaError(f"{bad} (tensor {name} ends at byte {data_start + end}, the file has {size}); "
                               "download it again")
    return header, data_start, mm


def torch_load_error(path: Path, e: BaseException) -> GalateaError:
    """One line for a pickle torch.load(weights_only=True) refused or could not read; never
    torch's own message, which advises loading with weights_only=False (running its code)."""
    text = str(e).strip()
    if "weights_only" in text or "Unsupported global" in text or "Weights only load failed" in text:
        return GalateaError(f"{path}: this pickle wants to run code when loaded, and Galatea refuses to execute "
                            "it; use a safetensors copy or convert it with a tool you trust")
    first = text.splitlines()[0] if text else type(e).__name__
    return GalateaError(f"{path}: corrupt or truncated pytorch file ({first}); download it again")


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise torch_load_error(path, e) from None
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "mmap" in msg and "zip" in msg:  # legacy (pre-1.6) torch.save format cannot be mapped
            return _torch_load_unmapped(path)
        raise GalateaError(f"{path}: corrupt or truncated pytorch file ({msg}); download it again") from None
    except (EOFError, ValueError, OSError) as e:
        raise GalateaError(f"{path}: corrupt or truncated pytorch file ({e}); download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise GalateaError(f"{path}: not a state dict of tensors; this is not a model weights file")
    return state


def _torch_load_unmapped(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure here means an unreadable (or refused) file
        raise torch_load_error(path, e) from None
