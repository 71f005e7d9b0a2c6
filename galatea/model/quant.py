"""Weight-only int8 and int4 linear layers, and the module swap that installs them (gpt-fast style).

Decoding on a CPU is bound by memory bandwidth: every token reads every weight once. int8 with
one scale per output row halves the bytes of bf16 (`aten._weight_int8pack_mm`); int4 in groups of
32 with a scale and a zero per group quarters them (`aten._weight_int4pack_mm_for_cpu`). A GGUF
Q4_0/Q4_1 block, or a Q4_K sub-block, is exactly such a group (w = d*(q-8), d*q + m, or
d*sc*q - dmin*m), so those files load straight into int4 (`Int4Groups`, see gguf_file.py) with no
float copy and no second rounding.

Reading a long prompt is compute bound instead: for many rows at once both layers dequantize
their weights to bf16 (one layer at a time) and use the dense GEMM, which is faster than the
int8/int4 kernels there even counting the dequantization.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from galatea.kernels.native import Kernels
from galatea.kernels.qtypes import Q4_1, Q8_0
from galatea.model.tiled import TiledLinear, TiledWeight

# Rows at which dequantize-then-GEMM beats the int8 / int4 mat-mul kernels (measured on AVX-512:
# for int4 the break-even is ~256 rows on 7B-sized layers, ~150 on SmolLM2's).
DENSE_ROWS = 16
DENSE_ROWS_INT4 = 256


class Int8Linear(nn.Module):
    """Weight-only int8, one bf16 scale per output row: w = q * scale."""

    def __init__(self, q: Tensor, scales: Tensor) -> None:
        """q: [out, in] int8; scales: [out] bf16."""
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        """Quantize [out, in] float weights symmetrically per output row."""
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
        for rows in _row_blocks(weight):  # bounded float temporaries, even for a 32000-row lm_head
            w = weight[rows].detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-10) / 127.0  # [rows]
            q[rows] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            scales[rows] = scale.to(torch.bfloat16)
        return cls(q, scales)

    @classmethod
    def cat(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer whose output rows are those of `layers` in order (for q/k/v fusion)."""
        return cls(torch.cat([m.weight for m in layers]), torch.cat([m.scales for m in layers]))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # The dense path is also the one autograd can go through (LoRA on a quantized base).
        if x2.shape[0] >= DENSE_ROWS or x.device.type != "cpu" or _needs_grad(x):
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, w)
        out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)
        return out.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _needs_grad(x: Tensor) -> bool:
    """Training a LoRA on a quantized base: the gradient must flow through this layer to its
    input (the weight itself stays frozen). The int8/int4 mat-mul kernels have no backward."""
    return x.requires_grad and torch.is_grad_enabled()


GROUP = 32  # inputs per int4 group: the block size of GGUF Q4_0/Q4_1


