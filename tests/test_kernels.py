"""The native kernels against independent references, for every GGUF type they hold and every
instruction-set path this CPU has (forced one by one), at M in {1, 2, 3, 8, 16, 17, 64} rows and
output sizes that leave a partial 16-row tile.

References: gguf-py's own dequantization of the same blocks (repack + dequantize must give its
values bit for bit), and the float64 product of those weights with the activations.

Tolerance. The kernels quantize each activation row to int8 in blocks of 32 (d = amax/127, as
llama.cpp does), so each x_i becomes d*q_i with |x_i - d*q_i| <= d/2. The output error is then at
most sum_blocks (d_b / 2) * sum_{i in b} |w_i|, computed exactly per output in float64 (plus
float32 rounding of the sums). That bound is loose, so a second check reproduces the int8
activations in numpy (same rule, nearest-even rounding) and requires the float64 product with
them to match within float32 accumulation error: one wrong code among thousands fails it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from galatea.kernels import native
from galatea.model.tiled import TiledLinear, TiledWeight
from tests.helpers import PATHS

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]
# byte offsets of each block's fp16 scales (d, and dmin for K-quants)
SCALES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2),
          Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def kernels(path: str) -> native.Kernels:
    k, _ = native.select(path)
    assert k is not None
    return k


def random_blocks(qtype: Q, n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, k] as GGUF blocks of random bytes, with random but finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for at in SCALES[qtype]:
        scales = rng.uniform(-0.02, 0.02, size=(n, k // block)).astype(np.float16)
        raw[..., at : at + 2] = scales.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def int8_activations(x: np.ndarray) -> np.ndarray:
    """x [M, K] float32 as the kernels see it: per block of 32, d = amax/127, q = rint(x * 127/amax)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    q = np.rint((blocks * inv).astype(np.float32))
    d = (amax / np.float32(127)).astype(np.float32)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def check_product(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """y [M, N] from the kernels against x [M, K] (float32) times w [N, K] (float64)."""
    exact = x.astype(np.float64) @ w.T
    d = np.abs(x.reshape(x.shape[0], -1, 32)).max(-1) / 127  # [M, K/32]
    bound = (d / 2) @ np.abs(w).reshape(w.shape[0], -1, 32).sum(-1).T  # [M, N]
    slack = 1e-5 * np.abs(x.astype(np.float64)) @ np.abs(w).T + 1e-6
    assert np.all(np.abs(y - exact) <= bound + slack), f"max excess {np.max(np.abs(y - exact) - bound - slack)}"
    emulated = int8_activations(x) @ w.T
    assert np.abs(y - emulated).max() <= 2e-5 * np.abs(emulated).max() + 1e-6


def test_the_library_is_built_and_runs_on_this_cpu():
    lib, why = native.library()
    assert lib is not None, why
    assert PATHS, "this CPU has neither AVX2 nor AVX-512 VNNI"
    assert native.select("auto")[0].isa == PATHS[0]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_tiles_dequantize_to_gguf_values_bit_for_bit(qtype):
    k = 512
    for n in (16, 77):  # a partial last tile
        raw = random_blocks(qtype, n, k)
        ref = gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32)
        kern = kernels(PATHS[0])
        tiles = kern.repack(int(qtype), raw, n, k)
        assert tiles.numel() == -(-n // 16) * 16 * raw.shape[1]  # exactly the file's bytes per row
        assert np.array_equal(kern.dequantize(int(qtype), tiles, n, k).numpy().view(np.uint32), ref.view(np.uint32))
        rows = [76 % n, 0, 5, 3]  # any rows, in any order (embedding lookups)
        assert np.array_equal(kern.dequantize(int(qtype), tiles, n, k, rows).numpy(), ref[rows])


def test_repack_applies_a_row_order():
    raw = random_blocks(Q.Q4_K, 48, 256)
    kern = kernels(PATHS[0])
    order = torch.randperm(48)
    tiles = kern.repack(int(Q.Q4_K), raw, 48, 256, rows=order)
    ref = gguf.quants.dequantize(raw, Q.Q4_K).reshape(48, 256)
    assert np.array_equal(kern.dequantize(int(Q.Q4_K), tiles, 48, 256).numpy(), ref[order.numpy()])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_the_float64_product(qtype, path):
    kern = kernels(path)
    block = GGML_QUANT_SIZES[qtype][0]
    for n, k in ((77, 512), (40, 3 * block)):
        raw = random_blocks(qtype, n, k, seed=n)
        w = gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float64)
        layer = TiledLinear([TiledWeight.from_blocks(kern, int(qtype), raw, n, k)], kern)
        for m in (1, 2, 3, 8, 16, 17, 64):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            x[0, :32] *= 50  # an outlier block, as LLaMA's activations have
            check_product(layer(x).numpy(), x.numpy(), w)


