"""`galatea convert`: move a model between HF `.bin`, HF safetensors and GGUF, tensor by tensor.

- HF folder (.bin shards or safetensors) -> safetensors folder: the same tensors (optionally in
  another dtype), sharded with an index when large; config and tokenizer files are copied.
- GGUF -> HF folder: safetensors dequantized to float, a `config.json` and `generation_config.json`
  from the GGUF metadata, and the tokenizer rebuilt from the GGUF vocabulary (`tokenizer.model`
  for SentencePiece vocabularies, `tokenizer.json` for byte-level BPE), loadable by transformers.
- HF folder -> GGUF (F32, F16, Q8_0, Q4_0, Q4_1) with llama.cpp's names, its q/k row
  permutation and its tokenizer keys, written by the `gguf` package.

Only one tensor is in memory at a time (sources are memory-mapped; `.bin` pickles are read with
`weights_only=True`, so no code in them runs). Every output file is written under a hidden
temporary name and renamed when complete; `config.json` is written last, so an interrupted
conversion never leaves a folder that looks like a model.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from torch import Tensor

from galatea import progress
from galatea.errors import GalateaError
from galatea.files import atomic_write, write_then_rename
from galatea.model import hf_folder
from galatea.model.config import ModelConfig
from galatea.model.gguf_file import NAME_TABLE, GGUFFile, not_a_weight
from galatea.model.rope import llama3_divisors, llama3_from_divisors
from galatea.progress import Progress

Q = GGMLQuantizationType
GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
             torch.int8: "I8"}
# Files of an HF folder that travel with the weights.
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "added_tokens.json", "chat_template.jinja")
DEFAULT_SHARD = 5 * 10**9  # transformers' default max_shard_size

# Applied to each (name, tensor) on its way to the output (a LoRA merge: `train merge`).
Transform = Callable[[str, Tensor], Tensor] | None


def _transformed(tensors: Iterator[tuple[str, Any]], transform: Transform) -> Iterator[tuple[str, Any]]:
    if transform is None:
        yield from tensors
    else:
        for name, t in tensors:
            yield name, transform(name, t)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


# ---- sources -----------------------------------------------------------------------------------

def _hf_files(src: Path) -> list[Path]:
    if not (src / "config.json").is_file():
        raise GalateaError(f"{src}: no config.json; pass a Hugging Face model folder or a .gguf file")
    return hf_folder.weight_files(src)


def _hf_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    for name, t in hf_folder.iter_tensors(files):
        if name.endswith("rotary_emb.inv_freq"):  # a derived buffer old conversions saved
            continue
        yield name, t


def _hf_plan(files: list[Path], dtype: torch.dtype | None) -> list[TensorPlan]:
    plan = []
    for name, t in _hf_tensors(files):  # mmap-backed: reading shapes does not read the weights
        if not t.is_floating_point():
            raise GalateaError(f"{name}: tensor of type {t.dtype}; only float checkpoints can be converted")
        plan.append(TensorPlan(name, tuple(t.shape), dtype or t.dtype))
    return plan


def open_source(src: Path) -> str:
    """'hf' or 'gguf', or a one-line error naming what `src` is instead."""
    if not src.exists():
        raise GalateaError(f"{src}: not found")
    if src.is_dir():
        _hf_files(src)
        return "hf"
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if magic[:2] == b"PK" or src.suffix in (".bin", ".safetensors", ".pt", ".pth"):
        raise GalateaError(f"{src}: a single weights file; pass the folder holding it with its config.json")
    raise GalateaError(f"{src}: neither a GGUF file nor a Hugging Face model folder")


# ---- safetensors output ------------------------------------------------------------------------

def _shards(plan: list[TensorPlan], max_bytes: int) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plan:
        n = _nbytes(p)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    return shards


def _nbytes(p: TensorPlan) -> int:
    return int(np.prod(p.shape)) * p.dtype.itemsize


def write_safetensors(dst: Path, plan: list[TensorPlan], tensors: Iterator[tuple[str, Tensor]],
                      max_shard: int, progress: Progress | None = None) -> list[str]:
    """Stream `tensors` (in `plan` order) into safetensors shards; returns the file names.
    The header is known from the plan, so each tensor is converted, written and dropped."""
    shards = _shards(plan, max_shard)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    it = iter(tensors)
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for p in shard:
            n = _nbytes(p)
            header[p.name] = {"dtype": _ST_NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        # Tensor data starts 64-byte aligned in the file (and so in a memory map of it): SIMD
        # kernels reading mapped weights in place (pre-quantized folders) need aligned rows.
        blob += b" " * (-(8 + len(blob)) % 64)

        def body(f: IO[bytes], shard: list[TensorPlan] = shard, blob: bytes = blob) -> None:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for p in shard:
                name, t = next(it)
                if name != p.name:
                    raise GalateaError(f"internal: expected tensor {p.name}, got {name}")
                data = t.to(p.dtype).contiguous()
                if data.numel():  # written straight from the tensor's memory, no bytes copy
                    f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                if progress:
                    progress(_nbytes(p))

        atomic_write(dst / fname, body)
        weight_map.update(dict.fromkeys((p.name for p in shard), fname))
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(p) for p in plan)}, "weight_map": weight_map}
        atomic_write(dst / "model.safetensors.index.json", lambda f: f.write(json.dumps(index, indent=2).encode()))
    return names


def _prepare_dst(dst: Path, folder: bool, needed: int, force: bool) -> None:
    if dst.exists() and not force:
        if not folder or dst.is_file() or any(dst.iterdir()):
            raise GalateaError(f"{dst}: already exists; pass --force to overwrite or choose another destination")
    if folder:
        if dst.is_file():
            raise GalateaError(f"{dst}: is a file; converting to safetensors writes a folder")
        dst.mkdir(parents=True, exist_ok=True)
    elif dst.is_dir():
        raise GalateaError(f"{dst}: is a folder; converting to GGUF writes one .gguf file")
    where = dst if folder else dst.parent
    if not where.exists():
        raise GalateaError(f"{where}: folder not found")
    free = shutil.disk_usage(where).free
    if needed > free:
        raise GalateaError(f"{where}: needs about {needed / 1e9:.2f} GB of free space and has {free / 1e9:.2f} GB; "
                           "free some space or choose another destination")


# ---- HF -> safetensors -------------------------------------------------------------------------

def hf_to_safetensors(src: Path, dst: Path, dtype: torch.dtype | None = None, max_shard: int = DEFAULT_SHARD,
                      force: bool = False, progress_factory: Any = None, transform: Transform = None) -> list[str]:
    files = _hf_files(src)
    if dst.resolve() == src.resolve():
        raise GalateaError(f"{dst}: the destination is the source folder; choose another")
    plan = _hf_plan(files, dtype)
    total = sum(_nbytes(p) for p in plan)
    _prepare_dst(dst, True, total, force)
    with progress.bar(progress_factory, "convert", total) as bar:
        names = write_safetensors(dst, plan, _transformed(_hf_tensors(files), transform), max_shard, bar)
    for side in SIDE_FILES:
        if (src / side).is_file():
            atomic_write(dst / side, lambda f, side=side: f.write((src / side).read_bytes()))
    config = hf_folder.read_json(src / "config.json")
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(dst / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return names


# ---- GGUF -> HF --------------------------------------------------------------------------------

def gguf_to_hf(src: Path, dst: Path, dtype: torch.dtype | None = None, max_shard: int = DEFAULT_SHARD,
               force: bool = False, progress_factory: Any = None, transform: Transform = None) -> list[str]:
    g = GGUFFile(src)
    meta = g.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GalateaError(f"{src}: has no tokenizer vocabulary; it cannot become a Hugging Face folder")
    cfg = ModelConfig.from_gguf(meta, len(tokens), rope_freqs=g.rope_freqs())
    _convertible(cfg, src)
    weights = [t for t in g.tensors if not not_a_weight(t.name)]
    if not weights:
        raise GalateaError(f"{src}: a vocabulary-only GGUF has no weights to convert")
    if dtype is None:
        kinds = {t.type_id for t in weights if len(t.shape) == 2}
        dtype = torch.float32 if kinds <= {Q.F32} else torch.bfloat16 if kinds <= {Q.BF16, Q.F32} else torch.float16
    tied = not g.has_tensor("output.weight")
    from galatea.model.gguf_file import hf_name
    plan = []
    for t in weights:
        name = hf_name(t.name)
        if name is None:
            raise GalateaError(f"{src}: unexpected tensor {t.name!r}; this is not a plain LLaMA GGUF")
        plan.append(TensorPlan(name, t.shape, dtype))
    total = sum(_nbytes(p) for p in plan)
    _prepare_dst(dst, True, total, force)
    with progress.bar(progress_factory, "convert", total) as bar:
        tensors = g.iter_tensors(cfg.num_attention_heads, cfg.num_key_value_heads)
        names = write_safetensors(dst, plan, _transformed(tensors, transform), max_shard, bar)

    config = write_gguf_side_files(src, meta, cfg, tied, dst, dtype)
    atomic_write(dst / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return names


def write_gguf_side_files(src: Path, meta: dict[str, Any], cfg: ModelConfig, tied: bool, dst: Path,
                          dtype: torch.dtype) -> dict[str, Any]:
    """The tokenizer and generation config of an HF folder, from a GGUF's metadata; returns the
    `config.json` dictionary for the caller to write last."""
    from galatea.model.tokenizer import bpe_from_gguf, spm_proto_from_gguf

    tokens = meta["tokenizer.ggml.tokens"]
    model = meta.get("tokenizer.ggml.model")
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    tok_cfg: dict[str, Any] = {"model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}
    for key, tid in (("bos_token", bos), ("eos_token", eos),
                     ("unk_token", meta.get("tokenizer.ggml.unknown_token_id")),
                     ("pad_token", meta.get("tokenizer.ggml.padding_token_id"))):
        if tid is not None and 0 <= int(tid) < len(tokens):
            tok_cfg[key] = tokens[int(tid)]
    if model == "llama":
        proto = spm_proto_from_gguf(meta)
        atomic_write(dst / "tokenizer.model", lambda f: f.write(proto))
        tok_cfg.update(tokenizer_class="LlamaTokenizer", legacy=True,
                       add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                       add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    elif model == "gpt2":
        text = bpe_from_gguf(meta).to_str()
        atomic_write(dst / "tokenizer.json", lambda f: f.write(text.encode()))
        tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast",
                       add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)))
    else:
        raise GalateaError(f"{src}: GGUF tokenizer {model!r} is not supported (only 'llama' and 'gpt2')")
    if meta.get("tokenizer.chat_template"):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    atomic_write(dst / "tokenizer_config.json", lambda f: f.write(json.dumps(tok_cfg, indent=2).encode()))
    gen = {"bos_token_id": bos, "eos_token_id": eos, "_from_model_config": True}
    atomic_write(dst / "generation_config.json", lambda f: f.write(json.dumps(gen, indent=2).encode()))
    hf_class = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    config = {
        "architectures": [hf_class[cfg.architecture]], "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.architecture != "llama":  # transformers' Mistral/Qwen2 configs have no bias switches
        del config["attention_bias"], config["mlp_bias"]
        config["sliding_window"] = cfg.sliding_window  # Qwen2's stays off (use_sliding_window false)
    rope = hf_rope_scaling(cfg)
    if rope is not None:
        config["rope_scaling"] = rope
    return config


def hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """config.json's `rope_scaling` for the model's RoPE scaling (None: none)."""
    rs = cfg.rope_scaling
    if rs.kind == "factors":
        known = llama3_from_divisors(rs.freq_factors, cfg.head_dim, cfg.rope_theta)
        if known is None:
            raise GalateaError("GGUF: its rope_freqs.weight is not one of Llama 3's RoPE scalings, so config.json "
                               "cannot express it; run the GGUF file itself")
        rs = known
    if rs.kind == "default":
        return None
    out: dict[str, Any] = {"rope_type": rs.kind, "factor": rs.factor}
    if rs.kind == "llama3":
        out.update(original_max_position_embeddings=rs.original_context, low_freq_factor=rs.low_freq_factor,
                   high_freq_factor=rs.high_freq_factor)
    elif rs.kind == "yarn":
        out.update(original_max_position_embeddings=rs.original_context, beta_fast=rs.beta_fast,
                   beta_slow=rs.beta_slow)
        if rs.attention_factor is not None:
            out["attention_factor"] = rs.attention_factor
    return out


# ---- HF -> GGUF --------------------------------------------------------------------------------

_GGUF_NAME = {hf: gg for gg, hf in NAME_TABLE.items()}


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        key = ".".join(["model", "layers", "{n}", *parts[3:]])
        target = _GGUF_NAME.get(key)
        return target.format(n=parts[2]) if target else ""
    return _GGUF_NAME.get(hf, "")


CONVERTIBLE = ("llama", "mistral", "qwen2")


def _convertible(cfg: ModelConfig, src: Path) -> None:
    """`galatea convert` writes the families it knows the names and keys of; the newer ones run
    from either format, and llama.cpp's convert_hf_to_gguf.py converts them."""
    if cfg.architecture not in CONVERTIBLE:
        raise GalateaError(f"{src}: galatea convert handles LLaMA, Mistral and Qwen2 checkpoints, not "
                           f"{cfg.architecture}; Galatea runs it from either format as it is (llama.cpp's "
                           "convert_hf_to_gguf.py converts it to GGUF)")


