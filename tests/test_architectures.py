"""The LLaMA family members persona-chat fine-tunes use, against transformers: Mistral (a sliding
attention window) and Qwen2 (q/k/v biases), tiny and random, from safetensors and from GGUF
written by our converter; a clear refusal for any other architecture."""

from __future__ import annotations

import dataclasses
import json

import gguf
import pytest
import torch

from galatea.errors import GalateaError
from galatea.model.checkpoint import load
from galatea.model.config import ModelConfig
from galatea.weights.convert import gguf_to_hf, hf_to_gguf
from tests.checkpoints import write_tokenizer_model
from tests.helpers import PATHS, TOKENS, hf_logits, our_logits

WINDOW = 5  # far below the 18 test tokens, so most positions see only part of the prompt
SMALL = dict(vocab_size=32000, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
             hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def reference(kind: str, hidden: int = 64, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(SMALL, hidden_size=hidden, intermediate_size=2 * hidden + 32 if hidden == 64 else 2 * hidden)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=WINDOW, rope_theta=10000.0, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, tie_word_embeddings=True, **shape))
    with torch.no_grad():  # visible weights, and biases far from zero
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.uniform_(0.8, 1.2)
    return model.eval()


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def model(request, tmp_path_factory):
    """(kind, transformers model, its safetensors folder)."""
    ref = reference(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    write_tokenizer_model(folder)
    return request.param, ref, folder


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_safetensors_logits_equal_transformers(model, chunk):
    """Whole prompt, token by token (decode attention) and in chunks of 5 (masked prefill)."""
    kind, ref, folder = model
    diff = (our_logits(folder, chunk=chunk) - hf_logits(ref)).abs().max()
    assert diff < 1e-4, f"{kind}: max |logit diff| {diff}"


def test_gguf_from_our_converter_equals_transformers(model, tmp_path):
    kind, ref, folder = model
    path = tmp_path / f"{kind}.gguf"
    hf_to_gguf(folder, path, "f32")
    fields = gguf.GGUFReader(path).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == ("qwen2" if kind == "qwen2" else "llama")  # llama.cpp's names for both
    if kind == "mistral":
        assert int(fields["llama.attention.sliding_window"].parts[-1][0]) == WINDOW
    for chunk in (None, 1):
        diff = (our_logits(path, chunk=chunk) - hf_logits(ref)).abs().max()
        assert diff < 1e-4, f"{kind} GGUF: max |logit diff| {diff}"
    # and back to a folder that transformers itself loads as the same model
    from transformers import AutoModelForCausalLM

    back = tmp_path / "back"
    gguf_to_hf(path, back, dtype=torch.float32)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == kind
    reread = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    assert (hf_logits(reread) - hf_logits(ref)).abs().max() < 1e-4


def test_the_differences_matter(model):
    """Without its window or its biases the same weights give other logits: the checks above
    would see a model run as a plain LLaMA."""
    kind, ref, folder = model
    lm = load(folder, dtype=torch.float32, quant="none")
    for layer in lm.model.model.layers:
        if kind == "mistral":
            layer.self_attn.attends = dataclasses.replace(layer.self_attn.attends, window=None)
        else:
            layer.self_attn.qkv_bias = None
    cache = lm.model.make_cache(1, 64)
    plain = lm.model(torch.tensor([TOKENS]), 0, cache, all_logits=True)[0]
    assert (plain - hf_logits(ref)).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_native_kernels_run_both(kind, path, tmp_path):
    """Q8_0 GGUF on the native kernels: Qwen2's biases and Mistral's window (past it) in the fused
    decoding step; compared to transformers by cosine (the kernels quantize activations to int8)."""
    ref = reference(kind, hidden=256, seed=1)
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    write_tokenizer_model(folder)
    file = tmp_path / "m.gguf"
    hf_to_gguf(folder, file, "q8_0")
    lm = load(file, dtype=torch.float32, kernels=path)
    assert lm.kernels == path and lm.model.fused is not None
    expected = hf_logits(ref)
    cache = lm.model.make_cache(1, len(TOKENS) + 1)  # longer than Mistral's window
    got = torch.cat([lm.model(torch.tensor([[t]]), i, cache) for i, t in enumerate(TOKENS)])
    cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1).min()
    assert cos > 0.995, f"{kind} on {path}: cos {cos}"


def test_other_architectures_are_refused_in_one_line(tmp_path):
    cfg = dict(SMALL, architectures=["Phi3ForCausalLM"], model_type="phi3")
    with pytest.raises(GalateaError, match=r"'Phi3ForCausalLM' is not supported; Galatea runs .*LlamaForCausalLM"):
        ModelConfig.from_hf(cfg)
    with pytest.raises(GalateaError, match="GGUF architecture 'phi3' is not supported"):
        ModelConfig.from_gguf({"general.architecture": "phi3"}, 32000)
    with pytest.raises(GalateaError, match="use_sliding_window"):
        ModelConfig.from_hf(dict(SMALL, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                 use_sliding_window=True))


def test_every_end_of_sequence_id_ends_a_reply(tmp_path):
    """config.json may list several EOS ids (Llama 3: <|end_of_text|> and <|eot_id|>): each ends
    a reply. Here the second is the token greedy decoding writes first."""
    from galatea.engine.generate import stream_generate
    from galatea.engine.sampling import SamplingParams
    from tests.checkpoints import hf_model, write_safetensors

    model = hf_model("gqa")
    folder = write_safetensors(model, tmp_path / "m")
    ids = TOKENS[:6]
    first = int(hf_logits(model, ids)[-1].argmax())
    assert first != 2
    params = SamplingParams(max_new_tokens=4, temperature=0, repetition_penalty=1.0)
    for eos, finish in (([2], "length"), ([2, first], "stop")):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
        lm = load(folder, dtype=torch.float32, quant="none")
        assert lm.config.eos_token_ids == tuple(eos)
        last = list(stream_generate(lm.model, lm.tokenizer, ids, params))[-1]
        assert last.finish_reason == finish
    meta = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.feed_forward_length": 160, "llama.block_count": 2, "llama.context_length": 256,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 32007}
    assert ModelConfig.from_gguf(meta, 32016).eos_token_ids == (2, 32007)
