"""A pre-allocated key/value cache, indexed by position (gpt-fast's static cache).

One tensor pair for all layers: keys and values are [layers, B, K, max_len, D]. Fixed shapes mean
no re-allocation while a chat grows, and the position index makes prefix reuse (keep positions
< n, overwrite the rest) and per-row batching possible without changing the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from galatea.model.llama import Rotary


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v ([B, K, T, D]) at positions start..start+T-1 of `layer`; return the
        keys and values of positions 0..start+T-1 ([B, K, start+T, D], views, no copy)."""
        end = start + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def shift(self, src: int, dst: int, length: int, rotary: Rotary) -> None:
        """Move positions src..src+length-1 down to dst..dst+length-1 (dst < src), in every
        layer and batch row, re-rotating the keys to their new positions.

        Keys hold R(p) k, RoPE's rotation by angle p x frequency; R(-d) R(p) = R(p - d), so a
        rotation by -d (d = src - dst) is exactly the key computed at position p - d. In
        rotate-half form that is k cos(d) - rotate_half(k) sin(d). Values carry no position."""
        d = src - dst
        if d <= 0 or length <= 0:
            return
        cos, sin = rotary.cos[d].float(), rotary.sin[d].float()  # [D]: angle d x frequency
        for layer in range(self.keys.shape[0]):  # a layer at a time bounds the temporary copy
            k = self.keys[layer, :, :, src : src + length].float()  # [B, K, T, D], a copy
            half = k.shape[-1] // 2
            rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
            self.keys[layer, :, :, dst : dst + length] = (k * cos - rotated * sin).to(self.keys.dtype)
            # the source overlaps the destination when length > d: copy it out first
            self.values[layer, :, :, dst : dst + length] = self.values[layer, :, :, src : src + length].clone()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
