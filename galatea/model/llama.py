"""LLaMA in plain PyTorch, with Hugging Face parameter names.

Shapes: B batch, T tokens in this call, L cached positions attended to, H query heads,
K key/value heads (K < H is grouped-query attention), D head_dim, C hidden_size.

The module tree mirrors `transformers.LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`,
`...mlp.gate_proj`, `lm_head`), so HF checkpoints, PEFT adapters and merged XOR weights load
without renaming. Rotary embeddings use HF's rotate-half layout; GGUF files are un-permuted to it
at load time (see `gguf_file.py`).

`fuse()` joins q/k/v and gate/up into one matrix each for inference; training keeps HF's modules.

The same code runs the LLaMA family members that differ only a little (config.py): Qwen2's q/k/v
biases are parameters of the attention (`q_bias`...; HF's `q_proj.bias`, renamed at load, so a
quantized or tiled projection keeps its bias beside it), Qwen3 normalises each head of q and k
(`q_norm`, `k_norm`: RMSNorm over head_dim) before RoPE, and Mistral's sliding window limits
each query to the last `sliding_window` positions, itself included (transformers' mask
`kv_pos > q_pos - window`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from galatea.kernels.native import Kernels
from galatea.model.cache import KVCache
from galatea.model.config import ModelConfig
from galatea.model.decode_step import FusedDecoder
from galatea.model.quant import concat_linears
from galatea.model.rope import RopeScaling
from galatea.model.tiled import TiledEmbedding

# Rows per forward pass up to which torch runs single-threaded beside the native kernels.
DECODE_ROWS = 16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel; it accumulates in float32 for bf16 inputs.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # (the weight is float32)


class Rotary(nn.Module):
    """cos/sin tables for rotate-half RoPE, built once for `max_len` positions, with the
    checkpoint's frequency scaling (rope.py); for YaRN, scaled by its attention factor."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device | str | None = None,
                 local: bool = False) -> None:
        """`local`: the table of the window layers (Gemma 3: their own base, no scaling)."""
        super().__init__()
        scaling, theta = (RopeScaling(), cfg.rope_local_theta) if local else (cfg.rope_scaling, cfg.rope_theta)
        inv_freq, self.scale = scaling.frequencies(cfg.head_dim, theta, cfg.max_position_embeddings, max_len)
        self.inv_freq = inv_freq.to(device)  # [D/2] float64
        pos = torch.arange(max_len, dtype=torch.float64, device=device)
        freqs = torch.outer(pos, self.inv_freq)  # [max_len, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, D]
        self.register_buffer("cos", (emb.cos() * self.scale).float(), persistent=False)
        self.register_buffer("sin", (emb.sin() * self.scale).float(), persistent=False)

    def forward(self, start: int, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.cos[start : start + length].to(dtype), self.sin[start : start + length].to(dtype)

    def turn(self, distance: int) -> tuple[Tensor, Tensor]:
        """float32 cos/sin [D] of a pure rotation by `distance` positions (moving cached keys:
        the attention factor is in them already, so it is not applied twice)."""
        angle = torch.cat([self.inv_freq, self.inv_freq]) * distance
        return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, T, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class Attends:
    """How a layer's queries attend: to their last `window` positions (None: all), scores scaled by
    `scale` (None: head_dim^-0.5) and soft-capped (`softcap` * tanh(s / softcap); Gemma 2)."""

    window: int | None = None
    scale: float | None = None
    softcap: float | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=False)
        self.attends = Attends(cfg.window(layer), cfg.query_scale, cfg.attn_softcap)
        self.local_rope = cfg.local_rope(layer)  # turns q and k by the window layers' RoPE (Gemma 3)
        if cfg.qk_norm:  # Qwen3: each head of q and k normalised before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        if cfg.attention_bias:
            self.q_bias = nn.Parameter(torch.zeros(self.n_heads * self.head_dim))
            self.k_bias = nn.Parameter(torch.zeros(self.n_kv * self.head_dim))
            self.v_bias = nn.Parameter(torch.zeros(self.n_kv * self.head_dim))
        self.qkv_bias: Tensor | None = None  # set by fuse() when the projections have biases
        self.qkv_proj: nn.Module | None = None  # set by fuse(): q, k, v rows in one matrix
        self.kernels: Kernels | None = None  # native kernels for decoding attention (Llama.use_kernels)

    def fuse(self) -> None:
        """Merge q/k/v into one matrix for inference: one mat-vec per token instead of three."""
        fused = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj
            if hasattr(self, "q_bias"):
                self.qkv_bias = torch.cat([self.q_bias, self.k_bias, self.v_bias]).detach()
                del self.q_bias, self.k_bias, self.v_bias

    def _project(self, proj: nn.Module, x: Tensor, bias: str) -> Tensor:
        out = proj(x)
        return out + getattr(self, bias).to(out.dtype) if hasattr(self, bias) else out

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | CacheRows | None, layer: int,
                start: int) -> Tensor:
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            if self.qkv_bias is not None:
                qkv = qkv + self.qkv_bias.to(qkv.dtype)
            qkv = qkv.view(b, t, h + 2 * kv, d)
            if hasattr(self, "q_norm"):
                qkv = torch.cat([self.q_norm(qkv[:, :, :h]), self.k_norm(qkv[:, :, h : h + kv]), qkv[:, :, h + kv :]],
                                dim=2)
            qkv = qkv.transpose(1, 2)  # [B, H+2K, T, D]
            # q and k are adjacent heads of the fused output: rotate them with one set of ops.
            qk = apply_rope(qkv[:, : h + kv], cos, sin)
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv :]  # [B, H, T, D], [B, K, T, D], [B, K, T, D]
        else:
            q = self._project(self.q_proj, x, "q_bias").view(b, t, h, d)
            k = self._project(self.k_proj, x, "k_bias").view(b, t, kv, d)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)
            k = apply_rope(k.transpose(1, 2), cos, sin)
            v = self._project(self.v_proj, x, "v_bias").view(b, t, kv, d).transpose(1, 2)
        if cache is None:  # training / scoring: whole sequences from position 0, no cache
            out = _attend_causal(q, k, v, self.attends)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
        if isinstance(cache, CacheRows):  # batched decoding: each row has its own cache and position
            out = _attend_rows(q, k, v, cache, layer, self.kernels, self.attends)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1).to(x.dtype))
        keys, values = cache.update(layer, start, k, v)  # [B, K, L, D], L = start + T
        if t == 1:
            out = _attend_one(q, keys, values, self.kernels, self.attends)
        else:
            out = _attend_chunk(q, keys, values, start, self.attends)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1).to(x.dtype))


