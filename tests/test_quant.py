"""Weight-only int8/int4 layers against plain float arithmetic on the same quantization grid."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from galatea.model.quant import Int4Linear, Int8Linear, auto_mode


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_matches_per_row_fake_quant():
    torch.manual_seed(0)
    w, x = torch.randn(192, 256), torch.randn(1, 256).bfloat16()
    scale = w.abs().amax(1, keepdim=True) / 127
    deq = torch.round(w / scale).clamp(-127, 127) * scale
    assert _rel(Int8Linear.from_float(w)(x), x.float() @ deq.T) < 1e-2
    many = torch.randn(40, 256).bfloat16()  # the dense (dequantize + GEMM) path for long prompts
    assert _rel(Int8Linear.from_float(w)(many), many.float() @ deq.T) < 1e-2


def test_int4_matches_group_fake_quant():
    torch.manual_seed(0)
    w, x = torch.randn(192, 256), torch.randn(3, 256).bfloat16()
    g = w.view(192, 8, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    deq = (torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).view(192, 256)
    assert _rel(Int4Linear.from_float(w)(x), x.float() @ deq.T) < 1e-2
    many = torch.randn(100, 256).bfloat16()  # a prompt: weights unpacked from the kernel's layout + GEMM
    layer = Int4Linear.from_float(w)
    assert _rel(layer(many), many.float() @ deq.T) < 1e-2
    assert _rel(layer.dequantize_t().T, deq) < 1e-2


def test_gguf_q4_1_blocks_land_on_the_int4_grid():
    """Q4_1 values (d*q + m per block of 32) re-quantize onto the same grid: the int4 layer
    reproduces the dequantized GGUF weights, not a second rounding of them."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    q41 = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    deq = torch.from_numpy(gguf.quants.dequantize(q41, gguf.GGMLQuantizationType.Q4_1).reshape(w.shape).copy())
    x = torch.randn(2, 256).bfloat16()
    exact = x.float() @ deq.T
    assert _rel(Int4Linear.from_float(deq)(x), exact) < 1e-2  # bf16 rounding of scale/zero only
    assert _rel(x.float() @ torch.from_numpy(w).T, exact) > 5e-2  # while Q4 itself is far coarser


def test_auto_mode_follows_the_file():
    cpu = torch.device("cpu")
    assert auto_mode({"Q4_1": 210, "Q8_0": 1, "F32": 61}, cpu) == "int4"
    assert auto_mode({"Q4_K": 100, "Q6_K": 20, "F32": 40}, cpu) == "int4"
    assert auto_mode({"Q8_0": 200, "F32": 61}, cpu) == "int8"
    assert auto_mode({"F16": 200, "F32": 61}, cpu) == "none"
    assert auto_mode({"bfloat16": 1}, cpu) == "none"
    assert auto_mode({"Q4_0": 200}, torch.device("cuda")) == "none"


@pytest.mark.slow
def test_gguf_q4_loads_straight_into_int4_groups_bit_for_bit(tmp_path):
    """Q4_0/Q4_1 blocks parsed into int4 groups dequantize to exactly gguf-py's values, q/k rows
    un-permuted like the float path; Q4_K (random super-blocks) to the same values up to float
    rounding (d*sc*q - dmin*m is regrouped as (q - 8)*scale + zero)."""
    from galatea.model.gguf_file import GGUFFile
    from galatea.model.quant import Int4Groups
    from tests.checkpoints import hf_model, write_gguf

    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_K):
        variant = "kquant" if qtype == gguf.GGMLQuantizationType.Q4_K else "gqa"
        path = write_gguf(hf_model(variant), tmp_path / f"{qtype.name}.gguf", qtype=qtype)
        f = GGUFFile(path)
        floats = dict(f.iter_tensors(4, 2, torch.float32))
        direct = dict(f.iter_tensors(4, 2, torch.float32, int4=True))
        grouped = [n for n, v in direct.items() if isinstance(v, Int4Groups)]
        assert len(grouped) == 2 * 7  # every linear weight of both decoder layers
        for name in grouped:
            if qtype == gguf.GGMLQuantizationType.Q4_K:
                torch.testing.assert_close(direct[name].dequantize(), floats[name], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(direct[name].dequantize(), floats[name]), name


def test_int4_and_int8_layers_concatenate_by_rows():
    from galatea.model.quant import Int4Groups, concat_linears

    torch.manual_seed(0)
    ws = [torch.randn(64, 128), torch.randn(32, 128)]
    x = torch.randn(1, 128).bfloat16()
    int8 = [Int8Linear.from_float(w) for w in ws]
    assert torch.equal(concat_linears(int8)(x), torch.cat([p(x) for p in int8], dim=-1))
    int4 = [Int4Linear(Int4Groups.from_float(w)) for w in ws]  # joined before packing
    fused = concat_linears(int4)
    assert torch.equal(fused(x), torch.cat([p(x) for p in int4], dim=-1))
    assert concat_linears(int4) is None  # packed by the calls above: no longer joinable
    assert concat_linears([Int4Linear.from_float(ws[0]), Int8Linear.from_float(ws[1])]) is None


def test_q4_gguf_int4_model_tracks_the_dequantized_model(tmp_path):
    """Loaded straight into int4 (the default for these files), a Q4_K/Q4_0 model computes what
    the exactly dequantized model computes, up to bf16 rounding of scales and activations."""
    from galatea.model.checkpoint import load
    from tests.checkpoints import hf_model, write_gguf

    tokens = torch.tensor([[1, 15043, 3186, 29892, 920, 526, 366, 29973, 13, 3492, 29901]])
    for qtype, variant in ((gguf.GGMLQuantizationType.Q4_K, "kquant"), (gguf.GGMLQuantizationType.Q4_0, "gqa")):
        path = write_gguf(hf_model(variant), tmp_path / f"{qtype.name}.gguf", qtype=qtype)
        exact = load(path, dtype=torch.float32, quant="none")
        fast = load(path, dtype=torch.bfloat16)
        assert fast.quant == "int4"
        a = exact.model(tokens, 0, exact.model.make_cache(1, 16), all_logits=True)[0]
        b = fast.model(tokens, 0, fast.model.make_cache(1, 16), all_logits=True)[0]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min()
        assert cos > 0.99, f"{qtype.name}: cosine {cos}"
