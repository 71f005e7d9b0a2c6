"""Float weights -> GGUF blocks, computed as llama.cpp's reference quantizers (and gguf-py's
`quantize`) compute them: Q8_0 for `--quant int8`, Q4_1 for `--quant int4` (a min and a scale
per 32 values, like Galatea's int4 groups before the kernels). Torch code on row blocks, so a
7B float checkpoint quantizes in seconds without a float copy of a whole tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from galatea.kernels.qtypes import Q4_1, Q8_0

VALUES_PER_STEP = 1 << 20  # converted at once: ~6 float32 temporaries of 4 MB each


def encode(weight: Tensor, qtype: int) -> Tensor:
    """[N, K] float -> [N, K/32 * bytes] uint8 GGUF blocks (K a multiple of 32)."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"a row of {k} values is not a whole number of 32-value blocks")
    size = {Q8_0: 34, Q4_1: 20}[qtype]
    out = torch.empty(n, k // 32, size, dtype=torch.uint8)
    step = max(1, VALUES_PER_STEP // k)
    for i in range(0, n, step):
        g = weight[i : i + step].detach().to(torch.float32).reshape(-1, k // 32, 32)
        out[i : i + step] = _q8_0(g) if qtype == Q8_0 else _q4_1(g)
    return out.view(n, -1)


def _fp16_bytes(v: Tensor) -> Tensor:
    return v.to(torch.float16).view(torch.uint8).reshape(*v.shape, 2)


def _recip(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _q8_0(g: Tensor) -> Tensor:
    """g: [rows, blocks, 32] -> [rows, blocks, 34]: fp16 d = amax/127, then round(x/d) away from zero."""
    d = g.abs().amax(-1, keepdim=True) / 127
    x = g * _recip(d)
    a = x.abs()
    fl = torch.floor(a)
    q = (torch.sign(x) * (fl + torch.floor(2 * (a - fl)))).to(torch.int8)
    return torch.cat([_fp16_bytes(d[..., 0]), q.view(torch.uint8)], dim=-1)


def _q4_1(g: Tensor) -> Tensor:
    """g: [rows, blocks, 32] -> [rows, blocks, 20]: fp16 d = (max-min)/15, fp16 m = min, then
    16 bytes whose low nibbles are values 0-15 and high nibbles 16-31."""
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((g - lo) * _recip(d) + 0.5).clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([_fp16_bytes(d[..., 0]), _fp16_bytes(lo[..., 0]), packed], dim=-1)