def _attend_one(q: Tensor, keys: Tensor, values: Tensor, kernels: Kernels | None = None,
                how: Attends = Attends()) -> Tensor:
    """One query per sequence (decoding), in float32: on CPU several times faster than bf16
    SDPA for a single query, and exact. Grouped heads read the shared K/V without copies.
    With the native kernels (one sequence): the cache is read once as stored, on the kernels'
    threads (SDPA cost 45 µs a layer for SmolLM2 at 512 positions, 175 µs beside their pool)."""
    b, h, _, d = q.shape
    if how.window is not None and keys.shape[2] > how.window:  # the query is the last position
        keys, values = keys[:, :, -how.window :], values[:, :, -how.window :]
    if how.softcap is not None:
        return _attend_capped(q, keys, values, keys.shape[2] - 1, how)
    scale = how.scale or 1 / math.sqrt(d)
    if kernels is not None and b == 1 and kernels.attends(d, keys.dtype):
        out = kernels.attend_one(q.reshape(h, d).float().contiguous(), keys[0], values[0], scale)
        return out.view(1, h, 1, d)
    return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), scale=scale,
                                          enable_gqa=keys.shape[1] != q.shape[1])


def _attend_causal(q: Tensor, k: Tensor, v: Tensor, how: Attends = Attends()) -> Tensor:
    """Causal attention over whole sequences (training). On CPU in float32: the bf16 flash
    kernel's backward pass is 2.3x slower than the float32 one there (measured at T=126)."""
    gqa = k.shape[1] != q.shape[1]
    if how.softcap is not None or (how.window is not None and q.shape[2] > how.window):
        return _attend_chunk(q, k, v.to(q.dtype), 0, how)
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=how.scale, enable_gqa=gqa)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=how.scale,
                                              enable_gqa=gqa)


