"""The native kernel library (csrc/, built by `pip install`), bound through ctypes.

`select(choice)` returns a `Kernels` bound to one instruction set, or None when the torch
fallback runs (with the reason); `describe(...)` is the one line that says which. The choice
comes from `--kernels`, else `$GALATEA_KERNELS`, else "auto" (the best the CPU has):

    auto    AVX-512 VNNI if the CPU has it, else AVX2, else the torch fallback
    avx512  AVX-512 VNNI (F, BW, VL, VNNI)
    avx2    AVX2 + FMA + F16C
    torch   no native code: PyTorch's int8/int4 kernels (also what runs when the build failed)

Forcing a path the CPU lacks is an error, not a silent fallback.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from galatea.errors import GalateaError

HERE = Path(__file__).resolve().parent
CHOICES = ("auto", "avx512", "avx2", "torch")
ISA_IDS = {"avx2": 1, "avx512": 2}
ISA_NAMES = {"avx512": "AVX-512 VNNI", "avx2": "AVX2"}
DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1}
# A q8_0 cache is held as bytes (uint8 storage): blocks of 32 values, an fp16 scale and 32 int8.
KV_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}
Q8_BLOCK_BYTES = 34


def kv_stride(cache: Tensor, dim: int) -> int:
    """A cache tensor's stride along `dim` in cache elements (the kernels' unit): a q8_0 cache's
    34 bytes hold 32 elements."""
    stride = cache.stride(dim)
    return stride // Q8_BLOCK_BYTES * 32 if cache.dtype == torch.uint8 else stride


class Segment(ctypes.Structure):
    """gx::Segment: one matrix of a fused layer, writing output columns col0..col0+n-1."""

    _fields_ = [("type", ctypes.c_int32), ("pad", ctypes.c_int32), ("tiles", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("col0", ctypes.c_int64), ("m0", ctypes.c_int64), ("m1", ctypes.c_int64)]


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and why not (loaded once per process: it is a file on disk)."""
    failed = HERE / "BUILD_FAILED"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"_gx{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                return None, f"the native library did not load ({e})"
            try:
                _declare(lib)
            except AttributeError as e:  # built from older sources than these
                return None, f"the native library is out of date ({e}); rebuild it with `pip install -e .`"
            return lib, ""
    if failed.exists():
        return None, "the native library did not build: " + failed.read_text(encoding="utf-8").strip()
    return None, "the native library is not built (run `pip install -e .` with g++ installed)"


