"""Reading a Hugging Face model folder: config.json and the weight files, tensor by tensor.

Safetensors are memory-mapped; pytorch `.bin` pickles are read with `weights_only=True` (no code
from the file is ever executed) and `mmap=True`, so a tensor costs memory only once it is
converted into the model.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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


def _safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)
    except SafetensorError as e:
        raise GalateaError(f"{path}: corrupt or truncated safetensors file ({e}); download it again") from None


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Weights only load failed" in first:
            raise GalateaError(
                f"{path}: this pickle wants to run code when loaded, and Galatea refuses to execute it; "
                "use a safetensors copy of the model or convert it with a tool you trust"
            ) from None
        raise GalateaError(f"{path}: corrupt pytorch file ({first}); download it again") from None
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
    except Exception as e:
        raise GalateaError(f"{path}: corrupt or truncated pytorch file ({e}); download it again") from None
