"""A pre-allocated key/value cache, indexed by position (gpt-fast's static cache).

One tensor pair for all layers: keys and values are [layers, B, K, max_len, D]. Fixed shapes mean
no re-allocation while a chat grows, and the position index makes prefix reuse (keep positions
< n, overwrite the rest) and per-row batching possible without changing the model.

A q8_0 cache (`dtype=Q8_CACHE`, KoboldCpp's --quantkv 1) holds each position's D values as D/32
llama.cpp Q8_0 blocks (an fp16 scale, 32 int8: 34 bytes), so its tensors are uint8 [layers, B,
K, max_len, D/32*34]: slicing positions, copying slots and moving runs work on them as they are;
the native kernels read and write the blocks, the torch paths see dequantized float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from galatea.kernels.native import Kernels
    from galatea.model.llama import Rotary


Q8_CACHE = torch.uint8  # the cache "dtype" that means Q8_0 blocks, held as bytes
Q8_BYTES = 34  # one block: fp16 scale + 32 int8


def quantize_q8(x: Tensor) -> Tensor:
    """[..., D] -> Q8_0 blocks [..., D/32*34] uint8, as llama.cpp's reference quantizer (and the
    kernels' store): d = amax/127 per 32 values, q = x/d rounded half away from zero."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127  # [..., D/32, 1]
    v = blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = (v.sign() * (v.abs() + 0.5).floor()).to(torch.int8)
    packed = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)  # [..., D/32, 34]
    return packed.reshape(*x.shape[:-1], -1)


def dequantize_q8(b: Tensor) -> Tensor:
    """Q8_0 blocks [..., D/32*34] uint8 -> float32 [..., D]."""
    blocks = b.reshape(*b.shape[:-1], -1, Q8_BYTES)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # [..., D/32, 1]
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(*b.shape[:-1], -1)


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.quantized = dtype == Q8_CACHE
        if self.quantized and head_dim % 32:
            raise ValueError(f"a q8_0 KV cache needs a head size that is a multiple of 32, not {head_dim}")
        width = head_dim // 32 * Q8_BYTES if self.quantized else head_dim
        shape = (n_layers, batch_size, n_kv_heads, max_len, width)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.head_dim = max_len, head_dim

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v ([B, K, T, D]) at positions start..start+T-1 of `layer`; return the
        keys and values of positions 0..start+T-1 ([B, K, start+T, D], views, no copy; a q8_0
        cache returns them dequantized, float32)."""
        end = start + k.shape[2]
        if self.quantized:
            self.keys[layer, :, :, start:end] = quantize_q8(k)
            self.values[layer, :, :, start:end] = quantize_q8(v)
            return dequantize_q8(self.keys[layer, :, :, :end]), dequantize_q8(self.values[layer, :, :, :end])
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def move(self, moves: Sequence[tuple[int, int, int]], rotary: Rotary | Sequence[Rotary],
             kernels: Kernels | None = None) -> None:
        """Move runs of positions (src, dst, length) in every layer and batch row, re-rotating the
        keys to their new positions (`rotary`: the model's, or each layer's where they differ,
        as Gemma 3's window layers have their own). The runs are in order in both their sources
        and their destinations (as plan_reuse makes them), so moving the ones that go down first,
        in order, then the ones that go up, in reverse order, never overwrites a run not yet
        moved. With the native kernels each run is one pass over the entries it moves, in their
        dtype."""
        per_layer = list(rotary) if isinstance(rotary, Sequence) else [rotary] * self.keys.shape[0]
        one = per_layer[0] if all(r is per_layer[0] for r in per_layer) else None
        down = [m for m in moves if m[1] < m[0]]
        up = [m for m in moves if m[1] > m[0]]
        native = one is not None and kernels is not None and self.keys.device.type == "cpu" and \
            self.keys.is_contiguous() and kernels.attends(self.head_dim, self.keys.dtype)
        for src, dst, length in [*down, *reversed(up)]:
            if native and dst != src and length > 0:
                cos, sin = one.turn(abs(dst - src))
                sin = (sin * (1 if dst > src else -1)).contiguous()
                kernels.move_kv(self.keys, self.values, src, dst, length, cos, sin)
            else:
                for r in dict.fromkeys(per_layer):
                    self._move(src, dst, length, r, [i for i, x in enumerate(per_layer) if x is r])

    def _move(self, src: int, dst: int, length: int, rotary: Rotary, layers: Sequence[int]) -> None:
        """Keys hold R(p) k, RoPE's rotation by angle p x frequency; R(d) R(p) = R(p + d), so a
        rotation by d = dst - src is exactly the key computed at its new position. In rotate-half
        form: k cos(d) + rotate_half(k) sin(d). Values carry no position."""
        d = dst - src
        if d == 0 or length <= 0:
            return
        # The rotation as a [D, D] matrix, applied to each key row by one GEMM (much faster than
        # elementwise ops on half-rows): out_lo = lo cos - hi sin, out_hi = hi cos + lo sin.
        half = self.head_dim // 2
        cos, sin = rotary.turn(abs(d))
        c = cos[:half].cpu()
        s = sin[:half].cpu() * (1 if d > 0 else -1)
        i = torch.arange(half)
        rot = torch.zeros(2 * half, 2 * half)
        rot[i, i], rot[i + half, i], rot[i + half, i + half], rot[i, i + half] = c, -s, c, s
        rot = rot.to(self.keys.device)
        # One scratch buffer for all layers: fresh temporaries per layer cost more in page faults
        # than the copies themselves. Source and destination may overlap, hence the detour.
        if self.quantized:  # dequantized, turned, quantized again; values move as they are
            for layer in layers:
                k = dequantize_q8(self.keys[layer, :, :, src : src + length])
                self.keys[layer, :, :, dst : dst + length] = quantize_q8(k @ rot)
                self.values[layer, :, :, dst : dst + length] = self.values[layer, :, :, src : src + length].clone()
            return
        b, k_heads, _, dim = self.keys.shape[1:]
        scratch = torch.empty((b, k_heads, length, dim), dtype=torch.float32, device=self.keys.device)
        for layer in layers:
            k = self.keys[layer, :, :, src : src + length]  # [B, K, T, D]
            torch.matmul(k.float(), rot, out=scratch)
            self.keys[layer, :, :, dst : dst + length] = scratch
            scratch.copy_(self.values[layer, :, :, src : src + length])
            self.values[layer, :, :, dst : dst + length] = scratch

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