def _declare(lib: ctypes.CDLL) -> None:
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    signatures = {
        "gx_cpu_isa": ([], i32), "gx_type_block": ([i32], i32), "gx_type_bytes": ([i32], i32),
        "gx_tiles_bytes": ([i32, i64, i64], i64), "gx_set_threads": ([i32], None), "gx_threads": ([], i32),
        "gx_set_spin_us": ([i32], None),
        "gx_repack": ([i32, ptr, i64, i64, ptr, ptr], i32),
        "gx_dequantize": ([i32, ptr, i64, i64, ptr, i64, ptr, i32], i32),
        "gx_matmul": ([i32, ptr, i32, i64, ptr, i32, i64, i64, ptr, i32, i64, i32, i32, ptr, ctypes.c_float], i32),
        "gx_step_attention": ([i32, ptr, i64, i32, ptr, ptr, ptr, ptr, i64, i32, i32, i32, i32, ptr, ptr,
                               ctypes.c_float, ctypes.c_float, i64, ptr, ptr, ctypes.c_float, ptr, i64], i32),
        "gx_moe": ([i32, ptr, i64, i64, i64, ptr, ctypes.c_float, ptr, i32, i32, i32, ptr, i32, ptr, i32, i64, i32],
                   i32),
        "gx_attention": ([i32, ptr, i32, i32, i32, ptr, ptr, i32, i64, i64, i64, ctypes.c_float, ptr], i32),
        "gx_kv_move": ([i32, ptr, ptr, i32, i64, i64, i32, i64, i64, i64, ptr, ptr], i32),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


def cpu_isa() -> str | None:
    """The best instruction set the CPU offers the kernels ("avx512", "avx2"), or None."""
    lib, _ = library()
    if lib is None:
        return None
    return {2: "avx512", 1: "avx2"}.get(lib.gx_cpu_isa())


@dataclass(frozen=True)
class Kernels:
    """The native library bound to one instruction set."""

    isa: str  # "avx512" or "avx2"
    lib: ctypes.CDLL

    @property
    def name(self) -> str:
        return ISA_NAMES[self.isa]

    def supports(self, qtype: int) -> bool:
        return self.lib.gx_type_block(qtype) > 0

    def block(self, qtype: int) -> int:
        """Inputs per GGUF block of `qtype` (32, or 256 for K-quants)."""
        return self.lib.gx_type_block(qtype)

    def set_threads(self, n: int) -> None:
        self.lib.gx_set_threads(max(1, n))

    @property
    def threads(self) -> int:
        return self.lib.gx_threads()

    def repack(self, qtype: int, blocks: Tensor | np.ndarray, n: int, k: int, rows: Tensor | None = None) -> Tensor:
        """GGUF blocks of an [n, k] weight (uint8, row-major; a read-only map of the file is fine)
        -> tiles (uint8, 64-byte aligned). `rows` (int64 [n]): file row rows[i] becomes row i."""
        size = self.lib.gx_tiles_bytes(qtype, n, k)
        if size < 0:
            raise ValueError(f"type {qtype}: cannot tile a [{n}, {k}] weight")
        if isinstance(blocks, np.ndarray):
            blocks = np.ascontiguousarray(blocks)
            nbytes, pointer = blocks.nbytes, blocks.ctypes.data
        else:
            blocks = blocks.contiguous()
            nbytes, pointer = blocks.numel() * blocks.element_size(), blocks.data_ptr()
        if nbytes != n * k // self.block(qtype) * self.lib.gx_type_bytes(qtype):
            raise ValueError(f"type {qtype}: {nbytes} bytes do not hold a [{n}, {k}] weight")
        tiles = aligned_empty(size)
        if rows is not None:
            rows = rows.to(torch.int64).contiguous()
        rc = self.lib.gx_repack(qtype, pointer, n, k, None if rows is None else rows.data_ptr(), tiles.data_ptr())
        assert rc == 0
        return tiles

    def dequantize(self, qtype: int, tiles: Tensor, n: int, k: int, rows: Tensor | Sequence[int] | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows of a tiled [n, k] weight as floats ([len(rows), k]; all rows by default)."""
        idx = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.int64).contiguous()
        out = torch.empty(idx.numel(), k, dtype=dtype)
        rc = self.lib.gx_dequantize(qtype, tiles.data_ptr(), n, k, idx.data_ptr(), idx.numel(), out.data_ptr(),
                                    DTYPE_IDS[dtype])
        if rc == -2:
            raise IndexError("row index out of range")
        assert rc == 0
        return out

    def matmul(self, segments: ctypes.Array, k: int, x: Tensor, out: Tensor, accumulate: bool = False,
               norm: Tensor | None = None, eps: float = 0.0, swiglu: bool = False, geglu: bool = False) -> None:
        """out[m, :] (+)= pre(x[m, :]) @ W.T for the layer whose segments are given; x [M, K]
        (or [M, 2K] with `swiglu`/`geglu`) and out [M, N], float32 or bfloat16, rows contiguous.
        pre: RMSNorm with weight `norm` (float32 [K]) and `eps`, SwiGLU silu(x[:K]) * x[K:] or
        GeGLU gelu_tanh(x[:K]) * x[K:]. A segment with a row range (m0, m1) reads only those rows."""
        pre = 1 if norm is not None else 2 if swiglu else 3 if geglu else 0
        rc = self.lib.gx_matmul(ISA_IDS[self.isa], ctypes.addressof(segments), len(segments), k, x.data_ptr(),
                                DTYPE_IDS[x.dtype], x.stride(0), x.shape[0], out.data_ptr(), DTYPE_IDS[out.dtype],
                                out.stride(0), int(accumulate), pre, None if norm is None else norm.data_ptr(), eps)
        if rc != 0:
            raise RuntimeError(f"native mat-mul refused its arguments (code {rc})")

    def attend_one(self, q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
        """Decoding attention for one sequence: q [H, D] float32, keys/values [K, L, D] views
        of a cache (float32, bfloat16 or float16; positions contiguous along D). Returns
        softmax(q k^T * scale) v as float32 [H, D], grouped heads sharing their K/V head."""
        heads, d = q.shape
        out = torch.empty(heads, d)
        rc = self.lib.gx_attention(ISA_IDS[self.isa], q.data_ptr(), heads, keys.shape[0], d, keys.data_ptr(),
                                   values.data_ptr(), KV_DTYPE_IDS[keys.dtype], kv_stride(keys, 0), kv_stride(keys, 1),
                                   keys.shape[1], scale, out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native attention refused its arguments (code {rc})")
        return out

    def move_kv(self, keys: Tensor, values: Tensor, src: int, dst: int, length: int, cos: Tensor,
                sin: Tensor) -> None:
        """Positions [src, src+length) moved to [dst, dst+length) in place in every head row of
        keys/values ([..., S, D], contiguous, one dtype), keys re-rotated by RoPE for the distance
        moved: cos/sin float32 [D], the table row of |dst - src| (sin negated when moving down)."""
        d = cos.numel()  # the head size (a q8_0 cache's last dimension counts bytes)
        rows = keys.numel() // (keys.shape[-2] * keys.shape[-1])
        rc = self.lib.gx_kv_move(ISA_IDS[self.isa], keys.data_ptr(), values.data_ptr(), KV_DTYPE_IDS[keys.dtype],
                                 rows, keys.shape[-2] * d, d, src, dst, length, cos.data_ptr(), sin.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native KV move refused its arguments (code {rc})")

    @staticmethod
    def attends(head_dim: int, dtype: torch.dtype) -> bool:
        """Whether attend_one takes this head size and cache dtype (q8_0: whole blocks of 32)."""
        return head_dim % (32 if dtype == torch.uint8 else 16) == 0 and head_dim <= 256 and dtype in KV_DTYPE_IDS


def aligned_empty(nbytes: int, align: int = 64) -> Tensor:
    """An uninitialized uint8 tensor whose data starts on an `align`-byte boundary."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    start = -raw.data_ptr() % align
    return raw[start : start + nbytes]


def select(choice: str | None = None) -> tuple[Kernels | None, str]:
    """The kernels to use for `choice` (default: $GALATEA_KERNELS, else auto), and why the
    fallback runs when it does (empty otherwise)."""
    choice = (choice or os.environ.get("GALATEA_KERNELS") or "auto").lower()
    if choice not in CHOICES:
        raise GalateaError(f"kernels {choice!r} is not known; use one of {', '.join(CHOICES)}")
    if choice == "torch":
        return None, "chosen by --kernels torch or GALATEA_KERNELS=torch"
    lib, why = library()
    if lib is None:
        if choice == "auto":
            return None, why
        raise GalateaError(f"--kernels {choice}: {why}")
    best = cpu_isa()
    if choice == "auto":
        if best is None:
            return None, "this CPU has neither AVX-512 VNNI nor AVX2"
        return Kernels(best, lib), ""
    if best is None or ISA_IDS[choice] > ISA_IDS[best]:
        raise GalateaError(f"--kernels {choice}: this CPU does not have {ISA_NAMES[choice]}; use --kernels auto")
    return Kernels(choice, lib), ""


def describe(kernels: Kernels | None, why: str = "") -> str:
    """The one line saying which path runs."""
    if kernels is None:
        return f"kernels: torch fallback ({why})" if why else "kernels: torch fallback"
    return f"kernels: native {kernels.name}, {torch.get_num_threads()} threads"