@dataclass
class Int4Groups:
    """A weight [N, K] as 4-bit codes in groups of 32 along K: w = (q - 8) * scale + zero."""

    q: Tensor  # [N, K] uint8, values 0..15
    scale: Tensor  # [N, K/32] float32
    zero: Tensor  # [N, K/32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def take_rows(self, index: Tensor) -> Int4Groups:
        return Int4Groups(self.q[index], self.scale[index], self.zero[index])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        n, k = self.shape
        w = (self.q.view(n, k // GROUP, GROUP).float() - 8) * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k).to(dtype)

    @classmethod
    def from_float(cls, weight: Tensor) -> Int4Groups:
        """Asymmetric min/max quantization per group of 32, in bounded row blocks."""
        n, k = weight.shape
        q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
        scale = torch.empty(n, k // GROUP, device=weight.device)
        zero = torch.empty(n, k // GROUP, device=weight.device)
        for rows in _row_blocks(weight):
            g = weight[rows].detach().float().view(-1, k // GROUP, GROUP)
            lo, hi = g.amin(-1), g.amax(-1)  # [rows, K/32]
            s = ((hi - lo) / 15).clamp(min=1e-10)
            q[rows] = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8).view(-1, k)
            scale[rows], zero[rows] = s, lo + 8 * s
        return cls(q, scale, zero)


class Int4Linear(nn.Module):
    """Weight-only int4 in groups of 32, one bf16 scale and zero per group, computed by
    `_weight_int4pack_mm_for_cpu`. Built from `Int4Groups` and packed into the kernel's layout
    by `pack()` (or at the first call). The packed layout tiles rows in blocks that depend on
    the CPU, so layers are concatenated (q/k/v fusion) before packing, never after."""

    def __init__(self, groups: Int4Groups) -> None:
        super().__init__()
        self.groups: Int4Groups | None = groups
        self.out_features, self.in_features = groups.shape
        self.register_buffer("weight", None)  # [out, in/2] uint8 once packed
        self.register_buffer("scales_and_zeros", None)  # [in/32, out, 2] bf16 once packed

    @classmethod
    def from_float(cls, weight: Tensor) -> Int4Linear:
        layer = cls(Int4Groups.from_float(weight))
        layer.pack()
        return layer

    @classmethod
    def packed(cls, weight: Tensor, scales_and_zeros: Tensor) -> Int4Linear:
        """A layer from weights already in the kernel's layout (a pre-quantized folder):
        weight [out, in/2] uint8, scales_and_zeros [in/32, out, 2] bf16."""
        k, n = scales_and_zeros.shape[0] * GROUP, scales_and_zeros.shape[1]
        layer = cls(Int4Groups(torch.empty(n, k, dtype=torch.uint8, device="meta"),
                               torch.empty(0, device="meta"), torch.empty(0, device="meta")))
        layer.groups = None
        layer.weight, layer.scales_and_zeros = weight, scales_and_zeros
        return layer

    @classmethod
    def cat(cls, layers: list[Int4Linear]) -> Int4Linear | None:
        if any(m.groups is None for m in layers):
            return None  # already packed: cannot be joined
        parts = [m.groups for m in layers]
        return cls(Int4Groups(torch.cat([g.q for g in parts]), torch.cat([g.scale for g in parts]),
                              torch.cat([g.zero for g in parts])))

    def pack(self) -> None:
        g = self.groups
        if g is None:
            return
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(g.q.to(torch.int32), 1)
        self.scales_and_zeros = torch.stack([g.scale, g.zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.groups = None

    def forward(self, x: Tensor) -> Tensor:
        if self.groups is not None:
            self.pack()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if (x2.shape[0] >= DENSE_ROWS_INT4 or _needs_grad(x)) and int4_block_n() is not None:
            # many rows (a prompt): the bf16 GEMM; also the path autograd can go through
            out = torch.matmul(x2, self.dequantize_t())
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, GROUP, self.scales_and_zeros)
        return out.to(x.dtype).view(*lead, self.out_features)

    def dequantize_t(self) -> Tensor:
        """The weight, transposed, in bf16: [in, out], straight from the packed layout.

        The CPU kernel's layout is [out/BN, in, BN/2] bytes: byte j of a row block holds output
        row j in its low nibble and row j + BN/2 in its high nibble (BN = `int4_block_n()`).
        Working in [in, out] order keeps the scales [in/32, out] broadcastable without copies."""
        bn = int4_block_n()
        assert bn is not None
        n, k = self.out_features, self.in_features
        if n % bn:  # fewer rows than one kernel block (tiny models): let the kernel multiply I
            eye = torch.eye(k, dtype=torch.bfloat16, device=self.weight.device)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, GROUP, self.scales_and_zeros)
        packed = self.weight.view(n // bn, k, bn // 2).permute(1, 0, 2)  # [K, N/BN, BN/2]
        wt = torch.empty(k, n // bn, 2, bn // 2, dtype=torch.bfloat16, device=self.weight.device)
        wt[:, :, 0].copy_(packed & 0x0F)
        wt[:, :, 1].copy_(packed >> 4)
        sz = self.scales_and_zeros  # [K/32, N, 2]: w = (q - 8) * scale + zero
        scale = sz[..., 0][:, None, :]
        wt = wt.view(k // GROUP, GROUP, n).mul_(scale).add_((sz[..., 1] - 8 * sz[..., 0])[:, None, :])
        return wt.view(k, n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"


@functools.cache
def int4_block_n() -> int | None:
    """How many output rows the CPU int4 pack interleaves per block (64 with AVX-512, 32 with
    AVX2, found by packing a probe), or None when the layout is not one we can read back."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    if packed.dtype != torch.uint8 or packed.numel() != 128 * 32:
        return None
    for bn in (64, 32, 16, 128):
        if 128 % bn:
            continue
        pv = packed.view(128 // bn, 64, bn // 2)
        back = torch.cat([pv & 0x0F, pv >> 4], dim=2).permute(0, 2, 1).reshape(128, 64)
        if torch.equal(back.to(torch.int32), probe):
            return bn
    return None


def pack_int4(module: nn.Module) -> None:
    """Pack every Int4Linear inside `module` (after fusion)."""
    for m in module.modules():
        if isinstance(m, Int4Linear):
            m.pack()


def concat_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing all of `layers`' outputs, concatenated; None when they are
    stored in different ways (e.g. a GGUF mixing Q4_0 and Q6_K in one attention block)."""
    kinds = {type(m) for m in layers}
    if kinds == {nn.Linear} and all(m.bias is None for m in layers):
        w = torch.cat([m.weight for m in layers]).detach()
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        return fused
    if kinds == {Int8Linear}:
        return Int8Linear.cat(layers)
    if kinds == {Int4Linear}:
        return Int4Linear.cat(layers)
    if kinds == {TiledLinear}:
        return TiledLinear.cat(layers)
    return None




def _row_blocks(weight: Tensor, elements: int = 1 << 22) -> list[slice]:
    """Row ranges of about `elements` values each (16 MB in float32)."""
    step = max(1, elements // max(1, weight.shape[1]))
    return [slice(i, min(i + step, weight.shape[0])) for i in range(0, weight.shape[0], step)]
FOUR_BIT_GGUF = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS",
                 "IQ2_XXS", "IQ1_S", "IQ1_M"}


def quantize_linear(layer: nn.Module, mode: str, output: bool = False, kernels: Kernels | None = None) -> nn.Module:
    """The quantized replacement of one bias-free nn.Linear (or the layer itself). int4 keeps
    the output projection (`output=True`) at int8: it is the most sensitive matrix, and GGUF
    files keep it at 6-8 bits too. With the native `kernels`, int4 is GGUF Q4_1 and int8 Q8_0."""
    if mode == "none" or not isinstance(layer, nn.Linear) or layer.bias is not None:
        return layer
    four = mode == "int4" and not output and layer.in_features % GROUP == 0
    if kernels is not None:
        if layer.in_features % GROUP:
            return layer  # no whole blocks of 32: stays float
        return TiledLinear([TiledWeight.from_float(kernels, layer.weight, Q4_1 if four else Q8_0)], kernels)
    if four:
        return Int4Linear.from_float(layer.weight)
    return Int8Linear.from_float(layer.weight)


def quantize_model(model: nn.Module, mode: str, kernels: Kernels | None = None) -> nn.Module:
    """Swap every linear layer inside `model` in place (an `lm_head` child counts as output)."""
    if mode == "none":
        return model
    for _, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, quantize_linear(child, mode, output=name == "lm_head", kernels=kernels))
    return model


def auto_mode(tensor_types: dict[str, int], device: torch.device) -> str:
    """What --quant auto means for a checkpoint: the precision its own file already has.
    A GGUF mostly stored in 4 bits runs as int4, one in 5-8 bits as int8, float files as they are."""
    if device.type != "cpu":
        return "none"  # the int8/int4 kernels used here are the CPU ones
    quantized = {t: n for t, n in tensor_types.items() if t not in ("F32", "F16", "BF16") and t.startswith(("Q", "I"))}
    if not quantized:
        return "none"
    main = max(quantized, key=lambda t: quantized[t])
    return "int4" if main in FOUR_BIT_GGUF else "int8"
