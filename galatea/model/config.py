"""Model hyper-parameters, read from a checkpoint's own metadata (never from its file name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from galatea.errors import GalateaError
from galatea.model.rope import RopeScaling


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family decoder. Field names follow Hugging Face's `LlamaConfig`; the family
    members Galatea runs differ from LLaMA only in the fields at the end: Mistral in a sliding
    attention window, Qwen2 in biases on the q/k/v projections, Qwen3 in q/k norms."""

    vocab_size: int
    hidden_size: int  # width of the residual stream (4096 for LLaMA-7B)
    intermediate_size: int  # width of the SwiGLU MLP (11008 for LLaMA-7B)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means grouped-query attention
    max_position_embeddings: int  # the context the model was trained for
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # see rope.py
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # KoboldAI convention: token ids banned from sampling (config.json "badwordsids").
    bad_words_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "llama"  # llama, mistral, qwen2, qwen3, mixtral, qwen3_moe: the family it belongs to
    attention_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    sliding_window: int | None = None  # each position attends to this many (itself included)
    # every id that ends a reply (Llama-3 lists <|end_of_text|> and <|eot_id|>)
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    # mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is `num_experts` experts of
    # `moe_intermediate_size`, `num_experts_per_tok` of them read per token; 0 = a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1
    # Gemma 2/3 (llama.py): embeddings times sqrt(hidden); a norm after attention and after the
    # MLP too ("sandwich"); GeGLU; scores scaled by query_pre_attn_scalar^-0.5 and soft-capped;
    # window layers (their own RoPE base in Gemma 3) among global ones; soft-capped logits. Norm
    # weights are held as (1 + w) (llama.cpp's GGUF stores them so; HF's get 1 added at load).
    embed_scale: float = 1.0
    sandwich_norms: bool = False
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    query_scale: float | None = None  # None: head_dim^-0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_windows: tuple[int | None, ...] = ()  # per layer (None: global); () = sliding_window on all
    rope_local_theta: float | None = None  # the RoPE base of window layers, where it differs

    def __post_init__(self) -> None:
        # sane bounds before anything is allocated from these numbers (a hostile or corrupt
        # file: heads 0, a negative width, 2^31 layers, a context of 2^40 positions)
        bounds = {"vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "intermediate_size": (1, 1 << 19),
                  "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
                  "max_position_embeddings": (1, 1 << 24)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise GalateaError(f"config: {name} = {value!r} is outside {low}..{high}; the checkpoint's "
                                   "config is corrupt")
        if self.hidden_size % self.num_attention_heads and self.head_dim == 0:
            raise GalateaError(f"config: hidden size {self.hidden_size} is not a multiple of "
                               f"{self.num_attention_heads} heads; the checkpoint's config is inconsistent")
        if self.sliding_window is not None and not 0 < self.sliding_window <= 1 << 24:
            raise GalateaError(f"config: sliding_window = {self.sliding_window!r} is outside 1..{1 << 24}; the "
                               "checkpoint's config is corrupt")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts <= 1024
                                     and 0 < self.moe_intermediate_size <= 1 << 19):
            raise GalateaError(f"config: {self.num_experts_per_tok} of {self.num_experts} experts of width "
                               f"{self.moe_intermediate_size} is not a mixture of experts; the config is corrupt")
        if self.num_attention_heads % self.num_key_value_heads:
            raise GalateaError(
                f"config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads; the checkpoint's config is inconsistent"
            )

    def window(self, layer: int) -> int | None:
        """How many positions a query of `layer` sees (itself included); None: all."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def local_rope(self, layer: int) -> bool:
        """Whether `layer` turns q and k by the window layers' RoPE base (Gemma 3's local layers)."""
        return self.rope_local_theta is not None and self.window(layer) is not None

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dictionary (of a multimodal Gemma 3, its text
        model's: `text_config`)."""
        cfg = text_model_config(cfg)
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type") or "llama"
        family = _HF_ARCHS.get(archs[0]) if archs else model_type if model_type in _HF_ARCHS.values() else None
        if family is None or model_type not in _HF_ARCHS.values():
            name = archs[0] if archs else model_type
            raise GalateaError(
                f"config.json: architecture {name!r} is not supported; Galatea runs "
                f"{', '.join(sorted(set(_HF_ARCHS) - {'LLaMAForCausalLM'}))}"
            )
        if cfg.get("mlp_bias") or (family == "llama" and cfg.get("attention_bias")):
            raise GalateaError("config.json: attention_bias/mlp_bias on a LLaMA are not supported; Galatea runs "
                               "plain LLaMA")
        if family in ("qwen2", *QWEN3) and cfg.get("use_sliding_window"):
            raise GalateaError(f"config.json: {archs[0] if archs else family} with use_sliding_window (a window on "
                               "some layers only) is not supported; set use_sliding_window false if the model was "
                               "trained without it")
        # transformers >= 5 writes RoPE settings under "rope_parameters"; older files at the top level.
        rope = cfg.get("rope_parameters") or {}
        try:
            n_heads = int(cfg["num_attention_heads"])
            window = cfg.get("sliding_window") if family in ("mistral", "mixtral") else None
            moe = _hf_experts(cfg, family)
            gemma = _hf_gemma(cfg, family)
            if family in GEMMA:
                rope = (rope.get("full_attention") or rope) if isinstance(rope.get("full_attention"), dict) else rope
            eos = _ids(cfg.get("eos_token_id"))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=RopeScaling.from_hf(cfg.get("rope_scaling") or rope,
                                                 int(cfg.get("max_position_embeddings", 2048))),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=int(cfg.get("head_dim") or 0),
                bos_token_id=_first_id(cfg.get("bos_token_id")),
                eos_token_id=eos[0] if eos else None,
                bad_words_ids=_bad_words(cfg.get("badwordsids")),
                architecture=family,
                attention_bias=family == "qwen2" or (family in QWEN3 and bool(cfg.get("attention_bias"))),
                sliding_window=None if window is None else int(window),
                eos_token_ids=eos,
                qk_norm=family in (*QWEN3, "gemma3_text"),
                **moe,
                **gemma,
            )
        except KeyError as e:
            raise GalateaError(f"config.json: missing field {e.args[0]!r}; the file is incomplete") from None
        except (TypeError, ValueError) as e:
            raise GalateaError(f"config.json: a field has the wrong type ({e})") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], vocab_size: int, rope_freqs: tuple[float, ...] = ()) -> ModelConfig:
        """Build from GGUF key/values (`llama.*`, `qwen2.*`, `qwen3.*`; llama.cpp writes Mistral as
        `llama`). `vocab_size` comes from the token list; `rope_freqs`, from the file's
        `rope_freqs.weight` (Llama 3's RoPE scaling, as llama.cpp writes it)."""
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise GalateaError(
                f"GGUF architecture {arch!r} is not supported; Galatea runs {', '.join(map(repr, GGUF_ARCHS))} "
                "GGUF files (LLaMA, Mistral, Qwen2, Qwen3)"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise GalateaError(f"GGUF metadata is missing '{arch}.{name}'; the file is incomplete")
            return value

        n_heads = int(key("attention.head_count"))
        embed = int(key("embedding_length"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        window = meta.get(f"{arch}.attention.sliding_window")
        window = int(window) if window and arch not in ("gemma2", "gemma3") else None  # Gemma's: per layer
        return cls(
            vocab_size=vocab_size,
            hidden_size=embed,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
            max_position_embeddings=int(key("context_length", 2048)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=RopeScaling.from_gguf(meta, arch, rope_freqs),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or 0),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=eos,
            architecture=_gguf_family(meta, arch, window),
            attention_bias=arch == "qwen2",  # (a qwen3 file with biases: its bias tensors are refused)
            sliding_window=window,
            eos_token_ids=tuple(dict.fromkeys(i for i in (eos, meta.get("tokenizer.ggml.eot_token_id"))
                                              if i is not None)),
            qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
            **_gguf_experts(meta, arch),
            **_gguf_gemma(meta, arch, n_heads, embed),
        )


# Multimodal classes whose text model Galatea runs on its own (the vision tower is left aside, as
# llama.cpp's converter writes the text weights to one GGUF and the vision ones to an mmproj file).
MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}


def text_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config.json's text model as a config of its own (others as they are)."""
    archs = cfg.get("architectures") or []
    if not archs or archs[0] not in MULTIMODAL:
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise GalateaError(f"config.json: a {archs[0]} without a text_config; Galatea runs its text model from it")
    return {**text, "architectures": [MULTIMODAL[archs[0]]]}


# HF class name -> the family it belongs to; GGUF architectures (llama.cpp writes Mistral as llama)
_HF_ARCHS = {"LlamaForCausalLM": "llama", "LLaMAForCausalLM": "llama", "MistralForCausalLM": "mistral",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral",
             "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3_text")
QWEN3 = ("qwen3", "qwen3_moe")  # the families with q/k norms


def _hf_experts(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral or Qwen3-MoE config.json ({} for dense)."""
    if family == "mixtral":
        return {"num_experts": int(cfg["num_local_experts"]), "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
                "moe_intermediate_size": int(cfg["intermediate_size"]), "norm_topk_prob": True}
    if family == "qwen3_moe":
        if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
            raise GalateaError("config.json: a Qwen3-MoE with dense layers among the expert ones (mlp_only_layers, "
                               "decoder_sparse_step) is not supported")
        count = cfg.get("num_experts") or cfg["num_local_experts"]  # the second: transformers 5 writes it so
        return {"num_experts": int(count), "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
                "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
                "norm_topk_prob": bool(cfg.get("norm_topk_prob", False))}
    return {}


def _gguf_experts(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """llama.cpp's expert keys ({} for dense): count, used count, width (Mixtral's is the
    feed-forward length), renormalised weights (llama.cpp's default for these families: yes)."""
    count = int(meta.get(f"{arch}.expert_count") or 0)
    if not count:
        return {}
    for key in ("expert_shared_count", "expert_shared_feed_forward_length"):
        if meta.get(f"{arch}.{key}"):
            raise GalateaError(f"GGUF: shared experts ({arch}.{key}) are not supported")
    gating = meta.get(f"{arch}.expert_gating_func")
    if gating not in (None, 1):  # 1: softmax
        raise GalateaError(f"GGUF: expert gating function {gating} is not supported (only softmax)")
    width = meta.get(f"{arch}.expert_feed_forward_length") or meta.get(f"{arch}.feed_forward_length")
    return {"num_experts": count, "num_experts_per_tok": int(meta.get(f"{arch}.expert_used_count") or 0),
            "moe_intermediate_size": int(width or 0),
            "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", True))}


def _hf_gemma(cfg: dict[str, Any], family: str) -> dict[str, Any]:
    """Gemma 2/3's fields of config.json ({} for the other families)."""
    if family not in GEMMA:
        return {}
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise GalateaError(f"config.json: Gemma with activation {act!r} is not supported (only gelu_pytorch_tanh)")
    if cfg.get("use_bidirectional_attention"):
        raise GalateaError("config.json: bidirectional attention (an embedding model) is not supported")
    n = int(cfg["num_hidden_layers"])
    pattern = int(cfg.get("sliding_window_pattern") or (2 if family == "gemma2" else 6))
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise GalateaError(f"config.json: layer_types {types!r} is not one window or global layer per layer")
    window = int(cfg["sliding_window"])
    rope = cfg.get("rope_parameters") or {}
    local = rope.get("sliding_attention") if isinstance(rope.get("sliding_attention"), dict) else None
    if local is not None and (local.get("rope_type") or "default") != "default":
        raise GalateaError("config.json: RoPE scaling on Gemma's window layers is not supported")
    local_theta = float(local["rope_theta"]) if local else cfg.get("rope_local_base_freq")
    return {"embed_scale": float(cfg["hidden_size"]) ** 0.5, "sandwich_norms": True, "hidden_act": "gelu_tanh",
            "query_scale": float(cfg["query_pre_attn_scalar"]) ** -0.5,
            "attn_softcap": _cap(cfg.get("attn_logit_softcapping")),
            "final_softcap": _cap(cfg.get("final_logit_softcapping")),
            "layer_windows": tuple(window if t == "sliding_attention" else None for t in types),
            "rope_local_theta": None if local_theta is None else float(local_theta)}


def _gguf_gemma(meta: dict[str, Any], arch: str, n_heads: int, embed: int) -> dict[str, Any]:
    """Gemma's fields from llama.cpp's keys, with llama.cpp's own defaults where a file has none:
    windows on every 2nd (gemma2) or all but every 6th layer (gemma3), a window layers' RoPE base
    of 10000 (gemma3), queries scaled by head_dim^-0.5 (by (hidden / heads)^-0.5 for the 27B
    models, as llama.cpp decides it: gemma2 with 46 layers, gemma3 with 62)."""
    if arch not in ("gemma2", "gemma3"):
        return {}
    n = int(meta[f"{arch}.block_count"])
    head_dim = int(meta.get(f"{arch}.attention.key_length") or embed // n_heads)
    window = meta.get(f"{arch}.attention.sliding_window")
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        local = [bool(x) for x in pattern]
    else:
        local = [i % int(pattern) < int(pattern) - 1 for i in range(n)]
    big = n == (46 if arch == "gemma2" else 62)
    return {"embed_scale": float(embed) ** 0.5, "sandwich_norms": True, "hidden_act": "gelu_tanh",
            "query_scale": float(embed // n_heads if big else head_dim) ** -0.5,
            "attn_softcap": _cap(meta.get(f"{arch}.attn_logit_softcapping")),
            "final_softcap": _cap(meta.get(f"{arch}.final_logit_softcapping")),
            "layer_windows": tuple(int(window) if window and is_local else None for is_local in local),
            "rope_local_theta": float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None}


def _cap(value: Any) -> float | None:
    return float(value) if value else None


def _gguf_family(meta: dict[str, Any], arch: str, window: int | None) -> str:
    """llama.cpp writes Mistral and Mixtral as 'llama' (the window, the experts tell them apart)."""
    if arch == "llama" and meta.get("llama.expert_count"):
        return "mixtral"
    if arch == "llama" and window:
        return "mistral"
    return {"qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}.get(arch, arch)


def _ids(value: Any) -> tuple[int, ...]:
    """config.json's eos_token_id: one id or a list of them."""
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _bad_words(value: Any) -> tuple[int, ...]:
    # KoboldAI writes [[0]] (a list of single-token sequences); accept flat lists too.
    if not value:
        return ()
    flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in value]
    return tuple(int(v) for v in flat if isinstance(v, int))