@pytest.mark.parametrize("path", PATHS)
def test_every_row_count_gives_each_row_the_same_result(path):
    """Rows are grouped 8/4/2/1 at a time by M; a row's result must not depend on its group."""
    kern = kernels(path)
    raw = random_blocks(Q.Q6_K, 40, 512)
    layer = TiledLinear([TiledWeight.from_blocks(kern, int(Q.Q6_K), raw, 40, 512)], kern)
    x = torch.randn(23, 512)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(23)])
    assert torch.equal(layer(x), alone)
    kern.set_threads(1)
    try:
        assert torch.equal(layer(x), alone)  # nor on how the work was split between threads
    finally:
        kern.set_threads(torch.get_num_threads())


@pytest.mark.parametrize("path", PATHS)
def test_a_fused_layer_mixes_types_and_equals_its_parts(path):
    """A Q4_K_M attention block: q, k in Q4_K, v in Q6_K, one call, one activation quantization."""
    kern = kernels(path)
    parts = [TiledWeight.from_blocks(kern, int(t), random_blocks(t, n, 256, seed=i), n, 256)
             for i, (t, n) in enumerate(((Q.Q4_K, 64), (Q.Q4_K, 32), (Q.Q6_K, 32)))]
    fused = TiledLinear(parts, kern)
    x = torch.randn(5, 256)
    assert torch.equal(fused(x), torch.cat([TiledLinear([p], kern)(x) for p in parts], dim=-1))


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_in_and_out_accumulate_and_pre_ops(path):
    kern = kernels(path)
    raw = random_blocks(Q.Q8_0, 48, 256)
    w = gguf.quants.dequantize(raw, Q.Q8_0).reshape(48, 256).astype(np.float64)
    layer = TiledLinear([TiledWeight.from_blocks(kern, int(Q.Q8_0), raw, 48, 256)], kern)
    x = torch.randn(3, 256)
    # bfloat16 activations: the product of their (exact) float values, rounded to bfloat16
    xb = x.bfloat16()
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16
    ref = torch.from_numpy(xb.float().numpy().astype(np.float64) @ w.T)
    assert torch.allclose(yb.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    # out += x @ W.T (the residual add of a decoding step)
    base = torch.randn(3, 48)
    out = base.clone()
    kern.matmul(layer.segments, 256, x, out, accumulate=True)
    assert torch.allclose(out, base + layer(x), atol=1e-5)
    # RMSNorm applied while quantizing: pre(x) = x * g / sqrt(mean(x^2) + eps)
    g = torch.rand(256) + 0.5
    out = torch.empty(3, 48)
    kern.matmul(layer.segments, 256, x, out, norm=g, eps=1e-5)
    normed = torch.nn.functional.rms_norm(x.double(), (256,), g.double(), 1e-5)
    check_product(out.numpy().astype(np.float64), normed.float().numpy(), w)
    # SwiGLU: pre(x) = silu(x[:, :K]) * x[:, K:]
    gate_up = torch.randn(3, 512)
    kern.matmul(layer.segments, 256, gate_up, out, swiglu=True)
    gated = torch.nn.functional.silu(gate_up[:, :256].double()) * gate_up[:, 256:].double()
    check_product(out.numpy().astype(np.float64), gated.float().numpy(), w)
    # GeGLU (Gemma): pre(x) = gelu_tanh(x[:, :K]) * x[:, K:]
    kern.matmul(layer.segments, 256, gate_up, out, geglu=True)
    gated = torch.nn.functional.gelu(gate_up[:, :256].double(), approximate="tanh") * gate_up[:, 256:].double()
    check_product(out.numpy().astype(np.float64), gated.float().numpy(), w)


@pytest.mark.parametrize("path", PATHS)
def test_experts_multiply_only_their_own_rows(path):
    """A mixture of experts' step: rows grouped by expert, each expert's segment given its row
    range, one call; every row is its own expert's product (and the others' weights not read)."""
    kern = kernels(path)
    raws = [random_blocks(Q.Q4_K, 48, 256, seed=s) for s in range(3)]
    ws = [gguf.quants.dequantize(r, Q.Q4_K).reshape(48, 256).astype(np.float64) for r in raws]
    layers = [TiledLinear([TiledWeight.from_blocks(kern, int(Q.Q4_K), r, 48, 256)], kern) for r in raws]
    bounds = [(0, 3), (3, 4), (4, 70)]  # 3 rows, 1 row, 66 rows (more than a chunk of 64)
    segs = [native.Segment(int(Q.Q4_K), 0, lay.segments[0].tiles, 48, 0, m0, m1)
            for lay, (m0, m1) in zip(layers, bounds, strict=True)]
    x = torch.randn(70, 256)
    out = torch.full((70, 48), float("nan"))
    kern.matmul((native.Segment * 3)(*segs), 256, x, out)
    for w, (m0, m1) in zip(ws, bounds, strict=True):
        check_product(out[m0:m1].numpy().astype(np.float64), x[m0:m1].numpy(), w)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cache", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_matches_sdpa(path, cache):
    """One query per head against a cache (grouped heads share theirs), for lengths that split
    into several runs of positions, against torch's float64 scaled_dot_product_attention of
    the same (cache-rounded) keys and values."""
    kern = kernels(path)
    heads, kv_heads, d, slots = 8, 2, 64, 700
    for length in (1, 15, 64, 300, 700):
        keys = (torch.randn(kv_heads, slots, d) * 2).to(cache)
        values = torch.randn(kv_heads, slots, d).to(cache)
        q = torch.randn(heads, d)
        out = kern.attend_one(q, keys[:, :length], values[:, :length], 1 / math.sqrt(d))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[None, :, None].double(), keys[None, :, :length].double(), values[None, :, :length].double(),
            enable_gqa=True)[0, :, 0]
        assert torch.allclose(out.double(), ref, atol=2e-5), (length, (out.double() - ref).abs().max())


