"""`galatea inspect`: what a checkpoint is, read from its metadata alone (no weights loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from galatea.kernels import native
from galatea.model import hf_folder
from galatea.model.config import ModelConfig
from galatea.model.gguf_file import GGUFFile


def parameter_count(cfg: ModelConfig) -> int:
    c, d = cfg.hidden_size, cfg.head_dim
    attn = c * cfg.num_attention_heads * d * 2 + c * cfg.num_key_value_heads * d * 2  # q, o, k, v
    attn += (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d if cfg.attention_bias else 0
    mlp = 3 * c * cfg.intermediate_size if not cfg.num_experts else \
        cfg.num_experts * (3 * c * cfg.moe_intermediate_size) + cfg.num_experts * c  # experts and router
    layer = attn + mlp + (4 if cfg.sandwich_norms else 2) * c + (2 * d if cfg.qk_norm else 0)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * c
    return cfg.vocab_size * c + cfg.num_hidden_layers * layer + c + head


def read_config(path: Path) -> ModelConfig:
    """The model's hyper-parameters from its metadata alone (no weights read)."""
    return _read(path)[0]


def _read(path: Path) -> tuple[ModelConfig, dict[str, Any] | None, GGUFFile | None]:
    if path.is_dir():
        raw = hf_folder.read_json(path / "config.json") if (path / "config.json").exists() else None
        if raw is None:
            from galatea.errors import GalateaError

            raise GalateaError(f"{path}: config.json is missing; a Hugging Face model folder needs it")
        return ModelConfig.from_hf(raw), raw, None
    g = GGUFFile(path)
    tokens = g.metadata.get("tokenizer.ggml.tokens") or []
    cfg = ModelConfig.from_gguf(g.metadata, vocab_size=len(tokens) or int(g.metadata.get("llama.vocab_size", 0)),
                                rope_freqs=g.rope_freqs())
    if g.tensors and not g.has_tensor("output.weight"):
        from dataclasses import replace

        cfg = replace(cfg, tie_word_embeddings=True)
    return cfg, None, g


FAMILY_NAMES = {"llama": "LLaMA (Llama 2/3.x, Pygmalion, Metharme)", "mistral": "Mistral (sliding window)",
                "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral (mixture of experts)",
                "qwen3_moe": "Qwen3-MoE (mixture of experts)", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)"}


def describe(path: Path) -> dict[str, Any]:
    cfg, raw, g = _read(path)
    if raw is not None:
        files = hf_folder.weight_files(path)
        tokenizer = "sentencepiece (tokenizer.model)" if (path / "tokenizer.model").exists() else \
            "bpe (tokenizer.json)" if (path / "tokenizer.json").exists() else "none"
        info = {"format": "hf", "weight_files": len(files), "stored_dtype": raw.get("torch_dtype", "unknown")}
        size = sum(f.stat().st_size for f in files)
    else:
        assert g is not None
        kind = g.metadata.get("tokenizer.ggml.model")
        tokenizer = {"llama": "sentencepiece (GGUF vocab)", "gpt2": "bpe (GGUF vocab)"}.get(kind, str(kind))
        info = {"format": "gguf", "tensor_types": g.tensor_types}
        if not g.tensors:
            info["note"] = "vocabulary only, no weights"
        size = path.stat().st_size
    return {
        "path": str(path),
        **info,
        "architecture": cfg.architecture,
        "family": FAMILY_NAMES.get(cfg.architecture, cfg.architecture),
        **({"sliding_window": cfg.sliding_window} if cfg.sliding_window else {}),
        **({"window_layers": f"{sum(w is not None for w in cfg.layer_windows)} of {cfg.num_hidden_layers} see the "
                             f"last {next(w for w in cfg.layer_windows if w)} positions"}
           if any(cfg.layer_windows) else {}),
        **({"experts": f"{cfg.num_experts_per_tok} of {cfg.num_experts} per token, each {cfg.moe_intermediate_size} "
                       f"wide{'' if cfg.norm_topk_prob else ', weights not renormalised'}"}
           if cfg.num_experts else {}),
        "parameters": parameter_count(cfg),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.describe(),
        "tied_embeddings": cfg.tie_word_embeddings,
        "tokenizer": tokenizer,
        "file_bytes": size,
        "kernels": native.describe(*native.select()).removeprefix("kernels: "),
    }
