"""The q8_0 KV cache (`--kv-cache q8_0`, KoboldCpp's --quantkv 1) against independent references:
its blocks are gguf-py's Q8_0 (bit-exact with ggml's reference quantizer), the native kernels'
attention over them is float64 attention over gguf-py's dequantization, the decoding step stores
what gguf-py's quantizer writes, a context shift moves runs as float64 rotation would place them,
and on a real SillyTavern prompt the embedded model agrees with its float16 cache as well as
llama.cpp's own q8_0 cache agrees with llama.cpp's float16 one."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from galatea.kernels import native
from galatea.model.cache import Q8_CACHE, dequantize_q8, quantize_q8
from galatea.model.checkpoint import embedded_model_path, load
from tests.helpers import PATHS

SESSION = Path(__file__).parent / "data" / "sillytavern-session" / "seraphina.jsonl"


def gguf_q8(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float32 -> [..., D/32*34] uint8, by gguf-py's Q8_0."""
    return torch.from_numpy(quantize(x.float().numpy(), Q.Q8_0).copy())


def gguf_float(b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(dequantize(b.numpy(), Q.Q8_0).copy()).double()


def kernels(path: str) -> native.Kernels:
    k, _ = native.select(path)
    assert k is not None
    return k


def test_blocks_are_ggml_q8_0_bit_for_bit():
    x = torch.randn(3, 7, 128) * torch.linspace(0.01, 30, 128)  # outlier channels, as keys have
    x[0, 0, :32] = 0  # an all-zero block: scale 0
    assert torch.equal(quantize_q8(x), gguf_q8(x))
    assert torch.equal(dequantize_q8(gguf_q8(x)).double(), gguf_float(gguf_q8(x)))


@pytest.mark.parametrize("path", PATHS)
def test_native_attention_reads_q8_blocks(path):
    kern = kernels(path)
    heads, kv_heads, d, slots = 8, 2, 64, 700
    keys = gguf_q8(torch.randn(kv_heads, slots, d) * 2)
    values = gguf_q8(torch.randn(kv_heads, slots, d))
    assert kern.attends(d, keys.dtype) and not kern.attends(48, Q8_CACHE)
    for length in (1, 15, 64, 300, 700):
        q = torch.randn(heads, d)
        out = kern.attend_one(q, keys[:, :length], values[:, :length], 1 / math.sqrt(d))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, None].double(), gguf_float(keys[:, :length])[None], gguf_float(values[:, :length])[None],
            enable_gqa=True)[0, :, 0]
        assert torch.allclose(out.double(), ref, atol=2e-5), (length, (out.double() - ref).abs().max())


@pytest.mark.parametrize("path", PATHS)
def test_the_decoding_step_stores_q8_blocks_and_attends_to_them(path):
    from galatea.model.config import ModelConfig
    from galatea.model.llama import Rotary, apply_rope

    kern = kernels(path)
    heads, kv_heads, d, slots = 4, 2, 64, 40
    cfg = ModelConfig(vocab_size=8, hidden_size=heads * d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=slots)
    rot = Rotary(cfg, slots)
    kc, vc = gguf_q8(torch.randn(kv_heads, slots, d)), gguf_q8(torch.randn(kv_heads, slots, d))
    rows = [17, 18]  # one cache, consecutive positions (drafts being verified)
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d)
    given = qkv.clone()
    out = torch.empty(2, heads * d)
    i64, ptr = ctypes.c_int64 * 2, ctypes.c_void_p * 2
    rc = kern.lib.gx_step_attention(
        native.ISA_IDS[path], qkv.data_ptr(), qkv.stride(0), 2, i64(*rows), ptr(kc.data_ptr(), kc.data_ptr()),
        ptr(vc.data_ptr(), vc.data_ptr()), i64(*[native.kv_stride(kc, 0)] * 2), native.kv_stride(kc, 1),
        native.KV_DTYPE_IDS[Q8_CACHE], heads, kv_heads, d, rot.cos.data_ptr(), rot.sin.data_ptr(),
        1 / math.sqrt(d), 0.0, 0, None, None, 0.0, out.data_ptr(), out.stride(0))
    assert rc == 0
    for r, pos in enumerate(rows):
        x = given[r].view(heads + 2 * kv_heads, 1, d)
        k = apply_rope(x[heads : heads + kv_heads], rot.cos[pos : pos + 1], rot.sin[pos : pos + 1])[:, 0]
        assert torch.equal(vc[:, pos], gguf_q8(x[heads + kv_heads :, 0]))  # values: exactly gguf's blocks
        # keys are rotated with fused multiply-adds (one rounding fewer than torch): a code may differ by one
        step = gguf_float(gguf_q8(k)).abs().amax(-1, keepdim=True) / 127
        assert ((gguf_float(kc[:, pos]) - gguf_float(gguf_q8(k))).abs() <= step * 1.001 + 1e-7).all()
    for r, pos in enumerate(rows):
        q = qkv[r, : heads * d].view(heads, d)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, None].double(), gguf_float(kc[:, : pos + 1])[None], gguf_float(vc[:, : pos + 1])[None],
            enable_gqa=True)[0, :, 0]
        assert torch.allclose(out[r].view(heads, d).double(), ref, atol=2e-5)


