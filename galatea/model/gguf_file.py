"""Reading a GGUF file (llama.cpp's format): metadata and tensors.

The header is parsed here directly from a memory map: `gguf.GGUFReader` builds a numpy view per
field part and takes ~9 s on a 49k-token vocabulary, where this takes a fraction of a second.
Dequantization and the type tables come from the `gguf` package.

Tensors are renamed to Hugging Face names by one table and dequantized one at a time. llama.cpp's
converter permutes the rows of `attn_q`/`attn_k` for its interleaved RoPE; we undo that here, in
one place, so the model keeps HF's rotate-half layout.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from torch import Tensor

from galatea.errors import GalateaError
from galatea.kernels.native import Kernels
from galatea.kernels.qtypes import BLOCK
from galatea.model.quant import Int4Groups
from galatea.model.tiled import TiledWeight

Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    # i-quants: IQ4_NL and IQ4_XS stay in their blocks on the native kernels; the others are
    # read through gguf-py's dequantization and re-quantized to the 4-bit layout the path uses
    Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS, Q.IQ1_S, Q.IQ1_M,
})

# GGUF name -> HF name; {n} is the layer number.
NAME_TABLE = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "blk.{n}.attn_q.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "blk.{n}.attn_k.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "blk.{n}.attn_v.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "blk.{n}.attn_output.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "blk.{n}.attn_q.bias": "model.layers.{n}.self_attn.q_proj.bias",  # Qwen2
    "blk.{n}.attn_k.bias": "model.layers.{n}.self_attn.k_proj.bias",
    "blk.{n}.attn_v.bias": "model.layers.{n}.self_attn.v_proj.bias",
    "blk.{n}.attn_q_norm.weight": "model.layers.{n}.self_attn.q_norm.weight",  # Qwen3
    "blk.{n}.attn_k_norm.weight": "model.layers.{n}.self_attn.k_norm.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "blk.{n}.ffn_gate.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.up_proj.weight",
    "blk.{n}.ffn_down.weight": "model.layers.{n}.mlp.down_proj.weight",
    "blk.{n}.ffn_gate_inp.weight": "model.layers.{n}.mlp.gate.weight",  # the experts' router
    # every expert's matrix in one 3-D tensor [experts, rows, cols]: read as one matrix per expert
    "blk.{n}.ffn_gate_exps.weight": "model.layers.{n}.mlp.experts.{e}.gate_proj.weight",
    "blk.{n}.ffn_up_exps.weight": "model.layers.{n}.mlp.experts.{e}.up_proj.weight",
    "blk.{n}.ffn_down_exps.weight": "model.layers.{n}.mlp.experts.{e}.down_proj.weight",
}
# Gemma's names where they differ: ffn_norm is its MLP's input norm, and its attention's and MLP's
# outputs have norms of their own (HF: post_attention_layernorm, post_feedforward_layernorm)
GEMMA_NAMES = {
    **NAME_TABLE,
    "blk.{n}.post_attention_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.pre_feedforward_layernorm.weight",
    "blk.{n}.post_ffw_norm.weight": "model.layers.{n}.post_feedforward_layernorm.weight",
}

# Tensors that are not weights of a layer, each with why it is not loaded as one. Any other name
# outside NAME_TABLE is refused: a tensor that changes the arithmetic is never dropped.
NOT_WEIGHTS = {
    "rope_freqs.weight": "Llama 3's RoPE frequency divisors: read into the config (rope.py)",
    "blk.{n}.attn_rot_embd": "a RoPE table old converters stored; RoPE is computed from the config",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")

# GGUF value type id -> struct format of a scalar (8 = string, 9 = array are handled apart).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


def _key(gguf_name: str) -> tuple[str, re.Match | None]:
    m = _LAYER.match(gguf_name)
    return (gguf_name.replace(f"blk.{m.group(1)}.", "blk.{n}.", 1) if m else gguf_name), m


def hf_name(gguf_name: str, expert: int = 0, arch: str = "llama") -> str | None:
    key, m = _key(gguf_name)
    target = (GEMMA_NAMES if arch in ("gemma2", "gemma3") else NAME_TABLE).get(key)
    return target.format(n=m.group(1), e=expert) if target and m else target


def not_a_weight(gguf_name: str) -> bool:
    return _key(gguf_name)[0] in NOT_WEIGHTS


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order: GGUF lists dims fastest-first, reversed here
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return Q(self.type_id).name
        except ValueError:
            return f"type#{self.type_id}"


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> python value) and `tensors` (TensorInfo list)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24 or (f.seek(0) or f.read(4)) != b"GGUF":
                    raise GalateaError(f"{path}: not a GGUF file; pass a .gguf file or a Hugging Face model folder")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise GalateaError(f"{path}: file not found") from None
        except IsADirectoryError:
            raise GalateaError(f"{path}: is a folder without config.json, not a GGUF file") from None
        try:
            self.metadata, self.tensors = _parse(self._mm)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError, OverflowError) as e:
            raise GalateaError(f"{path}: corrupt or truncated GGUF header ({e}); download the file again") from None
        for t in self.tensors:
            if t.offset + t.nbytes > size:
                raise GalateaError(
                    f"{path}: truncated GGUF file (tensor {t.name} ends at byte {t.offset + t.nbytes}, "
                    f"the file has {size}); download it again"
                )

    @property
    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts

    @property
    def permuted(self) -> bool:
        """Whether q/k rows are in llama.cpp's interleaved RoPE order (the `llama` architecture)."""
        return self.metadata.get("general.architecture", "llama") == "llama"

    def has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors)

    def rope_freqs(self) -> tuple[float, ...]:
        """The values of `rope_freqs.weight` (Llama 3's RoPE scaling), or () without one."""
        t = next((t for t in self.tensors if t.name == "rope_freqs.weight"), None)
        return () if t is None else tuple(self.read_float(t).flatten().tolist())

    def iter_tensors(self, n_heads: int, n_kv_heads: int, dtype: torch.dtype = torch.float32, int4: bool = False,
                     tiled: tuple[Kernels, frozenset[int]] | None = None,
                     ) -> Iterator[tuple[str, Tensor | Int4Groups | TiledWeight]]:
        """(HF name, tensor of `dtype` in HF layout), one tensor at a time. With `tiled` (the
        native kernels and the GGUF types to keep), matrices stored in those types come as
        `TiledWeight`s, their blocks exactly as stored; with `int4`, the Q4_0/Q4_1/Q4_K weights
        of the decoder layers come as `Int4Groups` (the torch fallback's int4)."""
        for t, name in self._matrices():
            # llama.cpp permutes q/k rows for its 'llama' RoPE only; a qwen2 file keeps HF's order
            heads = 0 if not self.permuted else n_heads if t.name.endswith("attn_q.weight") else \
                n_kv_heads if t.name.endswith("attn_k.weight") else 0
            rows = unpermute(torch.arange(t.shape[0]), heads) if heads else None
            w: Tensor | Int4Groups | TiledWeight
            if tiled is not None and t.type_id in tiled[1] and len(t.shape) == 2 and t.shape[1] % BLOCK[t.type_id] == 0:
                w = TiledWeight.from_blocks(tiled[0], t.type_id, self.raw(t), t.shape[0], t.shape[1], rows)
            elif int4 and t.type_id in (Q.Q4_0, Q.Q4_1, Q.Q4_K) and t.name.startswith("blk."):
                w = self.read_int4_groups(t)
                w = w.take_rows(rows) if rows is not None else w
            else:
                w = self.read_float(t, torch.float32 if len(t.shape) == 1 else dtype)  # norms: exact
                w = w[rows] if rows is not None else w
            yield name, w
            self.release(t)

    def _matrices(self) -> Iterator[tuple[TensorInfo, str]]:
        """(tensor, HF name) of every weight; a 3-D tensor of experts as one 2-D tensor each
        (its slice of the file: experts are stored one after another)."""
        arch = self.metadata.get("general.architecture", "llama")
        for t in self.tensors:
            if not_a_weight(t.name):
                continue
            if hf_name(t.name, arch=arch) is None:
                raise GalateaError(f"{self.path}: unexpected tensor {t.name!r}; Galatea does not know what it does "
                                   "(this is not a GGUF of a family it runs)")
            if len(t.shape) == 3:
                per = t.nbytes // t.shape[0]
                for e in range(t.shape[0]):
                    yield TensorInfo(t.name, t.shape[1:], t.type_id, t.offset + e * per, per), hf_name(t.name, e, arch)
            else:
                yield t, hf_name(t.name, arch=arch)

    def read_int4_groups(self, t: TensorInfo) -> Int4Groups:
        """A Q4_0, Q4_1 or Q4_K tensor as int4 groups of 32, without a float copy.

        Q4_0/Q4_1, per block of 32: an fp16 d (and for Q4_1 an fp16 m), then 16 bytes whose low
        nibbles are weights 0-15 and high nibbles weights 16-31; w = d * (q - 8), or d * q + m.
        Q4_K, per super-block of 256: fp16 d and dmin, 12 bytes packing eight 6-bit scales and
        eight 6-bit mins, then 128 bytes of nibbles in four runs of 32 bytes (low nibbles: one
        sub-block of 32, high nibbles: the next); sub-block j has w = d*sc[j] * q - dmin*m[j]."""
        n, k = t.shape
        block_bytes = GGML_QUANT_SIZES[Q(t.type_id)][1]
        if t.type_id == Q.Q4_K:
            return self._q4_k_groups(t, n, k, block_bytes)
        raw = torch.from_numpy(self.raw(t).reshape(n, k // 32, block_bytes).copy())
        d = raw[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [N, K/32]
        if t.type_id == Q.Q4_0:
            nibbles, zero = raw[..., 2:], torch.zeros_like(d)
        else:
            m = raw[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
            nibbles, zero = raw[..., 4:], m + 8 * d
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(n, k)
        return Int4Groups(q, d, zero)

    def _q4_k_groups(self, t: TensorInfo, n: int, k: int, block_bytes: int) -> Int4Groups:
        raw = torch.from_numpy(self.raw(t).reshape(n, k // 256, block_bytes).copy())  # [N, B, 144]
        d = raw[..., 0:2].contiguous().view(torch.float16)[..., 0].float()[..., None]  # [N, B, 1]
        dmin = raw[..., 2:4].contiguous().view(torch.float16)[..., 0].float()[..., None]
        packed = raw[..., 4:16].to(torch.int32)  # [N, B, 12]
        lo, mid, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
        # scales/mins 0-3: the low 6 bits of bytes 0-3 / 4-7; 4-7: a nibble of bytes 8-11 plus
        # the top 2 bits of bytes 0-3 / 4-7.
        sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=-1).float()  # [N, B, 8]
        mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1).float()
        scale = (d * sc).reshape(n, k // 32)
        zero = (8 * d * sc - dmin * mn).reshape(n, k // 32)
        qs = raw[..., 16:].reshape(n, k // 256, 4, 1, 32)  # four runs of 32 bytes
        q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, k)  # low nibbles, then high
        return Int4Groups(q, scale, zero)

    def release(self, t: TensorInfo) -> None:
        """Drop the tensor's file pages from this process (they were copied out; a later read
        faults them in again), so loading does not hold the file and the model at once."""
        lo = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        if t.nbytes:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, t.offset + t.nbytes - lo)

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, as a read-only uint8 view of the map."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def read_float(self, t: TensorInfo, dtype: torch.dtype = torch.float32) -> Tensor:
        """The tensor, dequantized into a new `dtype` tensor of shape `t.shape`. Rows are
        converted in blocks, so no float32 copy of a whole large tensor is ever made."""
        if t.type_id not in SUPPORTED_TYPES:
            raise GalateaError(
                f"{self.path}: tensor {t.name} has type {t.type_name}, which Galatea cannot load; "
                "use a Q4_K_M, IQ4_XS, Q5_K_M, Q6_K, Q8_0 or F16 file"
            )
        qtype = Q(t.type_id)
        block, size = GGML_QUANT_SIZES[qtype]
        cols = t.shape[-1] if t.shape else 1
        raw = self.raw(t).reshape(-1, cols // block * size)  # [rows, bytes per row]
        out = torch.empty(t.shape, dtype=dtype)
        rows_out = out.view(-1, cols)
        step = max(1, (1 << 22) // cols)
        for i in range(0, raw.shape[0], step):
            part = raw[i : i + step]
            if qtype == Q.F32:
                values = part.view(np.float32)
            elif qtype == Q.F16:
                values = part.view(np.float16)
            else:
                values = dequantize(part, qtype)
            rows_out[i : i + step] = torch.from_numpy(np.ascontiguousarray(values).copy()).to(dtype)
        return out


def unpermute(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's `permute` of q/k rows: per head, HF's [first halves, second halves]
    rows were interleaved into pairs. w: [n_heads * D, C]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Every count and length is checked against the bytes left before it is used: a corrupt
    or hostile header fails with ValueError, never with a huge allocation or a deep recursion.
    One pass over the header, each check beside the value it guards (hence its length)."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    size = len(buf)
    if n_kv * 12 > size or n_tensors * 24 > size:
        raise ValueError(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        if p + 8 + n > size:
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        return buf[p + 8 : p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def value(kind: int, p: int, depth: int = 0) -> tuple[Any, int]:
        if kind == 8:
            return string(p)
        if kind == 9:
            if depth >= 4:
                raise ValueError("metadata arrays nest more than 4 deep")
            sub, n = struct.unpack_from("<IQ", buf, p)
            p += 12
            if n > size - p:
                raise ValueError(f"an array of {n} items runs past the end of the file")
            if sub in _NUMPY:
                dt = np.dtype(_NUMPY[sub])
                arr = np.frombuffer(buf, dtype=dt, count=n, offset=p)
                return arr.tolist(), p + n * dt.itemsize
            items = []
            for _ in range(n):
                item, p = value(sub, p, depth + 1)
                items.append(item)
            return items, p
        fmt = _SCALAR.get(kind)
        if fmt is None:
            raise ValueError(f"unknown metadata value type {kind}")
        return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = value(kind, pos + 4)

    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to 4)")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        if any(d == 0 or d > size * 64 for d in dims):  # no element is smaller than 1/64 byte
            raise ValueError(f"tensor {name!r} has dimensions {list(dims)} that cannot be in this file")
        type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(int(d) for d in reversed(dims)), type_id, offset))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or not 0 < align <= 1 << 16 or align & (align - 1):
        raise ValueError(f"general.alignment {align!r} is not a power of two up to 65536")
    data_start = (pos + align - 1) // align * align
    tensors = [TensorInfo(name, shape, tid, data_start + off, _nbytes(shape, tid)) for name, shape, tid, off in infos]
    return meta, tensors


def _nbytes(shape: tuple[int, ...], type_id: int) -> int:
    try:
        block, size = GGML_QUANT_SIZES[Q(type_id)]
    except (ValueError, KeyError):
        return 0  # unknown type: rejected when the tensor is read, with its name
    n = math.prod(shape)  # Python integers: no wrap-around for hostile dimensions
    return n // block * size
