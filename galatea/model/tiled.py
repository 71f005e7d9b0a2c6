"""Linear layers and embeddings whose weights stay in their GGUF block types, computed by the
native kernels (galatea/kernels): what a Q4_K_M file holds (Q4_K and Q6_K), the model holds,
with no second rounding and the file's memory footprint.

A `TiledLinear` is a list of `TiledWeight` parts whose outputs are concatenated: fused q/k/v
(or gate/up) keep each part's own type (a Q4_K_M layer mixes Q4_K and Q6_K) and still take one
kernel call, which quantizes the activations once for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from galatea.kernels import blocks
from galatea.kernels.native import Kernels, Segment
from galatea.kernels.qtypes import NAMES

NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # activations the kernels read and write


@dataclass(eq=False)  # compared by identity: a tied lm_head is the embedding's very weight
class TiledWeight:
    """One [n, k] weight as tiles of GGUF type `qtype` (csrc/layout.md)."""

    qtype: int
    tiles: Tensor  # uint8, 64-byte aligned
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def type_name(self) -> str:
        return NAMES[self.qtype]

    @classmethod
    def from_blocks(cls, kernels: Kernels, qtype: int, raw: np.ndarray | Tensor, n: int, k: int,
                    rows: Tensor | None = None) -> TiledWeight:
        """GGUF blocks as stored in the file (row-major); file row rows[i] becomes row i."""
        return cls(qtype, kernels.repack(qtype, raw, n, k, rows), n, k)

    @classmethod
    def from_float(cls, kernels: Kernels, weight: Tensor, qtype: int) -> TiledWeight:
        n, k = weight.shape
        return cls(qtype, kernels.repack(qtype, blocks.encode(weight, qtype), n, k), n, k)

    def dequantize(self, kernels: Kernels, dtype: torch.dtype = torch.float32) -> Tensor:
        return kernels.dequantize(self.qtype, self.tiles, self.n, self.k, dtype=dtype)


class TiledLinear(nn.Module):
    """A bias-free linear layer on the native kernels: y = x @ W.T for every row count."""

    def __init__(self, parts: list[TiledWeight], kernels: Kernels) -> None:
        super().__init__()
        if len({p.k for p in parts}) != 1:
            raise ValueError("the parts of a fused layer must share their input size")
        self.parts, self.kernels = parts, kernels
        self.in_features, self.out_features = parts[0].k, sum(p.n for p in parts)
        for i, p in enumerate(parts):  # buffers: what state() saves and what a memory count sees
            self.register_buffer(f"tiles_{i}", p.tiles, persistent=False)
        cols = np.cumsum([0] + [p.n for p in parts])
        # the kernel's argument, built once: the tiles never move
        self.segments = (Segment * len(parts))(*(Segment(p.qtype, 0, p.tiles.data_ptr(), p.n, int(c))
                                                 for p, c in zip(parts, cols, strict=False)))

    @classmethod
    def cat(cls, layers: list[TiledLinear]) -> TiledLinear:
        return cls([p for m in layers for p in m.parts], layers[0].kernels)

    def forward(self, x: Tensor) -> Tensor:
        # Few ops on the common path: a decoding step calls this ~120 times (SmolLM2), and
        # each torch op costs a microsecond or more.
        if x.dtype not in NATIVE_DTYPES or (x.requires_grad and torch.is_grad_enabled()):
            return self._other(x)
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype)
        self.kernels.matmul(self.segments, self.in_features, x2, out)
        return out.view(*x.shape[:-1], self.out_features)

    def _other(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # the kernels have no backward: dense weights
            return F.linear(x, self.dequantize(x.dtype))
        return self(x.float()).to(x.dtype)  # float16 activations

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] as floats (exactly the file's values, then rounded to dtype)."""
        return torch.cat([p.dequantize(self.kernels, dtype) for p in self.parts])

    def extra_repr(self) -> str:
        kinds = "+".join(p.type_name for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, {kinds} ({self.kernels.name})"


class TiledEmbedding(nn.Module):
    """An embedding table kept in its GGUF type: each looked-up row is dequantized (llama.cpp's
    get_rows). A 7B's Q4 table is 70 MB instead of 262 MB in bf16; a tied `lm_head` shares it."""

    def __init__(self, weight: TiledWeight, kernels: Kernels, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.kernels, self.dtype = weight, kernels, dtype
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("tiles", weight.tiles, persistent=False)

    def forward(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The rows of `ids`, in the model's dtype (or `dtype`: the fused step's residual stream
        is float32, and rounding the file's values to bf16 first cost top-1 agreement)."""
        dtype = dtype or self.dtype
        out_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        rows = self.kernels.dequantize(self.table.qtype, self.table.tiles, self.table.n, self.table.k,
                                       ids.reshape(-1).cpu(), dtype=out_dtype)
        return rows.to(dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.type_name} ({self.kernels.name})"


def tiled_lm_head(embedding: TiledEmbedding) -> TiledLinear:
    """The output projection of a model whose embeddings are tied: the same tiles."""
    return TiledLinear([embedding.table], embedding.kernels)
