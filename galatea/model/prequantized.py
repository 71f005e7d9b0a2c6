"""Pre-quantized folders (`galatea quantize`): int4/int8 weights stored exactly as the CPU kernels
use them, so loading is a memory map and an assignment, with no conversion.

A folder is a Hugging Face folder (config.json, tokenizer, safetensors) whose config carries
`quantization_config = {"quant_method": "galatea", "format": 1, "mode": "int4"|"int8",
"int4_block_n": BN, "modules": {module name: "int4"|"int8"}}`. Module names are those of the
fused model (`qkv_proj`, `gate_up_proj`). An int4 module stores `weight` (uint8, the kernel's
packed layout, [out/BN, in, BN/2] bytes holding two rows each) and `scales_and_zeros` (bf16,
[in/32, out, 2]); an int8 module `weight` (int8 [out, in]) and `scales` (bf16 [out]). Other
tensors (embeddings, norms) are plain. A CPU whose int4 layout has another block size gets the
weights repacked at load (slower, still exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from galatea.errors import GalateaError
from galatea.model import hf_folder
from galatea.model.config import ModelConfig
from galatea.model.llama import Llama
from galatea.model.quant import GROUP, Int4Linear, Int8Linear, int4_block_n

METHOD = "galatea"
FORMAT = 1


def quantization_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    qc = raw.get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == METHOD else None


def state(model: Llama) -> tuple[list[tuple[str, Tensor]], dict[str, str]]:
    """The tensors to save, in order, and the quantized modules by name."""
    tensors: list[tuple[str, Tensor]] = []
    modules: dict[str, str] = {}
    quantized = set()
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            module.pack()
            tensors += [(f"{name}.weight", module.weight), (f"{name}.scales_and_zeros", module.scales_and_zeros)]
            modules[name] = "int4"
            quantized.add(name)
        elif isinstance(module, Int8Linear):
            tensors += [(f"{name}.weight", module.weight), (f"{name}.scales", module.scales)]
            modules[name] = "int8"
            quantized.add(name)
    tied = model.config.tie_word_embeddings and "lm_head" not in quantized
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] in quantized or (tied and name == "lm_head.weight"):
            continue
        tensors.append((name, param.detach()))
    return tensors, modules


def load(folder: Path, raw: dict[str, Any], cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Llama:
    qc = quantization_config(raw)
    assert qc is not None
    if qc.get("format") != FORMAT:
        raise GalateaError(f"{folder}: quantized with format {qc.get('format')}, this Galatea reads format "
                           f"{FORMAT}; quantize the original model again")
    if device.type != "cpu":
        raise GalateaError(f"{folder}: pre-quantized folders run on the CPU; quantize at load for {device} instead")
    modules: dict[str, str] = qc.get("modules") or {}
    file_bn = int(qc.get("int4_block_n") or 0)
    with torch.device("meta"):
        model = Llama(cfg)
    model.fuse()
    tensors = dict(_tensors(folder))
    for name, kind in modules.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            raise GalateaError(f"{folder}: quantized module {name!r} does not exist in this model") from None
        if kind == "int4":
            weight, sz = _take(tensors, name, "weight", folder), _take(tensors, name, "scales_and_zeros", folder)
            layer = Int4Linear.packed(_repack(weight, sz, file_bn), sz)
        elif kind == "int8":
            layer = Int8Linear(_take(tensors, name, "weight", folder), _take(tensors, name, "scales", folder))
        else:
            raise GalateaError(f"{folder}: module {name} has unknown quantization {kind!r}")
        setattr(owner, attr, layer)
    expected = dict(model.named_parameters())
    if cfg.tie_word_embeddings and "lm_head" not in modules:
        expected.pop("lm_head.weight", None)
    for name, target in expected.items():
        t = tensors.pop(name, None)
        if t is None:
            raise GalateaError(f"{folder}: tensor {name} is missing; the quantized folder is incomplete")
        if tuple(t.shape) != tuple(target.shape):
            raise GalateaError(f"{folder}: tensor {name} has shape {list(t.shape)}, expected {list(target.shape)}")
        owner_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, nn.Parameter(t.to(dtype), requires_grad=False))
    if tensors:
        raise GalateaError(f"{folder}: unexpected tensor {next(iter(tensors))!r}; the folder does not match its config")
    if cfg.tie_word_embeddings and "lm_head" not in modules:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.init_rope()
    return model


def _tensors(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Memory-mapped tensors; one whose data is not 64-byte aligned (a folder written by another
    tool) is copied, since the int4/int8 kernels load whole SIMD registers from it."""
    for name, t in hf_folder.iter_tensors(hf_folder.weight_files(folder)):
        yield name, t if t.data_ptr() % 64 == 0 else t.clone()


def _take(tensors: dict[str, Tensor], module: str, part: str, folder: Path) -> Tensor:
    t = tensors.pop(f"{module}.{part}", None)
    if t is None:
        raise GalateaError(f"{folder}: tensor {module}.{part} is missing; the quantized folder is incomplete")
    return t


def _repack(weight: Tensor, scales_and_zeros: Tensor, file_bn: int) -> Tensor:
    """The packed weight in this CPU's layout: as stored when the block sizes agree."""
    here = int4_block_n()
    if here == file_bn:
        return weight
    k, n = scales_and_zeros.shape[0] * GROUP, scales_and_zeros.shape[1]
    if file_bn <= 0 or n % file_bn:
        raise GalateaError("int4 weights in an unknown layout; quantize the original model again on this machine")
    q = unpack_int4(weight, n, k, file_bn)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def unpack_int4(packed: Tensor, n: int, k: int, bn: int) -> Tensor:
    """4-bit codes [N, K] (uint8) from the CPU pack layout of block size `bn`."""
    pv = packed.reshape(n // bn, k, bn // 2)
    return torch.cat([pv & 0x0F, pv >> 4], dim=2).permute(0, 2, 1).reshape(n, k)