@pytest.mark.parametrize("native_move", [True, False], ids=["native", "torch"])
def test_a_context_shift_moves_q8_blocks(native_move):
    """Runs moved down and up, overlapping: values keep their bytes, keys are the dequantized
    keys rotated (float64) to their new positions and quantized again (one code of rounding), and
    no other position changes; with the native kernels and on the torch path."""
    from galatea.model.cache import KVCache
    from galatea.model.config import ModelConfig
    from galatea.model.llama import Rotary

    kern = kernels("auto") if native_move else None
    layers, kv_heads, d, slots = 2, 3, 64, 120
    cfg = ModelConfig(vocab_size=8, hidden_size=kv_heads * d, intermediate_size=8, num_hidden_layers=layers,
                      num_attention_heads=kv_heads, num_key_value_heads=kv_heads, max_position_embeddings=slots)
    rot = Rotary(cfg, slots)
    cos, sin = rot.cos.double(), rot.sin.double()
    for src, dst, n in [(40, 10, 50), (10, 35, 50), (70, 0, 50)]:
        cache = KVCache(layers, 1, kv_heads, slots, d, dtype=Q8_CACHE)
        cache.keys.copy_(gguf_q8(torch.randn(layers, 1, kv_heads, slots, d) * 3))
        cache.values.copy_(gguf_q8(torch.randn(layers, 1, kv_heads, slots, d)))
        keys, values = cache.keys.clone(), cache.values.clone()
        cache.move([(src, dst, n)], rot, kern)
        stored = gguf_float(keys[..., src : src + n, :])
        turned = _turn(stored, cos, sin, dst - src)
        step = turned.abs().amax(-1, keepdim=True) / 127
        got = gguf_float(cache.keys[..., dst : dst + n, :])
        assert ((got - turned).abs() <= step * 1.01 + 1e-6).all(), (src, dst, (got - turned).abs().max())
        assert torch.equal(cache.values[..., dst : dst + n, :], values[..., src : src + n, :])
        untouched = [p for p in range(slots) if not dst <= p < dst + n]
        assert torch.equal(cache.keys[..., untouched, :], keys[..., untouched, :])


def _turn(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, delta: int) -> torch.Tensor:
    """Keys k [..., T, D] turned by `delta` positions (RoPE's rotation
    by delta x frequency, HF's rotate-half layout), in float64."""
    half = k.shape[-1] // 2
    c, s = cos[abs(delta), :half], sin[abs(delta), :half] * (1 if delta > 0 else -1)
    lo, hi = k[..., :half], k[..., half:]
    return torch.cat([lo * c - hi * s, hi * c + lo * s], dim=-1)


def _agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).mean())


