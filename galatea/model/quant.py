"""Weight-only int8 and int4 linear layers, and the module swap that installs them (gpt-fast style).

Decoding on a CPU is bound by memory bandwidth: every token reads every weight once. int8 with
one scale per output row halves the bytes of bf16 (`aten._weight_int8pack_mm`); int4 in groups of
32 with a scale and a zero per group quarters them (`aten._weight_int4pack_mm_for_cpu`). A GGUF
Q4_0/Q4_1 block is exactly such a group (w = d*q + m), so re-quantizing its dequantized values
lands on the same grid up to the bf16 rounding of the scale.

Reading a long prompt is compute bound instead: for many rows at once the int8 layer dequantizes
to the activation dtype and uses the dense GEMM, which is faster than the int8 kernel there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows at which dequantize-then-GEMM beats the int8 mat-mul kernel (measured on AVX-512).
DENSE_ROWS = 16


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        """weight: [out, in] float; quantized symmetrically per output row."""
        super().__init__()
        out_f, in_f = weight.shape
        q = torch.empty(out_f, in_f, dtype=torch.int8, device=weight.device)
        scales = torch.empty(out_f, dtype=torch.bfloat16, device=weight.device)
        for rows in _row_blocks(weight):  # bounded float temporaries, even for a 32000-row lm_head
            w = weight[rows].detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-10) / 127.0  # [rows]
            q[rows] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            scales[rows] = scale.to(torch.bfloat16)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.in_features, self.out_features = in_f, out_f

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= DENSE_ROWS or x.device.type != "cpu":
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, w)
        out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)
        return out.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric, one bf16 scale and zero per group of `group` inputs:
    w = (q - 8) * scale + zero, q in 0..15 (the layout `_weight_int4pack_mm_for_cpu` uses)."""

    def __init__(self, weight: Tensor, group: int = 32) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        q = torch.empty(out_f, in_f, dtype=torch.int32, device=weight.device)
        sz = torch.empty(in_f // group, out_f, 2, dtype=torch.bfloat16, device=weight.device)
        for rows in _row_blocks(weight):
            g = weight[rows].detach().float().view(-1, in_f // group, group)
            lo, hi = g.amin(-1), g.amax(-1)  # [rows, in/group]
            scale = ((hi - lo) / 15).clamp(min=1e-10)
            q[rows] = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(-1, in_f)
            sz[:, rows] = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).to(torch.bfloat16)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_and_zeros", sz)  # [in/group, out, 2]: w = (q - 8) * scale + zero
        self.group, self.in_features, self.out_features = group, in_f, out_f

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_and_zeros)
        return out.to(x.dtype).view(*lead, self.out_features)


QUANT_MODES = ("none", "int8", "int4")


def _row_blocks(weight: Tensor, elements: int = 1 << 22) -> list[slice]:
    """Row ranges of about `elements` values each (16 MB in float32)."""
    step = max(1, elements // max(1, weight.shape[1]))
    return [slice(i, min(i + step, weight.shape[0])) for i in range(0, weight.shape[0], step)]
FOUR_BIT_GGUF = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"}


def quantize_linear(layer: nn.Module, mode: str, output: bool = False) -> nn.Module:
    """The quantized replacement of one bias-free nn.Linear (or the layer itself). int4 keeps
    the output projection (`output=True`) at int8: it is the most sensitive matrix, and GGUF
    files keep it at 6-8 bits too."""
    if mode == "none" or not isinstance(layer, nn.Linear) or layer.bias is not None:
        return layer
    if mode == "int4" and not output and layer.in_features % 32 == 0:
        return Int4Linear(layer.weight)
    return Int8Linear(layer.weight)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Swap every linear layer inside `model` in place (an `lm_head` child counts as output)."""
    if mode == "none":
        return model
    for _, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, quantize_linear(child, mode, output=name == "lm_head"))
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