def _attend_capped(q: Tensor, keys: Tensor, values: Tensor, start: int, how: Attends) -> Tensor:
    """Attention with soft-capped scores (SDPA has no cap): q [B, H, T, D] at positions start..,
    keys/values [B, K, L, D], in float32 as transformers' eager path computes it."""
    t, length, group = q.shape[2], keys.shape[2], q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)
    v = values.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-1, -2) * (how.scale or 1 / math.sqrt(q.shape[-1]))  # [B, H, T, L]
    scores = torch.tanh(scores / how.softcap) * how.softcap
    scores = scores.masked_fill(~_mask(start, t, length, how.window, q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v


def _mask(start: int, t: int, length: int, window: int | None, device: torch.device) -> Tensor:
    """[T, L]: query start+i sees key j when j <= start+i (and j > start+i-window)."""
    qpos = torch.arange(start, start + t, device=device)
    kpos = torch.arange(length, device=device)[None, :]
    mask = kpos <= qpos[:, None]
    if window is not None:
        mask &= kpos > qpos[:, None] - window
    return mask


@dataclass
class CacheRows:
    """The caches of a decoding batch: row i is one sequence, its token at `positions[i]` of
    `caches[i]` (each a batch-1 KVCache, so every sequence keeps its own prompt cache slot)."""

    caches: list[KVCache]
    positions: list[int]


def _attend_rows(q: Tensor, k: Tensor, v: Tensor, rows: CacheRows, layer: int,
                 kernels: Kernels | None = None, how: Attends = Attends()) -> Tensor:
    """q: [B, H, 1, D], k/v: [B, K, 1, D]; each row attends to its own cache. The projections
    around it run batched, which is where decoding spends its time (reading the weights)."""
    out = []
    for i, (cache, pos) in enumerate(zip(rows.caches, rows.positions, strict=True)):
        keys, values = cache.update(layer, pos, k[i : i + 1], v[i : i + 1])
        out.append(_attend_one(q[i : i + 1], keys, values, kernels, how))
    return torch.cat(out)


def _attend_chunk(q: Tensor, keys: Tensor, values: Tensor, start: int, how: Attends = Attends()) -> Tensor:
    """T queries at positions start..start+T-1 against L = start+T keys, causally masked (and
    to the last `window` positions of each query)."""
    if how.softcap is not None:
        return _attend_capped(q, keys, values, start, how).to(q.dtype)
    mask = _mask(start, q.shape[2], keys.shape[2], how.window, q.device)
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=how.scale,
                                          enable_gqa=keys.shape[1] != q.shape[1])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        width = width or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse()
        self.gelu = cfg.hidden_act == "gelu_tanh"  # GeGLU (Gemma) instead of SwiGLU

    def fuse(self) -> None:
        """Merge gate and up into one matrix for inference."""
        fused = concat_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


def kept_float32(name: str, t: Tensor) -> bool:
    """Whether a plain parameter stays float32 whatever the model's dtype: norms, biases (1-D) and
    routers are small, and rounded to bf16 they cost the native step measurable top-1 agreement
    (llama.cpp keeps them in float32 too)."""
    return t.dim() == 1 or name.endswith(".mlp.gate.weight")


class Router(nn.Module):
    """Which experts read each token (Mixtral, Qwen3-MoE): softmax over every expert's score in
    float32, the top k, and their weights renormalised to sum to 1 where the config says so. Its
    weight stays in float, never quantized (llama.cpp keeps ffn_gate_inp so too): a rounded router
    chooses other experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.top_k, self.norm = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, C] -> (weights [N, k] float32, expert ids [N, k])."""
        probs = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # [N, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts


class MoE(nn.Module):
    """A mixture of experts in place of the MLP: each token goes through its top-k experts (each
    a SwiGLU MLP), their outputs summed with the router's weights. Rows are grouped by expert, so
    an expert's weights are read once for all the rows routed to it (a prompt, a batch of
    streams, drafts) and an expert no row chose is not read at all. Names follow Qwen3-MoE's
    (`mlp.gate`, `mlp.experts.N.gate_proj`); Mixtral's are renamed at load."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))

    def fuse(self) -> None:
        for expert in self.experts:
            expert.fuse()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, C]
        weights, chosen = self.gate(flat)  # [N, k]
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e in chosen.unique().tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](flat[rows])  # [n_e, C]
            out.index_add_(0, rows, y.float() * weights[rows, slot, None])
        return out.to(x.dtype).view(x.shape)


class DecoderLayer(nn.Module):
    """LLaMA's pre-norm layer; with `sandwich_norms` (Gemma) the attention's and the MLP's outputs
    are normalised too before they join the residual stream, and `post_attention_layernorm` is
    that norm of the attention's output (the MLP's input norm is then `pre_feedforward_layernorm`,
    as transformers names them)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.num_experts else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def fuse(self) -> None:
        self.self_attn.fuse()
        self.mlp.fuse()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | CacheRows | None, layer: int,
                start: int) -> Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attended)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Weights always come from a checkpoint: `_weight` skips the random init, whose meta-device
        # kernel costs a second of imports when the model is built on `meta`.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """The causal LM. Call `init_rope()` once the weights are on their device."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: Rotary | None = None
        self.rotary_local: Rotary | None = None  # the window layers' own (Gemma 3), when they have one
        self.kernels: Kernels | None = None
        self.fused: FusedDecoder | None = None  # decoding steps on the native kernels (decode_step.py)
        self.cache_dtype: torch.dtype | None = None  # KV cache entries (None: see make_cache)

    def use_kernels(self, kernels: Kernels | None, fused: bool = True) -> None:
        """Decoding on the native kernels: the fused step when every layer is tiled (`fused`),
        else attention natively and torch's small ops on one thread (see `_torch_threads`)."""
        self.kernels = kernels
        for layer in self.model.layers:
            layer.self_attn.kernels = kernels
        self.fused = FusedDecoder.build(self, kernels) if fused else None

    @contextlib.contextmanager
    def torch_threads(self, rows: int) -> Iterator[None]:
        """A decoding step (few rows) on the native kernels runs torch's small ops on one thread,
        and so does sampling beside it: torch's OpenMP workers and the kernels' pool would
        otherwise take turns on the same cores (rms_norm went from 13 to 50 µs a call, SDPA from
        45 to 175 µs, in a SmolLM2 step; a 49k-vocabulary argmax waited for a spinning worker)."""
        threads = torch.get_num_threads()
        if self.kernels is None or rows > DECODE_ROWS or threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def fused_fits(self, caches: Sequence[KVCache]) -> bool:
        """The fused step serves every cache: its attention keeps to each layer's window."""
        return True

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # a plain parameter whatever holds the other weights

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (norms, biases and routers are float32 whatever it is)."""
        embed = self.model.embed_tokens
        return embed.dtype if isinstance(embed, TiledEmbedding) else embed.weight.dtype

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up matrices (inference only; training keeps HF's modules)."""
        for layer in self.model.layers:
            layer.fuse()

    def init_rope(self, max_len: int | None = None) -> None:
        max_len = max_len or self.config.max_position_embeddings
        self.rotary = Rotary(self.config, max_len, self.device)
        if self.config.rope_local_theta is not None:
            self.rotary_local = Rotary(self.config, max_len, self.device, local=True)

    def rotary_of(self, layer: int) -> Rotary:
        """The RoPE table layer `layer` turns its queries and keys by."""
        local = self.rotary_local if self.config.local_rope(layer) else None
        assert self.rotary is not None
        return local or self.rotary

    def layer_rotaries(self) -> list[Rotary]:
        return [self.rotary_of(i) for i in range(self.config.num_hidden_layers)]

    def embed(self, tokens: Tensor) -> Tensor:
        """[..., C]: the tokens' embeddings, times sqrt(hidden) for Gemma (rounded to the
        activations' dtype first, as transformers does)."""
        x = self.model.embed_tokens(tokens)
        scale = self.config.embed_scale
        return x if scale == 1.0 else x * torch.tensor(scale, dtype=x.dtype)

    def logits(self, h: Tensor) -> Tensor:
        """float32 logits of final-norm hidden states, soft-capped where the config says (Gemma 2)."""
        out = self.lm_head(h).float()
        cap = self.config.final_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def _tables(self, start: int, length: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Each layer's cos/sin for positions start..start+length-1."""
        assert self.rotary is not None
        tables = {id(r): r(start, length, dtype) for r in {self.rotary, self.rotary_local} - {None}}
        return [tables[id(r)] for r in self.layer_rotaries()]

    def make_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A pre-allocated KV cache for `max_len` positions (default: the model's context)."""
        max_len = max_len or self.config.max_position_embeddings
        if self.rotary is None or self.rotary.cos.shape[0] < max_len:
            self.init_rope(max_len)
        cfg = self.config
        dtype = self.cache_dtype or self.default_cache_dtype()
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                       dtype=dtype, device=self.device)

    def default_cache_dtype(self) -> torch.dtype:
        """float16 with the native kernels (half the bytes a decoding step reads: at 2048 positions
        a 7B's float32 cache is 2 GiB, read whole every token); float32 on CPU otherwise (torch's
        single-query attention is fastest and exact there, see _attend_one); the model's dtype
        on a GPU."""
        if self.device.type != "cpu":
            return self.dtype
        return torch.float16 if self.kernels is not None else torch.float32

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start: int, cache: KVCache, all_logits: bool = False) -> Tensor:
        """tokens: [B, T] at positions start..start+T-1. Returns float32 logits, [B, T, V] when
        `all_logits`, else [B, V] for the last position only (all that sampling needs)."""
        b, t = tokens.shape
        if start + t > cache.max_len:
            raise ValueError(f"positions {start}..{start + t - 1} exceed the cache of {cache.max_len}")
        assert self.rotary is not None
        if b == 1 and self.fused is not None and self.fused_fits([cache]):
            # a prompt too, as rows of the decoding step: every position is computed by the same
            # arithmetic whether it is read fresh, in other chunks, or was cached by an earlier
            # request, so a greedy reply does not depend on what the cache held
            with self.torch_threads(t):  # its few torch ops (norms, the router) must not wait on OpenMP
                logits = self.fused.step(tokens[0].tolist(), [cache] * t, range(start, start + t),
                                         None if all_logits else [t - 1])
            return logits[None] if all_logits else logits
        with self.torch_threads(tokens.numel()):
            x = self.embed(tokens)  # [B, T, C]
            for i, (layer, (cos, sin)) in enumerate(zip(self.model.layers, self._tables(start, t, x.dtype),
                                                        strict=True)):
                x = layer(x, cos, sin, cache, i, start)
            if not all_logits:
                x = x[:, -1]
            return self.logits(self.model.norm(x))

    def hidden_states(self, tokens: Tensor, checkpoint: bool = False) -> Tensor:
        """Training and scoring: whole sequences tokens [B, T] from position 0, causally masked,
        no KV cache, gradients as the caller's mode allows. Returns the final-norm hidden states
        [B, T, C]; the caller applies `lm_head` to the positions it needs (only the reply's
        tokens carry loss, so most positions never need the [C, V] projection).
        `checkpoint` recomputes each layer in the backward pass instead of keeping its
        activations (gradient checkpointing: memory per layer drops to one [B, T, C] tensor)."""
        t = tokens.shape[1]
        if self.rotary is None or self.rotary.cos.shape[0] < t:
            self.init_rope(max(t, self.config.max_position_embeddings))
        assert self.rotary is not None
        x = self.embed(tokens)  # [B, T, C]
        for i, (layer, (cos, sin)) in enumerate(zip(self.model.layers, self._tables(0, t, x.dtype), strict=True)):
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, i, 0, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None, i, 0)
        return self.model.norm(x)

    @torch.inference_mode()
    def decode_batch(self, tokens: Sequence[int], caches: Sequence[KVCache], positions: Sequence[int],
                     keep: Sequence[int] | None = None) -> Tensor:
        """One decoding step for several sequences at once: token i at positions[i] of caches[i].
        Returns float32 logits [B, V] (only rows `keep`, if given). Weight-bound layers run once
        for the whole batch. With the fused step, several rows may be consecutive positions of
        one cache (drafts being verified, the rest of a short prompt); the module path takes one
        row per cache."""
        assert self.rotary is not None
        if self.fused is not None and self.fused_fits(caches):
            with self.torch_threads(len(tokens)):
                return self.fused.step(tokens, caches, positions, keep)
        for cache, pos in zip(caches, positions, strict=True):
            if pos >= cache.max_len:
                raise ValueError(f"position {pos} exceeds the cache of {cache.max_len}")
        with self.torch_threads(len(tokens)):
            x = self.embed(torch.tensor(tokens, device=self.device)[:, None])  # [B, 1, C]
            pos = torch.tensor(positions, device=self.device)
            rows = CacheRows(list(caches), list(positions))
            for i, layer in enumerate(self.model.layers):
                rotary = self.rotary_of(i)
                cos = rotary.cos[pos][:, None, None, :].to(x.dtype)  # [B, 1, 1, D]: per row
                sin = rotary.sin[pos][:, None, None, :].to(x.dtype)
                x = layer(x, cos, sin, rows, i, 0)
            x = x[:, -1] if keep is None else x[list(keep), -1]
            return self.logits(self.model.norm(x))

    def prefill(self, tokens: Tensor, start: int, cache: KVCache, chunk: int = 1024) -> Tensor:
        """Read a long prompt in chunks (bounded activation memory); returns last-position logits
        [B, V]. Large chunks amortize the per-chunk dequantization of int4/int8 weights (with
        1024 rows a 7B prompt reads 1.2x faster than with 512)."""
        logits = None
        for i in range(0, tokens.shape[1], chunk):
            logits = self(tokens[:, i : i + chunk], start + i, cache)
        assert logits is not None, "prefill needs at least one token"
        return logits
