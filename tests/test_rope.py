"""RoPE as the checkpoint says (issue 25, point 1): linear, dynamic, YaRN and Llama 3 scaling from
config.json (`rope_scaling` or transformers 5's `rope_parameters`) and from GGUF files written by
llama.cpp's own converter (`rope.scaling.*` keys, `rope_freqs.weight`), against transformers;
moved cache entries (context shift, chunk reuse) turn by the same frequencies; Galatea's own
converter writes and reads the same settings; anything else is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from galatea.errors import GalateaError
from galatea.model.checkpoint import load
from galatea.model.config import ModelConfig
from galatea.weights.convert import gguf_to_hf, hf_to_gguf
from tests.checkpoints import write_tokenizer_model
from tests.test_families import LLAMA31_ROPE, llama_cpp_convert, ours, tokens

pytestmark = pytest.mark.slow

SCHEMES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 16.0,
             "beta_slow": 2.0},
    "llama3": LLAMA31_ROPE,
    "llama32": {**LLAMA31_ROPE, "factor": 32.0},  # Llama 3.2's
}


def tiny(folder: Path, rope: dict, trained: int = 256) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=trained, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_theta": rope.get("rope_theta", 10000.0), **rope})).eval()
    with torch.no_grad():
        for p in model.parameters():
            (p.normal_(0, 0.08) if p.dim() == 2 else p.uniform_(0.8, 1.2))
    model.save_pretrained(folder)
    write_tokenizer_model(folder)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scaling_gives_transformers_logits(scheme, tmp_path):
    folder = tmp_path / scheme
    model = tiny(folder, SCHEMES[scheme])
    ids = tokens(32000, 600)  # past the trained 256 positions
    with torch.no_grad():
        ref = model(ids).logits[0]
    sources = [folder]
    if scheme != "dynamic":  # llama.cpp writes no dynamic scaling into GGUF (it does not run it)
        sources.append(llama_cpp_convert(folder, tmp_path / f"{scheme}.gguf"))
    for source in sources:
        got = ours(source, ids, 128, dtype=torch.float32, quant="none")
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-3, f"{scheme} from {source.name}: max |diff| {diff}"


def test_llama3_is_read_from_rope_freqs_and_round_trips_through_the_converter(tmp_path):
    model = tiny(tmp_path / "hf", LLAMA31_ROPE, trained=131072)
    theirs = llama_cpp_convert(tmp_path / "hf", tmp_path / "theirs.gguf")
    cfg = load(theirs, dtype=torch.float32, quant="none").config
    assert cfg.rope_scaling.kind == "factors" and len(cfg.rope_scaling.freq_factors) == 32
    # GGUF -> HF with Galatea's converter: the Llama 3 settings are found again, transformers agrees
    gguf_to_hf(theirs, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0}
    from transformers import LlamaForCausalLM

    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ids = tokens(32000, 300)
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max() < 1e-4
    # HF -> GGUF with Galatea's converter writes rope_freqs as llama.cpp does
    mine = tmp_path / "mine.gguf"
    hf_to_gguf(tmp_path / "hf", mine, "f32")
    from galatea.model.gguf_file import GGUFFile

    assert torch.allclose(torch.tensor(GGUFFile(mine).rope_freqs()), torch.tensor(GGUFFile(theirs).rope_freqs()),
                          rtol=1e-6)


def test_moved_keys_turn_by_the_checkpoints_frequencies(tmp_path):
    """Context shift moves cached keys by d positions: with YaRN's scaled cos/sin the move must
    not scale them again; with Llama 3's frequencies it must turn by those."""
    for scheme in ("yarn", "llama3"):
        tiny(tmp_path / scheme, SCHEMES[scheme], trained=256 if scheme == "yarn" else 131072)
        lm = load(tmp_path / scheme, dtype=torch.float32, quant="none")
        ids = tokens(32000, 40)
        at_10, moved = lm.model.make_cache(1, 64), lm.model.make_cache(1, 64)
        lm.model(ids, 10, at_10)  # the tokens computed at positions 10..49
        lm.model(ids, 0, moved)  # at 0..39, then moved up by 10
        moved.move([(0, 10, 40)], lm.model.rotary)
        # the first layer's keys depend only on each token and its position (deeper ones also on
        # what it attended to, which differs here: the drift context shift accepts)
        assert torch.allclose(moved.keys[0, :, :, 10:50], at_10.keys[0, :, :, 10:50], atol=1e-5), scheme
        assert torch.allclose(moved.values[0, :, :, 10:50], at_10.values[0, :, :, 10:50])


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0], "long_factor": [1.0]}, "'longrope'"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
      "mscale_all_dim": 1.0}, "mscale"),
])
def test_a_scaling_galatea_does_not_run_is_refused_by_name(rope, message):
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": rope}
    with pytest.raises(GalateaError, match=message):
        ModelConfig.from_hf(raw)


def test_a_gguf_scaling_galatea_does_not_run_is_refused_by_name():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.block_count": 1, "llama.attention.head_count": 2, "llama.rope.scaling.type": "longrope"}
    with pytest.raises(GalateaError, match="'longrope'"):
        ModelConfig.from_gguf(meta, 32000)