def permute(w: Tensor, n_heads: int) -> Tensor:
    """llama.cpp's q/k row order (interleaved RoPE pairs) from HF's rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    if len(shape) == 1 or qtype == Q.F32:
        return Q.F32  # norms stay F32, as llama.cpp writes them
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    if qtype in (Q.Q4_0, Q.Q4_1) and name == "output.weight":
        return Q.Q8_0  # the output matrix is the most sensitive to 4-bit error (llama.cpp uses Q6_K)
    return qtype


def hf_to_gguf(src: Path, dst: Path, qtype: str = "f16", force: bool = False,
               progress_factory: Any = None) -> dict[str, int]:
    files = _hf_files(src)
    raw_cfg = hf_folder.read_json(src / "config.json")
    cfg = ModelConfig.from_hf(raw_cfg)
    _convertible(cfg, src)
    target = GGUF_TYPES[qtype]
    plan = [p for p in _hf_plan(files, None) if not (cfg.tie_word_embeddings and p.name == "lm_head.weight")]
    entries = []
    for p in plan:
        name = gguf_name(p.name)
        if not name:
            raise GalateaError(f"{src}: tensor {p.name!r} has no GGUF name; this is not a plain LLaMA checkpoint")
        kind = _tensor_type(name, p.shape, target)
        block, size = GGML_QUANT_SIZES[kind]
        entries.append((p, name, kind, int(np.prod(p.shape)) // block * size))
    needed = sum(e[3] for e in entries)
    _prepare_dst(dst, False, needed, force)

    # llama.cpp's names: Mistral is a 'llama' (its window in llama.attention.sliding_window)
    arch = "qwen2" if cfg.architecture == "qwen2" else "llama"
    w = GGUFWriter(None, arch)
    _gguf_metadata(w, src, raw_cfg, cfg, target)
    for p, name, kind, nbytes in entries:
        if kind in (Q.F32, Q.F16):
            w.add_tensor_info(name, p.shape, np.dtype(np.float32 if kind == Q.F32 else np.float16), nbytes)
        else:
            block, size = GGML_QUANT_SIZES[kind]
            byte_shape = (*p.shape[:-1], p.shape[-1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
    # Llama 3's RoPE scaling, as llama.cpp's converter writes it
    divisors = np.array(llama3_divisors(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta), dtype=np.float32) \
        if cfg.rope_scaling.kind == "llama3" else None
    if divisors is not None:
        w.add_tensor_info("rope_freqs.weight", divisors.shape, np.dtype(np.float32), divisors.nbytes)
    counts: dict[str, int] = {}
    kinds = {p.name: kind for p, _, kind, _ in entries}

    def write(tmp: Path) -> None:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with progress.bar(progress_factory, "convert", needed) as bar:
                for hf, t in _hf_tensors(files):
                    if hf not in kinds:
                        continue
                    kind = kinds[hf]
                    data = t.float()
                    if arch != "llama":
                        pass  # llama.cpp rotates qwen2 in HF's rotate-half order: rows stay
                    elif hf.endswith("q_proj.weight"):
                        data = permute(data, cfg.num_attention_heads)
                    elif hf.endswith("k_proj.weight"):
                        data = permute(data, cfg.num_key_value_heads)
                    arr = data.numpy()
                    out = arr.astype(np.float32) if kind == Q.F32 else arr.astype(np.float16) if kind == Q.F16 \
                        else _quantize_rows(arr, kind)
                    w.write_tensor_data(out)
                    counts[kind.name] = counts.get(kind.name, 0) + 1
                    if bar:
                        bar(out.nbytes)
                if divisors is not None:
                    w.write_tensor_data(divisors)
        finally:
            w.close()

    write_then_rename(dst, write)
    return counts


def _quantize_rows(arr: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """gguf-py quantization, a block of rows at a time to bound the float temporaries."""
    rows = arr.reshape(-1, arr.shape[-1])
    step = max(1, (1 << 22) // rows.shape[1])
    return np.concatenate([quantize(rows[i : i + step], kind) for i in range(0, rows.shape[0], step)])


def _gguf_metadata(w: GGUFWriter, src: Path, raw_cfg: dict[str, Any], cfg: ModelConfig,
                   target: GGMLQuantizationType) -> None:
    w.add_name(src.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    _gguf_rope_scaling(w, cfg)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7}[target])
    w.add_quantization_version(2)
    _gguf_tokenizer(w, src, cfg)


def _gguf_rope_scaling(w: GGUFWriter, cfg: ModelConfig) -> None:
    """llama.cpp's keys for the RoPE scaling (Llama 3's is the rope_freqs tensor, written apart)."""
    from gguf import RopeScalingType

    rs = cfg.rope_scaling
    if rs.kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
    elif rs.kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs.factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_context)
        w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
        if rs.attention_factor is not None:  # llama.cpp multiplies its attn_factor by 0.1 ln(factor) + 1
            w.add_rope_scaling_yarn_attn_factor(rs.attention_factor / (0.1 * math.log(rs.factor) + 1))
    elif rs.kind == "dynamic":
        raise GalateaError("dynamic (NTK) RoPE scaling has no GGUF form (llama.cpp does not run it); keep the "
                           "Hugging Face folder")


def _gguf_tokenizer(w: GGUFWriter, src: Path, cfg: ModelConfig) -> None:
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() \
        else {}
    if (src / "tokenizer.model").is_file():
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        try:
            proto.ParseFromString((src / "tokenizer.model").read_bytes())
        except Exception as e:  # protobuf's DecodeError
            raise GalateaError(f"{src / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
        pieces = list(proto.pieces)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([p.piece for p in pieces])
        w.add_token_scores([p.score for p in pieces])
        w.add_token_types([int(p.type) for p in pieces])
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
        ts = proto.trainer_spec
        bos, eos, unk = ts.bos_id, ts.eos_id, ts.unk_id
        add_bos = bool(tok_cfg.get("add_bos_token", True))
    elif (src / "tokenizer.json").is_file():
        doc = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        model = doc.get("model") or {}
        if model.get("type") != "BPE":
            raise GalateaError(f"{src / 'tokenizer.json'}: a {model.get('type')} tokenizer; only BPE converts to GGUF")
        vocab: dict[str, int] = dict(model["vocab"])
        added = {t["content"]: t for t in doc.get("added_tokens", [])}
        for content, t in added.items():
            vocab.setdefault(content, t["id"])
        tokens = [""] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            tokens[i] = tok
        types = [3 if tok in added and added[tok].get("special") else 4 if tok in added else 1 for tok in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = json.dumps(doc.get("pre_tokenizer"))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm" if '"Digits"' in pre else "gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)

        def tid(key: str) -> int | None:
            v = tok_cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            return vocab.get(v) if isinstance(v, str) else None
        bos = tid("bos_token") if tid("bos_token") is not None else cfg.bos_token_id
        eos = tid("eos_token") if tid("eos_token") is not None else cfg.eos_token_id
        unk = tid("unk_token")
        add_bos = bool(tok_cfg.get("add_bos_token", False))
    else:
        raise GalateaError(f"{src}: no tokenizer.model or tokenizer.json to put in the GGUF")
    for setter, value in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_unk_token_id, unk)):
        if value is not None and value >= 0:
            setter(int(value))
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])