@pytest.mark.slow
def test_q8_cache_agrees_with_float16_as_well_as_llama_cpps_does():
    """The first prompt SillyTavern sent (1300 tokens of persona chat), read through each cache in
    chunks and then decoded 32 tokens one at a time (the native step): top-1 agreement of every
    position with the float16 cache, against llama.cpp's q8_0 against its float16 cache (0.96 here:
    a 135M model has many near-ties, so the issue's 0.99 is not reached by the format itself).
    A q8_0 slot holds 34/64 of a float16 one."""
    from llama_cpp import Llama

    text = json.loads(SESSION.open().readline())["body"]["prompt"]
    ours, theirs, sizes = {}, {}, {}
    for kv in ("float16", "q8_0"):
        lm = load(embedded_model_path(), kv_cache=kv)
        assert lm.model.fused is not None
        ids = lm.tokenizer.encode(text)
        cache = lm.model.make_cache(1, len(ids) + 40)
        logits = [lm.model(torch.tensor([ids[i : i + 256]]), i, cache, all_logits=True)[0]
                  for i in range(0, len(ids), 256)]
        token = int(logits[-1][-1].argmax())  # greedy from here, the same tokens fed to both caches
        follow = lm.tokenizer.encode(" *She smiles and takes your hand, leading you toward the garden.*")[:32]
        for j, t in enumerate(follow):
            logits.append(lm.model(torch.tensor([[t]]), len(ids) + j, cache, all_logits=True)[0])
        assert token >= 0
        ours[kv], sizes[kv] = torch.cat(logits).numpy(), cache.nbytes
        tk = {"float16": 1, "q8_0": 8}[kv]  # GGML_TYPE_F16, GGML_TYPE_Q8_0
        llm = Llama(str(embedded_model_path()), n_ctx=len(ids) + 64, n_batch=256, logits_all=True, verbose=False,
                    n_threads=2, type_k=tk, type_v=tk, flash_attn=True)
        llm.eval(ids + follow)
        theirs[kv] = np.array(llm.scores[: len(ids) + len(follow)])
    mine, llama = _agreement(ours["float16"], ours["q8_0"]), _agreement(theirs["float16"], theirs["q8_0"])
    print(f"top-1 agreement of q8_0 with float16: Galatea {mine:.4f}, llama.cpp {llama:.4f}")
    assert mine >= llama - 0.01, (mine, llama)
    assert sizes["q8_0"] / sizes["float16"] == 34 / 64


@pytest.mark.slow
def test_context_shift_and_chunk_reuse_work_on_a_q8_cache():
    """As tests/test_context_shift.py checks the float16 cache: after a shift, and after chunk
    reuse moved runs both ways, predictions over the new text track a fresh q8_0 computation."""
    from galatea.engine.prompt_cache import PromptCache
    from tests.test_context_shift import PERSONA, TURNS, chat_text, fill

    lm = load(embedded_model_path(), kv_cache="q8_0")
    assert lm.model.make_cache(1, 8).quantized
    tok = lm.tokenizer
    held = tok.encode(chat_text(TURNS))
    shifted_turn = tok.encode(chat_text([*TURNS[2:], ("You", "Tell me the first verse of the ballad.")]) + "Aria:")
    reworded = tok.encode(PERSONA + "[Eldoria: misty glades and the river Velka.]\n" + chat_text(TURNS)[len(PERSONA):]
                          + "You: And the lute?\nAria:")
    for new, moved in ((shifted_turn, "down"), (reworded, "up")):
        slot = PromptCache(context_shift=True)
        fill(lm, slot, held, 512)
        cache, plan = slot.reuse(lm.model, new, 512)
        assert plan.moves and any((d < s) == (moved == "down") for s, d, _ in plan.moves), plan
        first = plan.compute[0][0]
        for a, b in plan.compute:
            got = lm.model(torch.tensor([new[a:b]]), a, cache, all_logits=True)[0]
        fresh_cache = lm.model.make_cache(1, 512)
        fresh = lm.model(torch.tensor([new]), 0, fresh_cache, all_logits=True)[0]
        if len(plan.compute) == 1:
            agree = (got.argmax(-1) == fresh[first:].argmax(-1)).float().mean().item()
            assert agree >= 0.8, (moved, agree)
        assert int(got[-1].argmax()) == int(fresh[-1].argmax()), moved  # the reply starts the same way
