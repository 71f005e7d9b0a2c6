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

and the logits are W_head rmsnorm(x). The families' differences are arguments of these calls:
Qwen2's biases (added to qkv), Qwen3's and Gemma 3's q/k norms and every layer's window, soft
cap, query scale and RoPE table (inside the attention call), Gemma's GeGLU (the down call's
pre-op) and its norms of the attention's and MLP's outputs (those calls write a buffer that is
normalised into x), and a mixture of experts in place of gu/down (one gx_moe call). A prompt
is read by the same step, its rows in chunks, so a position computes the same whether it was
read fresh or cached. The module path stays the reference: the tests compare both on every
family.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from galatea.kernels.native import ISA_IDS, KV_DTYPE_IDS, Kernels, Segment, kv_stride
from galatea.model.cache import KVCache
from galatea.model.tiled import TiledEmbedding, TiledLinear

if TYPE_CHECKING:
    from galatea.model.llama import MoE

PRE_NONE, PRE_RMSNORM, PRE_SWIGLU, PRE_GEGLU = 0, 1, 2, 3
KEEP_PLANS = 64  # plans (buffers + call arguments) kept for row counts up to this


def _f32(weight: Tensor) -> Tensor:
    return weight.detach().float().contiguous()


class FusedDecoder:
    """The decoding step of one model; `build` says whether the model qualifies."""

    def __init__(self, model: torch.nn.Module, kernels: Kernels) -> None:
        cfg = model.config
        self.model, self.kernels, self.lib = model, kernels, kernels.lib
        self.isa = ISA_IDS[kernels.isa]
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.hidden, self.eps, self.vocab = cfg.hidden_size, cfg.rms_norm_eps, cfg.vocab_size
        self.layers = []
        self.moe: list[MoE | None] = []  # a layer's experts, where its MLP is a mixture of them
        # Gemma: the attention's and the MLP's outputs normalised before they join x (their norms)
        self.sandwich: list[tuple[Tensor, Tensor] | None] = []
        self.attends = [layer.self_attn.attends for layer in model.model.layers]  # window, scale, softcap
        self.gated = PRE_GEGLU if cfg.hidden_act == "gelu_tanh" else PRE_SWIGLU
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            moe = mlp if hasattr(mlp, "experts") else None  # llama.MoE (llama.py imports this module)
            self.moe.append(moe)
            mlp_norm = layer.pre_feedforward_layernorm if layer.sandwich else layer.post_attention_layernorm
            self.layers.append((attn.qkv_proj, attn.o_proj, None if moe else mlp.gate_up_proj,
                                None if moe else mlp.down_proj, _f32(layer.input_layernorm.weight),
                                _f32(mlp_norm.weight)))
            self.sandwich.append((_f32(layer.post_attention_layernorm.weight),
                                  _f32(layer.post_feedforward_layernorm.weight)) if layer.sandwich else None)
        # Qwen2's q/k/v biases, added to the projection's output before attention reads it
        self.qkv_bias = [None if layer.self_attn.qkv_bias is None else layer.self_attn.qkv_bias.float().contiguous()
                         for layer in model.model.layers]
        # Qwen3's per-head q/k norms, applied to the projection's output before attention reads it
        self.qk_norms = [(_f32(a.q_norm.weight), _f32(a.k_norm.weight)) if hasattr(a, "q_norm") else None
                         for a in (layer.self_attn for layer in model.model.layers)]
        # a mixture of experts' layer: its router and every expert's segments, as gx_moe takes them
        self.experts = [self._expert_tables(moe) if moe is not None else None for moe in self.moe]
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
            mlps = layer.mlp.experts if hasattr(layer.mlp, "experts") else [layer.mlp]
            parts = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, *(p for m in mlps for p in (m.gate_up_proj,
                                                                                                   m.down_proj)))
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
        inter = max((lin[2].out_features // 2 for lin in self.layers if lin[2] is not None), default=0)
        buf = {"x": torch.empty(rows, self.hidden), "qkv": torch.empty(rows, qkv_w),
               "attn": torch.empty(rows, self.heads * d), "gu": torch.empty(rows, 2 * inter),
               "out": torch.empty(rows, self.hidden)}  # a sublayer's output, normalised before it joins x
        x, qkv, attn, gu, out = (buf[n].data_ptr() for n in ("x", "qkv", "attn", "gu", "out"))

        def call(lin: TiledLinear, src: int, ldx: int, dst: int, ldo: int, acc: int, pre: int, norm: Tensor | None):
            return (self.isa, ctypes.addressof(lin.segments), len(lin.segments), lin.in_features, src, 0, ldx, rows,
                    dst, 0, ldo, acc, pre, None if norm is None else norm.data_ptr(), self.eps)

        plan = []
        for (qkv_p, o_p, gu_p, down_p, n1, n2), sandwich in zip(self.layers, self.sandwich, strict=True):
            # with sandwich norms the outputs land in `out` (normalised, then added to x); else they add into x
            dst, acc = (out, 0) if sandwich else (x, 1)
            plan.append((call(qkv_p, x, self.hidden, qkv, qkv_w, 0, PRE_RMSNORM, n1),
                         call(o_p, attn, self.heads * d, dst, self.hidden, acc, PRE_NONE, None),
                         None if gu_p is None else call(gu_p, x, self.hidden, gu, 2 * inter, 0, PRE_RMSNORM, n2),
                         None if down_p is None else call(down_p, gu, 2 * inter, dst, self.hidden, acc, self.gated,
                                                          None)))
        if rows <= KEEP_PLANS:  # decoding sizes; a prompt chunk's are made anew (each costs ~0.1 ms)
            self._plans[rows] = (buf, plan)
        return buf, plan

    @staticmethod
    def _expert_tables(moe: MoE) -> tuple:
        """(router [E, C] float32, gate/up segments [E x n], down segments [E x n], width)."""
        gate_up = [seg for e in moe.experts for seg in e.gate_up_proj.segments]
        down = [seg for e in moe.experts for seg in e.down_proj.segments]
        return (_f32(moe.gate.weight), (Segment * len(gate_up))(*gate_up), len(gate_up) // len(moe.experts),
                (Segment * len(down))(*down), len(down) // len(moe.experts), moe.experts[0].down_proj.in_features)

    def _experts(self, moe: MoE, norm: Tensor, x: Tensor, tables: tuple) -> None:
        """x [rows, C] += the mixture of experts of rmsnorm(x), in one native call (gx_moe): the
        router, the rows gathered by expert (each chosen expert's weights read once for all its
        rows, the others not at all), gate/up, the gated down, the weighted sum."""
        router, gate_up, n_gu, down, n_down, width = tables
        if self.lib.gx_moe(self.isa, x.data_ptr(), x.stride(0), x.shape[0], self.hidden, norm.data_ptr(), self.eps,
                           router.data_ptr(), router.shape[0], moe.gate.top_k, int(moe.gate.norm), gate_up, n_gu,
                           down, n_down, width, self.gated):
            raise RuntimeError("native mixture of experts refused its arguments")

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
        rotaries = self.model.layer_rotaries()
        assert all(r.cos.dtype == torch.float32 for r in rotaries)
        buf, plan = self._plan(rows)
        embed = self.model.model.embed_tokens
        ids = torch.tensor(tokens)
        buf["x"].copy_(embed(ids, torch.float32) if isinstance(embed, TiledEmbedding)
                       else embed(ids.to(embed.weight.device)))
        if self.model.config.embed_scale != 1.0:  # Gemma: the embeddings times sqrt(hidden)
            buf["x"].mul_(self.model.config.embed_scale)
        # per-row cache geometry, once per step: [layers, 1, K, S, D] tensors
        i64, ptr = ctypes.c_int64 * rows, ctypes.c_void_p * rows
        pos = i64(*positions)
        head_stride = i64(*(kv_stride(c.keys, 2) for c in caches))
        layer_bytes = [c.keys.stride(0) * c.keys.element_size() for c in caches]
        kbase, vbase = [c.keys.data_ptr() for c in caches], [c.values.data_ptr() for c in caches]
        kv_dtype = KV_DTYPE_IDS[caches[0].keys.dtype]
        pos_stride = kv_stride(caches[0].keys, 3)
        matmul, attend = self.lib.gx_matmul, self.lib.gx_step_attention
        qkv, attn, x, out = buf["qkv"], buf["attn"], buf["x"], buf["out"]
        for i, (qkv_call, o_call, gu_call, down_call) in enumerate(plan):
            if matmul(*qkv_call):
                raise RuntimeError("native mat-mul refused its arguments")
            if self.qkv_bias[i] is not None:
                qkv.add_(self.qkv_bias[i])
            kp = ptr(*(b + i * lb for b, lb in zip(kbase, layer_bytes, strict=True)))
            vp = ptr(*(b + i * lb for b, lb in zip(vbase, layer_bytes, strict=True)))
            how, rotary, qk = self.attends[i], rotaries[i], self.qk_norms[i]
            rc = attend(self.isa, qkv.data_ptr(), qkv.stride(0), rows, pos, kp, vp, head_stride, pos_stride,
                        kv_dtype, self.heads, self.kv_heads, self.head_dim, rotary.cos.data_ptr(),
                        rotary.sin.data_ptr(), how.scale or self.head_dim**-0.5, how.softcap or 0.0,
                        how.window or 0, None if qk is None else qk[0].data_ptr(),
                        None if qk is None else qk[1].data_ptr(), self.eps, attn.data_ptr(), attn.stride(0))
            if rc != 0:
                raise RuntimeError(f"native decode attention refused its arguments (code {rc})")
            if matmul(*o_call):
                raise RuntimeError("native mat-mul refused its arguments")
            sandwich = self.sandwich[i]
            if sandwich is not None:
                x.add_(F.rms_norm(out, (self.hidden,), sandwich[0], self.eps))
            moe = self.moe[i]
            if moe is not None:
                self._experts(moe, self.layers[i][5], x, self.experts[i])
            elif matmul(*gu_call) or matmul(*down_call):
                raise RuntimeError("native mat-mul refused its arguments")
            if sandwich is not None:
                x.add_(F.rms_norm(out, (self.hidden,), sandwich[1], self.eps))
        x = x if keep is None or len(keep) == rows else x[torch.tensor(list(keep))]
        logits = torch.empty(x.shape[0], self.vocab)
        head = self.head
        matmul(self.isa, ctypes.addressof(head.segments), len(head.segments), head.in_features, x.data_ptr(),
               0, self.hidden, x.shape[0], logits.data_ptr(), 0, self.vocab, 0, PRE_RMSNORM,
               self.final_norm.data_ptr(), self.eps)
        cap = self.model.config.final_softcap
        if cap is not None:  # Gemma 2
            logits = torch.tanh(logits.div_(cap)).mul_(cap)
        self._timed(rows, time.perf_counter() - started)
        return logits
