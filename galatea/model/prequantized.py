"""Pre-quantized folders (`galatea quantize`): quantized weights stored exactly as the kernels
use them, so loading is a memory map and an assignment, with no conversion.

A folder is a Hugging Face folder (config.json, tokenizer, safetensors) whose config carries
`quantization_config = {"quant_method": "galatea", "format": 1|2, "mode": "int4"|"int8",
"modules": {module name: kind}}`. Module names are those of the fused model (`qkv_proj`,
`gate_up_proj`). Other tensors (norms, float embeddings) are plain.

Format 2 (the native kernels, csrc/layout.md): a module of kind `{"tiles": [[type, rows], ...]}`
stores `tiles.0`, `tiles.1`, ... (uint8): each part's GGUF blocks repacked into 16-row tiles,
a layout every CPU path reads, so the folder loads anywhere the native library runs.
`model.embed_tokens` may be tiles too; a tied `lm_head` is `{"tied": "model.embed_tokens"}`.

Format 1 (the torch fallback's kernels, written where the native library is missing): an
int4 module stores `weight` (uint8, torch's packed layout, [out/BN, in, BN/2] bytes holding two
rows each, BN = `int4_block_n`) and `scales_and_zeros` (bf16, [in/32, out, 2]); an int8
module `weight` (int8 [out, in]) and `scales` (bf16 [out]). A CPU whose int4 layout has another
block size gets the weights repacked at load (slower, still exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from galatea.errors import GalateaError
from galatea.kernels.native import Kernels
from galatea.kernels.qtypes import NAMES
from galatea.model import hf_folder
from galatea.model.config import ModelConfig
from galatea.model.llama import Llama, kept_float32
from galatea.model.quant import GROUP, Int4Linear, Int8Linear, int4_block_n
from galatea.model.tiled import TiledEmbedding, TiledLinear, TiledWeight

METHOD = "galatea"
FORMATS = (1, 2)
TYPE_IDS = {name: qtype for qtype, name in NAMES.items()}


def quantization_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    qc = raw.get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == METHOD else None


def config(model: Llama, mode: str, modules: dict[str, Any]) -> dict[str, Any]:
    """The `quantization_config` of a folder holding `state(model)`."""
    tiled = any(isinstance(kind, dict) for kind in modules.values())
    qc: dict[str, Any] = {"quant_method": METHOD, "format": 2 if tiled else 1, "mode": mode}
    if not tiled:
        qc["int4_block_n"] = int4_block_n() or 0
    qc["modules"] = modules
    return qc


def state(model: Llama) -> tuple[list[tuple[str, Tensor]], dict[str, Any]]:
    """The tensors to save, in order, and the quantized modules by name."""
    tensors: list[tuple[str, Tensor]] = []
    modules: dict[str, Any] = {}
    quantized = set()
    embedding = model.model.embed_tokens
    for name, module in model.named_modules():
        if isinstance(module, TiledLinear) and isinstance(embedding, TiledEmbedding) and \
                module.parts == [embedding.table]:  # the very same tiles
            modules[name] = {"tied": "model.embed_tokens"}
            quantized.add(name)
        elif isinstance(module, TiledLinear | TiledEmbedding):
            parts = module.parts if isinstance(module, TiledLinear) else [module.table]
            tensors += [(f"{name}.tiles.{i}", p.tiles) for i, p in enumerate(parts)]
            modules[name] = {"tiles": [[p.type_name, p.n] for p in parts], "in_features": parts[0].k}
            quantized.add(name)
        elif isinstance(module, Int4Linear):
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


def load(folder: Path, raw: dict[str, Any], cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
         kernels: Kernels | None, why: str = "") -> Llama:
    """The model of a quantized folder; format 2 needs the native `kernels` (`why` they are
    missing, for the error). One pass over the packed modules, then the plain tensors, each
    checked where it is set (hence its length)."""
    qc = quantization_config(raw)
    assert qc is not None
    if qc.get("format") not in FORMATS:
        raise GalateaError(f"{folder}: quantized with format {qc.get('format')}, this Galatea reads formats "
                           f"{', '.join(map(str, FORMATS))}; quantize the original model again")
    if device.type != "cpu":
        raise GalateaError(f"{folder}: pre-quantized folders run on the CPU; quantize at load for {device} instead")
    if qc.get("format") == 2 and kernels is None:
        raise GalateaError(f"{folder}: this folder holds tiles for Galatea's native kernels, which cannot run here "
                           f"({why}); load the model it was quantized from instead")
    modules: dict[str, Any] = qc.get("modules") or {}
    file_bn = int(qc.get("int4_block_n") or 0)
    with torch.device("meta"):
        model = Llama(cfg)
    model.fuse()
    tensors = dict(_tensors(folder))
    tied = []
    for name, kind in modules.items():
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            raise GalateaError(f"{folder}: quantized module {name!r} does not exist in this model") from None
        if isinstance(kind, dict) and "tied" in kind:
            tied.append(name)
            continue
        if isinstance(kind, dict) and "tiles" in kind:
            assert kernels is not None
            layer = _tiled(folder, name, kind, tensors, kernels, dtype, embedding=name == "model.embed_tokens")
        elif kind == "int4":
            weight, sz = _take(tensors, name, "weight", folder), _take(tensors, name, "scales_and_zeros", folder)
            layer = Int4Linear.packed(_repack(weight, sz, file_bn), sz)
        elif kind == "int8":
            layer = Int8Linear(_take(tensors, name, "weight", folder), _take(tensors, name, "scales", folder))
        else:
            raise GalateaError(f"{folder}: module {name} has unknown quantization {kind!r}")
        setattr(owner, attr, layer)
    for name in tied:
        if name != "lm_head" or not isinstance(model.model.embed_tokens, TiledEmbedding):
            raise GalateaError(f"{folder}: module {name} is tied to embeddings the folder does not hold as tiles")
        model.lm_head = TiledLinear([model.model.embed_tokens.table], kernels)  # type: ignore[arg-type]
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
        t = t.to(torch.float32 if kept_float32(name, t) else dtype)
        setattr(model.get_submodule(owner_name), attr, nn.Parameter(t, requires_grad=False))
    if tensors:
        raise GalateaError(f"{folder}: unexpected tensor {next(iter(tensors))!r}; the folder does not match its config")
    if cfg.tie_word_embeddings and "lm_head" not in modules:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.init_rope()
    model.use_kernels(kernels)
    return model


def _tiled(folder: Path, name: str, kind: dict[str, Any], tensors: dict[str, Tensor], kernels: Kernels,
           dtype: torch.dtype, embedding: bool) -> nn.Module:
    weights = []
    k = int(kind.get("in_features") or 0)
    for i, (type_name, rows) in enumerate(kind["tiles"]):
        if type_name not in TYPE_IDS:
            raise GalateaError(f"{folder}: module {name} has type {type_name!r}, which this Galatea cannot read")
        w = TiledWeight(TYPE_IDS[type_name], _take(tensors, name, f"tiles.{i}", folder), int(rows), k)
        if kernels.lib.gx_tiles_bytes(w.qtype, w.n, k) != w.tiles.numel():
            raise GalateaError(f"{folder}: {name} holds {w.tiles.numel()} bytes of tiles, not a [{w.n}, {k}] "
                               f"{type_name} weight; the folder is damaged, quantize again")
        weights.append(w)
    return TiledEmbedding(weights[0], kernels, dtype) if embedding else TiledLinear(weights, kernels)


def _tensors(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Memory-mapped tensors; one whose data is not 64-byte aligned (a folder written by another
    tool) is copied, since torch's int4/int8 kernels load whole SIMD registers from it (the
    native kernels' tiles are read with unaligned loads and stay mapped)."""
    for name, t in hf_folder.iter_tensors(hf_folder.weight_files(folder)):
        yield name, t if t.data_ptr() % 64 == 0 or ".tiles." in name else t.clone()


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
