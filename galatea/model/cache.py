"""A pre-allocated key/value cache, indexed by position (gpt-fast's static cache).

One tensor pair for all layers: keys and values are [layers, B, K, max_len, D]. Fixed shapes mean
no re-allocation while a chat grows, and the position index makes prefix reuse (keep positions
< n, overwrite the rest) and per-row batching possible without changing the model.
"""

from __future__ import annotations

import torch
from torch import Tensor


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

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
