"""Writers for tiny random LLaMA checkpoints in every format the tests load.

The weights come from `transformers.LlamaForCausalLM` (the reference implementation); the
folders are written with transformers' own `save_pretrained` (safetensors) or with `torch.save`
in the sharded layout transformers 4.x wrote (`pytorch_model-0000N-of-0000M.bin` + index); GGUF
files are written with the `gguf` package using llama.cpp's tensor names and its q/k row
permutation (as `convert_hf_to_gguf.py` does), so transformers can read them back too.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# llama.cpp's LLaMA SentencePiece vocabulary (models/ggml-vocab-llama-spm.gguf; MIT, see tests/data/LICENSE-llama.cpp)
SHARED_VOCAB = ROOT / "tests" / "data" / "ggml-vocab-llama-spm.gguf"

VARIANTS = {
    # grouped-query attention, separate output matrix
    "gqa": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False),
    # multi-head attention, tied embeddings
    "mha": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=True),
    # rows of 256 values, as K-quant GGUF blocks need
    "kquant": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False),
}


def shared_vocab() -> Path:
    if not SHARED_VOCAB.exists():
        raise FileNotFoundError(f"{SHARED_VOCAB} is missing: it is part of the repository (git checkout tests/data)")
    return SHARED_VOCAB


def vocab_metadata() -> dict:
    from galatea.model.gguf_file import GGUFFile

    return GGUFFile(shared_vocab()).metadata


def hf_model(variant: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, **VARIANTS[variant])
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init so logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model


def write_tokenizer_model(folder: Path) -> None:
    """A SentencePiece tokenizer.model with the LLaMA vocabulary (from the shared GGUF)."""
    from galatea.model.tokenizer import spm_proto_from_gguf

    (folder / "tokenizer.model").write_bytes(spm_proto_from_gguf(vocab_metadata()))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))


def write_safetensors(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_tokenizer_model(folder)
    return folder


def write_bin_shards(model, folder: Path, shards: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n].clone() for n in names[i * per : (i + 1) * per]}
        torch.save(part, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    model.config.to_json_file(folder / "config.json")
    write_tokenizer_model(folder)
    return folder


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

Q = gguf.GGMLQuantizationType
# Byte offsets of each K-quant block's fp16 scale fields, and the value they get, so that random
# blocks hold weights of about the float test models' size (|w| ~ 0.1): Q4_K/Q5_K values are
# d*sc*q - dmin*m with 6-bit sc, m and 4/5-bit q; Q6_K's are d*sc*(q-32) with int8 sc.
_KQUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ2_XXS: (0,)}
_KQUANT_D = {Q.Q4_K: 4e-4, Q.Q5_K: 2e-4, Q.Q6_K: 1e-4, Q.IQ2_XXS: 0.002}


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0))


def _gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


def _random_kquant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _KQUANT_SCALES[qtype]:
        raw[..., off : off + 2] = np.frombuffer(np.float16(_KQUANT_D[qtype]).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(model, path: Path, qtype=Q.F32, arch: str = "llama") -> Path:
    cfg = model.config
    meta = vocab_metadata()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(_gguf_name(name), data.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(name), data.astype(np.float16))
        elif qtype in _KQUANT_SCALES:
            raw = _random_kquant(data.shape[0], data.shape[1], qtype, rng)
            w.add_tensor(_gguf_name(name), raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            raw = gguf.quants.quantize(data, qtype)
            w.add_tensor(_gguf_name(name), raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