def test_a_failed_build_installs_and_says_why(tmp_path):
    """No compiler: `setup.py build_ext` still succeeds, leaves no library, and the fallback's
    reason is the build's error."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "galatea" / "kernels").mkdir(parents=True)
    for p in (root / "galatea" / "kernels" / "csrc").iterdir():
        (tmp_path / "galatea" / "kernels" / "csrc").mkdir(exist_ok=True)
        (tmp_path / "galatea" / "kernels" / "csrc" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "setup.py").write_text((root / "setup.py").read_text())
    env = {"PATH": "/usr/bin:/bin", "CC": "/bin/false", "CXX": "/bin/false", "LDSHARED": "/bin/false"}
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "native kernels not built" in run.stderr
    assert not list((tmp_path / "galatea" / "kernels").glob("_gx*.so"))
    assert "could not compile api.cpp" in (tmp_path / "galatea" / "kernels" / "BUILD_FAILED").read_text()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cache", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_attention_rotates_stores_and_attends(path, cache):
    """One call for a decoding step of 3 rows: rows 0 and 1 are consecutive positions of one
    cache (as when drafts are verified), row 2 another cache. q and k are rotated as HF's
    rotate-half RoPE does (the model's torch code, itself checked against transformers), v lands
    in the caches rounded exactly as torch rounds to their dtype, k (rotated with fused
    multiply-adds, one float32 rounding fewer than torch's) within one unit of that dtype, and
    each row attends causally to what was stored."""
    import ctypes

    from galatea.model.config import ModelConfig
    from galatea.model.llama import Rotary, apply_rope

    kern = kernels(path)
    heads, kv_heads, d, slots = 4, 2, 64, 40
    cfg = ModelConfig(vocab_size=8, hidden_size=heads * d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=slots)
    rot = Rotary(cfg, slots)
    caches = [(torch.randn(kv_heads, slots, d).to(cache), torch.randn(kv_heads, slots, d).to(cache)) for _ in range(2)]
    before = [(k.clone(), v.clone()) for k, v in caches]
    rows = [(0, 17), (0, 18), (1, 5)]  # (cache, position)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * d)
    given = qkv.clone()
    out = torch.empty(3, heads * d)
    i64, ptr = ctypes.c_int64 * 3, ctypes.c_void_p * 3
    rc = kern.lib.gx_step_attention(
        native.ISA_IDS[path], qkv.data_ptr(), qkv.stride(0), 3, i64(*(p for _, p in rows)),
        ptr(*(caches[c][0].data_ptr() for c, _ in rows)), ptr(*(caches[c][1].data_ptr() for c, _ in rows)),
        i64(*(caches[c][0].stride(0) for c, _ in rows)), d, native.KV_DTYPE_IDS[cache], heads, kv_heads, d,
        rot.cos.data_ptr(), rot.sin.data_ptr(), 1 / math.sqrt(d), 0.0, 0, None, None, 0.0, out.data_ptr(),
        out.stride(0))
    assert rc == 0
    expect = [(k.clone(), v.clone()) for k, v in before]
    for r, (c, pos) in enumerate(rows):
        x = given[r].view(heads + 2 * kv_heads, 1, d)
        qk = apply_rope(x[: heads + kv_heads], rot.cos[pos : pos + 1], rot.sin[pos : pos + 1])
        expect[c][0][:, pos] = qk[heads:, 0].to(cache)
        expect[c][1][:, pos] = x[heads + kv_heads :, 0].to(cache)
        assert torch.allclose(qkv[r, : heads * d], qk[:heads].reshape(-1), atol=1e-6)  # q rotated in place
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[cache]
    for (k, v), (ek, ev) in zip(caches, expect, strict=True):
        assert torch.equal(v, ev)
        assert torch.allclose(k.float(), ek.float(), rtol=ulp, atol=1e-6) and (k != ek).float().mean() < 0.05
    for r, (c, pos) in enumerate(rows):
        q = qkv[r, : heads * d].view(heads, d)
        keys, values = caches[c][0][:, : pos + 1].double(), caches[c][1][:, : pos + 1].double()
        ref = torch.nn.functional.scaled_dot_product_attention(q[None, :, None].double(), keys[None], values[None],
                                                               enable_gqa=True)[0, :, 0]
        assert torch.allclose(out[r].view(heads, d).double(), ref, atol=2e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cache", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_kv_move_gives_the_keys_computed_at_their_new_positions(path, cache):
    """Context shift and chunk reuse move runs of cached positions, overlapping their old place,
    down and up: moved values are the same bytes, moved keys equal the raw keys rotated (HF's
    rotate-half RoPE, in float64) at their new positions within the cache dtype's rounding
    (stored once, rotated, stored again: 2 units), and no other position changes."""
    from galatea.model.config import ModelConfig
    from galatea.model.llama import Rotary, apply_rope

    kern = kernels(path)
    layers, kv_heads, d, slots = 2, 3, 64, 120
    cfg = ModelConfig(vocab_size=8, hidden_size=kv_heads * d, intermediate_size=8, num_hidden_layers=layers,
                      num_attention_heads=kv_heads, num_key_value_heads=kv_heads, max_position_embeddings=slots)
    rot = Rotary(cfg, slots)
    cos, sin = rot.cos.double(), rot.sin.double()
    raw = torch.randn(layers, 1, kv_heads, slots, d, dtype=torch.float64)
    values = torch.randn(layers, 1, kv_heads, slots, d).to(cache)
    keys = apply_rope(raw, cos, sin).to(cache)  # the key of raw[p] computed at position p
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[cache]
    for src, dst, n in [(40, 10, 50), (10, 35, 50), (0, 119, 1), (70, 0, 50)]:
        k, v = keys.clone(), values.clone()
        delta = abs(dst - src)
        kern.move_kv(k, v, src, dst, n, rot.cos[delta].contiguous(),
                     (rot.sin[delta] * (1 if dst > src else -1)).contiguous())
        expect = apply_rope(raw[..., src : src + n, :], cos[dst : dst + n], sin[dst : dst + n])
        err = (k[..., dst : dst + n, :].double() - expect).abs().max().item()
        assert err <= 2 * ulp * raw.abs().max().item(), (src, dst, err)
        assert torch.equal(v[..., dst : dst + n, :], values[..., src : src + n, :])
        untouched = [p for p in range(slots) if not dst <= p < dst + n]
        assert torch.equal(k[..., untouched, :], keys[..., untouched, :])
        assert torch.equal(v[..., untouched, :], values[..., untouched, :])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("length", [40, 200, 700])
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (100, 0.0), (0, 2.0), (300, 3.0)])
def test_verification_rows_share_the_cache_and_stay_causal(path, length, window, softcap):
    """Drafts are verified as rows of one cache at consecutive positions, which the kernel joins
    into one job reading the cache once; row r must still attend to exactly positions 0..pos_r
    (runs of positions after it weigh nothing, including a last run wholly after the first
    rows), beside a row of another cache in the same call; with a window, to its last `window`
    positions only, and with a soft cap, to capped scores (Gemma). Against float64 attention of
    the stored keys and values."""
    import ctypes

    kern = kernels(path)
    heads, kv_heads, d, slots, nq = 4, 2, 64, 720, 9
    caches = [(torch.randn(kv_heads, slots, d).half(), torch.randn(kv_heads, slots, d).half()) for _ in range(2)]
    rows = [(1, 30)] + [(0, length - nq + r) for r in range(nq)]  # (cache, position)
    n = len(rows)
    cos, sin = torch.ones(slots, d), torch.zeros(slots, d)  # no rotation: q and k as given
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
    out = torch.empty(n, heads * d)
    i64, ptr = ctypes.c_int64 * n, ctypes.c_void_p * n
    rc = kern.lib.gx_step_attention(
        native.ISA_IDS[path], qkv.data_ptr(), qkv.stride(0), n, i64(*(p for _, p in rows)),
        ptr(*(caches[c][0].data_ptr() for c, _ in rows)), ptr(*(caches[c][1].data_ptr() for c, _ in rows)),
        i64(*(caches[c][0].stride(0) for c, _ in rows)), d, native.KV_DTYPE_IDS[torch.float16], heads, kv_heads,
        d, cos.data_ptr(), sin.data_ptr(), 1 / math.sqrt(d), softcap, window, None, None, 0.0, out.data_ptr(),
        out.stride(0))
    assert rc == 0
    for r, (c, pos) in enumerate(rows):
        q = qkv[r, : heads * d].view(heads, d).double()
        first = max(0, pos + 1 - window) if window else 0
        keys = caches[c][0][:, first : pos + 1].double().repeat_interleave(heads // kv_heads, dim=0)
        values = caches[c][1][:, first : pos + 1].double().repeat_interleave(heads // kv_heads, dim=0)
        scores = (keys @ q[:, :, None])[..., 0] / math.sqrt(d)  # [heads, positions]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        ref = (scores.softmax(-1)[:, None] @ values)[:, 0]
        assert torch.allclose(out[r].view(heads, d).double(), ref, atol=2e-5), (r, pos)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("renorm", [True, False])
def test_a_mixture_of_experts_layer_matches_float64(path, renorm):
    """gx_moe (router, top-k, rows grouped by expert, gate/up, SwiGLU, down, weighted sum into x)
    against the same arithmetic in float64 on gguf's dequantized weights (transformers' order:
    softmax over every expert, the top k, renormalised where the config says)."""
    kern = kernels(path)
    experts, top_k, k, width = 6, 2, 256, 256
    rng = torch.Generator().manual_seed(1)
    raws = [[random_blocks(Q.Q4_K, width, k, seed=10 * e + i) for i in range(2)] + [random_blocks(Q.Q6_K, k, width,
                                                                                                   seed=10 * e + 2)]
            for e in range(experts)]
    dense = [[torch.from_numpy(gguf.quants.dequantize(r, t).reshape(r.shape[0], -1).astype(np.float64))
              for r, t in zip(rs, (Q.Q4_K, Q.Q4_K, Q.Q6_K), strict=True)] for rs in raws]
    gate_up = [TiledLinear([TiledWeight.from_blocks(kern, int(Q.Q4_K), rs[0], width, k),
                            TiledWeight.from_blocks(kern, int(Q.Q4_K), rs[1], width, k)], kern) for rs in raws]
    down = [TiledLinear([TiledWeight.from_blocks(kern, int(Q.Q6_K), rs[2], k, width)], kern) for rs in raws]
    gu_segs = [s for lay in gate_up for s in lay.segments]
    down_segs = [s for lay in down for s in lay.segments]
    router = torch.randn(experts, k, generator=rng) * 0.2
    norm = torch.rand(k, generator=rng) + 0.5
    x = torch.randn(9, k, generator=rng)
    out = x.clone()
    rc = kern.lib.gx_moe(native.ISA_IDS[path], out.data_ptr(), k, 9, k, norm.data_ptr(), 1e-6, router.data_ptr(),
                         experts, top_k, int(renorm), (native.Segment * len(gu_segs))(*gu_segs), 2,
                         (native.Segment * len(down_segs))(*down_segs), 1, width, 2)
    assert rc == 0
    xn = torch.nn.functional.rms_norm(x.double(), (k,), norm.double(), 1e-6)
    probs = (xn @ router.double().T).softmax(-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(-1, keepdim=True)
    ref = x.double().clone()
    for r in range(9):
        for w, e in zip(weights[r], chosen[r].tolist(), strict=True):
            g, u, dn = dense[e]
            ref[r] += w * (dn @ (torch.nn.functional.silu(g @ xn[r]) * (u @ xn[r])))
    moe = ref - x.double()
    assert ((out.double() - ref).abs().max() / moe.abs().max()) < 2e-2  # int8 activations, as every matmul
