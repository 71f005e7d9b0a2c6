"""What Ollama's model routes say about a served model (`/api/tags`, `/api/show`, `/api/ps`):
Ollama's names (`name:tag`), details and model_info keys, read from the checkpoint's metadata.

A client checks `capabilities` (VS Code's Ollama provider wants "completion"; "thinking" turns
on a reasoning model's switch) and reads the context from `model_info["{arch}.context_length"]`.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from galatea.chat import formats
from galatea.model.config import ModelConfig
from galatea.model.inspect import parameter_count

# HF model types -> the architecture names llama.cpp's GGUF files (and so Ollama) use
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "mixtral": "llama", "mistral": "llama",
             "qwen2_moe": "qwen2moe"}
BIG_ARRAY = 16  # longer metadata arrays (the vocabulary, merges) only with verbose, as Ollama does


def ollama_name(name: str) -> str:
    """Ollama names are `model:tag`; ours get the default tag."""
    return name if ":" in name else f"{name}:latest"


def same_model(asked: str, name: str) -> bool:
    """Whether a client's model name means ours (Ollama's `:latest` is implied; case-insensitive)."""
    def norm(s: str) -> str:
        return s.strip().lower().removesuffix(":latest")
    return norm(asked) == norm(name)


def timestamp(t: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes created_at and modified_at."""
    moment = datetime.now(UTC) if t is None else datetime.fromtimestamp(t, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def digest(path: Path) -> str:
    """A stable identifier of the model's files (their names, sizes and times; reading gigabytes to
    hash their content would stall every client that lists models)."""
    h = hashlib.sha256()
    for p in _files(path):
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


def _metadata(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from galatea.model.gguf_file import GGUFFile

    return GGUFFile(path).metadata


def _quantization(path: Path, meta: dict[str, Any] | None, types: dict[str, int] | None = None) -> str:
    """The file type llama.cpp's quantizer wrote (Q4_K_M...); without one, the commonest type of
    the file's tensors."""
    if meta is not None:
        from gguf import LlamaFileType

        if "general.file_type" in meta:
            try:
                return LlamaFileType(int(meta["general.file_type"])).name.removeprefix("MOSTLY_").replace("ALL_", "")
            except ValueError:
                pass
        quantized = {t: n for t, n in (types or {}).items() if t not in ("F32",)}
        return max(quantized, key=lambda t: quantized[t]) if quantized else "F32"
    from galatea.model import hf_folder

    raw = hf_folder.read_json(path / "config.json") if (path / "config.json").exists() else {}
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") == "galatea":
        return str(qc.get("mode", "int4")).upper()
    return str(raw.get("torch_dtype", "bfloat16")).replace("bfloat16", "BF16").replace("float16", "F16").replace(
        "float32", "F32")


def architecture(cfg: ModelConfig, meta: dict[str, Any] | None) -> str:
    if meta is not None and meta.get("general.architecture"):
        return str(meta["general.architecture"])
    return GGUF_ARCH.get(cfg.architecture, cfg.architecture)


def details(path: Path, cfg: ModelConfig, meta: dict[str, Any] | None = None,
            types: dict[str, int] | None = None) -> dict[str, Any]:
    arch = architecture(cfg, meta)
    return {"parent_model": "", "format": "gguf" if meta is not None else "safetensors", "family": arch,
            "families": [arch], "parameter_size": _human(parameter_count(cfg)),
            "quantization_level": _quantization(path, meta, types)}


def model_info(path: Path, cfg: ModelConfig, context: int, meta: dict[str, Any] | None,
               verbose: bool = False) -> dict[str, Any]:
    """GGUF's metadata keys (from the file, or written from an HF config), the context being the
    one this server runs (what a client may send), the parameter count Ollama adds."""
    arch = architecture(cfg, meta)
    info: dict[str, Any] = {}
    if meta is not None:
        for key, value in meta.items():
            if isinstance(value, list) and len(value) > BIG_ARRAY and not verbose:
                value = []
            info[key] = value
    else:
        info.update({
            "general.architecture": arch, "general.basename": path.name,
            f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.embedding_length": cfg.hidden_size,
            f"{arch}.feed_forward_length": cfg.intermediate_size,
            f"{arch}.attention.head_count": cfg.num_attention_heads,
            f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
            f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, f"{arch}.rope.freq_base": cfg.rope_theta,
            f"{arch}.vocab_size": cfg.vocab_size,
        })
        if cfg.num_experts:
            info.update({f"{arch}.expert_count": cfg.num_experts, f"{arch}.expert_used_count": cfg.num_experts_per_tok})
    info.setdefault("general.basename", path.stem)
    info["general.parameter_count"] = parameter_count(cfg)
    info[f"{arch}.context_length"] = context
    return info


def capabilities(tokenizer: Any, meta: dict[str, Any] | None = None) -> list[str]:
    """"completion" always; "thinking" for a reasoning model (its template has the switch)."""
    template = getattr(tokenizer, "chat_template", None) or (meta or {}).get("tokenizer.chat_template") or ""
    return ["completion", *(["thinking"] if "enable_thinking" in template or "<think>" in template else [])]


def go_template(fmt: formats.Format) -> str:
    """The served chat format written as an Ollama (Go) template, for clients that show it."""
    if fmt.kind == "instruct":
        return ("{{ if .System }}" + fmt.story_prefix + "{{ .System }}" + fmt.story_suffix + "{{ end }}"
                + fmt.input_sequence + "{{ .Prompt }}" + fmt.input_suffix + fmt.output_sequence
                + "{{ .Response }}" + fmt.output_suffix)
    if fmt.kind == "pygmalion":
        return "{{ if .System }}Assistant's Persona: {{ .System }}\n{{ end }}<START>\nYou: {{ .Prompt }}\n" \
               "Assistant: {{ .Response }}"
    return ""  # the model's own Jinja template: `template` in /api/show carries it as it is


def parameters(stops: list[str]) -> str:
    """Ollama's `parameters` text: one `name value` line each."""
    return "\n".join(f'stop                           "{s}"' for s in stops)
