"""Golden tests: tiny random LLaMAs in every format give transformers' logits."""

from __future__ import annotations

import gguf
import pytest
import torch

from tests.checkpoints import hf_model, write_bin_shards, write_gguf, write_safetensors
from tests.helpers import hf_logits, our_logits

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module", params=["gqa", "mha"])
def reference(request):
    return request.param, hf_model(request.param)


def test_safetensors_matches_transformers(reference, tmp_path):
    variant, model = reference
    folder = write_safetensors(model, tmp_path / variant)
    diff = (our_logits(folder) - hf_logits(model)).abs().max()
    assert diff < 1e-4, f"{variant}: max |logit diff| {diff}"


def test_sharded_safetensors_with_index(reference, tmp_path):
    variant, model = reference
    folder = write_safetensors(model, tmp_path / variant, max_shard_size="3MB")
    assert (folder / "model.safetensors.index.json").exists()
    assert (our_logits(folder) - hf_logits(model)).abs().max() < 1e-4


def test_sharded_bin_matches_transformers(reference, tmp_path):
    from transformers import LlamaForCausalLM

    variant, model = reference
    folder = write_bin_shards(model, tmp_path / variant)
    # transformers reads the same shards back: the files are what transformers expects.
    reread = LlamaForCausalLM.from_pretrained(folder, use_safetensors=False).eval()
    assert (hf_logits(reread) - hf_logits(model)).abs().max() < 1e-5
    assert (our_logits(folder) - hf_logits(model)).abs().max() < 1e-4


def test_gguf_f32_matches_transformers_and_undoes_permutation(reference, tmp_path):
    variant, model = reference
    path = write_gguf(model, tmp_path / f"{variant}.gguf")
    assert (our_logits(path) - hf_logits(model)).abs().max() < 1e-4


@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_cache_decode_and_chunked_prefill(reference, tmp_path, chunk):
    """Reading token by token (decode attention) or in chunks (masked prefill attention)
    gives the full-sequence logits of transformers at every position."""
    variant, model = reference
    folder = write_safetensors(model, tmp_path / variant)
    assert (our_logits(folder, chunk=chunk) - hf_logits(model)).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_quantized_gguf_matches_transformers_reading_it(qtype, tmp_path):
    """transformers dequantizes GGUF on load: the same file must give the same logits."""
    from transformers import AutoModelForCausalLM

    variant = "kquant" if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else "gqa"
    path = write_gguf(hf_model(variant), tmp_path / f"{qtype.name}.gguf", qtype=qtype)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    expected = hf_logits(ref)
    diff = (our_logits(path) - expected).abs().max()
    assert diff < 1e-4 * max(1.0, expected.abs().max().item()), f"{qtype.name}: {diff}"


def test_bfloat16_compute_tracks_float32(tmp_path):
    model = hf_model("gqa")
    folder = write_safetensors(model, tmp_path / "m")
    got = our_logits(folder, dtype=torch.bfloat16)
    expected = hf_logits(model)
    cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cos.min() > 0.995
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_int8_linears_stay_close(tmp_path):
    model = hf_model("kquant")
    folder = write_safetensors(model, tmp_path / "m")
    got = our_logits(folder, dtype=torch.bfloat16, quant="int8")
    cos = torch.nn.functional.cosine_similarity(got, hf_logits(model), dim=-1)
    assert cos.min() > 0.99, f"int8: cosine {cos.min()}"
