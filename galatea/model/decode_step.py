"""One decoding step on the native kernels, fused into five kernel calls per layer.

The module path (llama.py) spends ~40 small torch ops per layer on a single token, each a
microsecond or more of dispatch, and SmolLM2's 30 layers then cost more in overhead than in
reading the weights. Here, with x the float32 residual stream [B, C] (row b: one sequence at
its own position, in its own cache):

    qkv  = W_qkv  rmsnorm(x)              mat-mul, the norm applied while quantizing its input
    attn = attention(qkv)                 rotate q and k, write k and v to the cache, attend
    x   += W_o    attn                    mat-mul adding into x
    gu   = W_gu   rmsnorm(x)              mat-mul with the norm
    x   += W_down silu(gate) * up         mat-mul with SwiGLU applied to its input, adding into x

and the logits are W_head rmsnorm(x). The module path stays the reference: the tests compare
both on every model.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from galatea.kernels.native import ISA_IDS, KV_DTYPE_IDS, Kernels
from galatea.model.cache import KVCache
from galatea.model.tiled import TiledEmbedding, TiledLinear

PRE_NONE, PRE_RMSNORM, PRE_SWIGLU = 0, 1, 2
KEEP_PLANS = 64  # plans (buffers + call arguments) kept for row counts up to this


class FusedDecoder:
    """The decoding step of one model; `build` says whether the model qualifies."""

    def __init__(self, model: torch.nn.Module, kernels: Kernels) -> None:
        cfg = model.config
        self.model, self.kernels, self.lib = model, kernels, kernels.lib
        self.isa = ISA_IDS[kernels.isa]
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hidden, self.eps, self.vocab = cfg.hidden_size, cfg.rms_norm_eps, cfg.vocab_size
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj,
                                layer.input_layernorm.weight.detach().float().contiguous(),
                                layer.post_attention_layernorm.weight.detach().float().contiguous()))
        # Qwen2's q/k/v biases, added to the projection's output before attention reads it
        self.qkv_bias = [None if layer.self_attn.qkv_bias is None else layer.self_attn.qkv_bias.float().contiguous()
                         for layer in model.model.layers]
        self.final_norm = model.model.norm.weight.detach().float().contiguous()
        self.head: TiledLinear = model.lm_head
        self._plans: dict[int, tuple[dict[str, Tensor], list[tuple]]] = {}
        # seconds of a one-row step, and per extra row, as moving averages of the steps run
        self._one_row: float | None = None
        self._per_row: float | None = None

    @property
    def row_cost(self) -> float:
        """What a row beside the first costs, relative to a one-row step (0.15 until measured):
        what speculative decoding weighs its drafts against."""
        if self._one_row is None or self._per_row is None:
            return 0.15
        return max(0.02, self._per_row / self._one_row)

    def _timed(self, rows: int, seconds: float) -> None:
        if rows == 1:
            self._one_row = seconds if self._one_row is None else 0.9 * self._one_row + 0.1 * seconds
        elif self._one_row is not None and rows <= 9:  # decoding-sized steps, not prompts
            extra = max(0.0, seconds - self._one_row) / (rows - 1)
            self._per_row = extra if self._per_row is None else 0.8 * self._per_row + 0.2 * extra

    @classmethod
    def build(cls, model: torch.nn.Module, kernels: Kernels | None) -> FusedDecoder | None:
        if kernels is None or model.config.head_dim % 16 or model.config.head_dim > 256:
            return None
        for layer in model.model.layers:
            parts = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if not all(isinstance(p, TiledLinear) for p in parts):
                return None  # not fused, or some matrix stayed float
        return cls(model, kernels) if isinstance(model.lm_head, TiledLinear) else None

    def _plan(self, rows: int) -> tuple[dict[str, Tensor], list[tuple]]:
        """Buffers for `rows` sequences and every layer's mat-mul arguments, made once: the
        pointers never change, so a step only calls."""
        if rows in self._plans:
            return self._plans[rows]
        d = self.head_dim
        qkv_w = (self.heads + 2 * self.kv_heads) * d
        inter = self.layers[0][2].out_features // 2
        buf = {"x": torch.empty(rows, self.hidden), "qkv": torch.empty(rows, qkv_w),
               "attn": torch.empty(rows, self.heads * d), "gu": torch.empty(rows, 2 * inter)}
        x, qkv, attn, gu = (buf[n].data_ptr() for n in ("x", "qkv", "attn", "gu"))

        def call(lin: TiledLinear, src: int, ldx: int, dst: int, ldo: int, acc: int, pre: int, norm: Tensor | None):
            return (self.isa, ctypes.addressof(lin.segments), len(lin.segments), lin.in_features, src, 0, ldx, rows,
                    dst, 0, ldo, acc, pre, None if norm is None else norm.data_ptr(), self.eps)

        plan = []
        for qkv_p, o_p, gu_p, down_p, n1, n2 in self.layers:
            plan.append((call(qkv_p, x, self.hidden, qkv, qkv_w, 0, PRE_RMSNORM, n1),
                         call(o_p, attn, self.heads * d, x, self.hidden, 1, PRE_NONE, None),
                         call(gu_p, x, self.hidden, gu, 2 * inter, 0, PRE_RMSNORM, n2),
                         call(down_p, gu, 2 * inter, x, self.hidden, 1, PRE_SWIGLU, None)))
        if rows <= KEEP_PLANS:  # decoding sizes; a prompt chunk's are made anew (each costs ~0.1 ms)
            self._plans[rows] = (buf, plan)
        return buf, plan

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], caches: Sequence[KVCache], positions: Sequence[int],
             keep: Sequence[int] | None = None) -> Tensor:
        """Token b at positions[b] of caches[b] (batch-1 caches; rows of one cache at consecutive
        positions attend causally to each other); returns float32 logits [B, V], or only for the
        rows in `keep` (the output head is the largest matrix: a prompt needs its last row's)."""
        rows = len(tokens)
        started = time.perf_counter()
        for cache, pos in zip(caches, positions, strict=True):
            if pos >= cache.max_len:
                raise ValueError(f"position {pos} exceeds the cache of {cache.max_len}")
        rotary = self.model.rotary
        assert rotary is not None and rotary.cos.dtype == torch.float32
        buf, plan = self._plan(rows)
        embed = self.model.model.embed_tokens
        ids = torch.tensor(tokens)
        buf["x"].copy_(embed(ids) if isinstance(embed, TiledEmbedding) else embed(ids.to(embed.weight.device)))
        # per-row cache geometry, once per step: [layers, 1, K, S, D] tensors
        i64, ptr = ctypes.c_int64 * rows, ctypes.c_void_p * rows
        pos = i64(*positions)
        head_stride = i64(*(c.keys.stride(2) for c in caches))
        layer_bytes = [c.keys.stride(0) * c.keys.element_size() for c in caches]
        kbase, vbase = [c.keys.data_ptr() for c in caches], [c.values.data_ptr() for c in caches]
        kv_dtype = KV_DTYPE_IDS[caches[0].keys.dtype]
        pos_stride = caches[0].keys.stride(3)
        matmul, attend = self.lib.gx_matmul, self.lib.gx_decode_attention
        qkv, attn = buf["qkv"], buf["attn"]
        scale = 1 / self.head_dim**0.5
        for i, (qkv_call, o_call, gu_call, down_call) in enumerate(plan):
            if matmul(*qkv_call):
                raise RuntimeError("native mat-mul refused its arguments")
            if self.qkv_bias[i] is not None:
                qkv.add_(self.qkv_bias[i])
            kp = ptr(*(b + i * lb for b, lb in zip(kbase, layer_bytes, strict=True)))
            vp = ptr(*(b + i * lb for b, lb in zip(vbase, layer_bytes, strict=True)))
            rc = attend(self.isa, qkv.data_ptr(), qkv.stride(0), rows, pos, kp, vp, head_stride, pos_stride,
                        kv_dtype, self.heads, self.kv_heads, self.head_dim, rotary.cos.data_ptr(),
                        rotary.sin.data_ptr(), scale, attn.data_ptr(), attn.stride(0))
            if rc != 0:
                raise RuntimeError(f"native decode attention refused its arguments (code {rc})")
            if matmul(*o_call) or matmul(*gu_call) or matmul(*down_call):
                raise RuntimeError("native mat-mul refused its arguments")
        x = buf["x"] if keep is None or len(keep) == rows else buf["x"][torch.tensor(list(keep))]
        logits = torch.empty(x.shape[0], self.vocab)
        head = self.head
        matmul(self.isa, ctypes.addressof(head.segments), len(head.segments), head.in_features, x.data_ptr(),
               0, self.hidden, x.shape[0], logits.data_ptr(), 0, self.vocab, 0, PRE_RMSNORM,
               self.final_norm.data_ptr(), self.eps)
        self._timed(rows, time.perf_counter() - started)
        return logits
