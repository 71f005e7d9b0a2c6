"""Models on the native kernels against independent references: transformers reading the same
GGUF files (every type the kernels hold), and the embedded SmolLM2 dequantized exactly.

The kernels quantize activations to int8 (see test_kernels.py), so logits are compared by
cosine and top-1 agreement, as llama.cpp's outputs would be, not to float tolerance."""

from __future__ import annotations

import gguf
import pytest
import torch

from galatea.model.checkpoint import load
from galatea.model.tiled import TiledEmbedding, TiledLinear
from tests.checkpoints import hf_model, write_gguf
from tests.helpers import PATHS

pytestmark = pytest.mark.slow

Q = gguf.GGMLQuantizationType
TOKENS = [1, 15043, 3186, 29892, 920, 526, 366, 29973, 13, 3492, 29901, 10994, 29991, 2266, 338, 263, 1243, 29889]
TEXT = ("Aria's Persona: Aria is a cheerful travelling bard who tells stories about distant lands, "
        "sings about the sea and never forgets a face.\n<START>\nYou: Hello! Who are you?\n"
        "Aria: *bows with a flourish* I'm Aria, a bard. Shall I sing you a song about the harbour town?\n"
        "You: Yes, please. And tell me about the lighthouse keeper.\nAria:")


def logits(lm, ids, step: bool) -> torch.Tensor:
    """Every position's logits: the prompt in one pass (module path, all rows at once), or one
    token per step (the fused decoding step)."""
    cache = lm.model.make_cache(1, len(ids) + 1)
    if not step:
        return lm.model(torch.tensor([ids]), 0, cache, all_logits=True)[0]
    return torch.cat([lm.model(torch.tensor([[t]]), i, cache) for i, t in enumerate(ids)])


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """One tiny LLaMA per type, every matrix (embeddings and output too) in that type, and
    transformers' logits for it."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("native")
    out = {}
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        path = write_gguf(hf_model("kquant", seed=int(qtype)), folder / f"{qtype.name}.gguf", qtype=qtype)
        ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            out[qtype] = (path, ref(torch.tensor([TOKENS])).logits[0].float())
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_every_type_computes_what_transformers_computes(gguf_files, qtype, path):
    file, expected = gguf_files[qtype]
    lm = load(file, dtype=torch.float32, kernels=path)
    assert lm.kernels == path and lm.model.fused is not None
    assert isinstance(lm.model.model.embed_tokens, TiledEmbedding)
    assert {p.qtype for p in lm.model.model.layers[0].self_attn.qkv_proj.parts} == {int(qtype)}
    for step in (False, True):
        got = logits(lm, TOKENS, step)
        cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1).min()
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
        # a random tiny model has near-ties in its logits: cosine is the signal, top-1 a sanity check
        assert cos > 0.995 and agree >= 0.8, f"{qtype.name} {'step' if step else 'prompt'}: cos {cos}, top-1 {agree}"


@pytest.mark.parametrize("path", PATHS)
def test_q4_k_m_mix_keeps_each_matrix_in_its_type(tmp_path, path):
    """A Q4_K_M-style file: Q6_K values in a layer of Q4_K; the fused q/k/v keeps both types."""
    import numpy as np

    from galatea.model.gguf_file import GGUFFile

    model = hf_model("kquant", seed=3)
    mixed = tmp_path / "mixed.gguf"
    write_gguf(model, mixed, qtype=Q.Q4_K)
    # rewrite: the same file with attn_v of layer 1 in Q6_K
    reader = GGUFFile(mixed)
    w = gguf.GGUFWriter(str(tmp_path / "mix.gguf"), "llama")
    for key, value in reader.metadata.items():
        if key.startswith("general.architecture") or key.startswith("GGUF."):
            continue
        _add_kv(w, key, value)
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        raw = reader.raw(t).reshape(t.shape[0], -1) if len(t.shape) == 2 else reader.raw(t).view(np.float32)
        if t.name == "blk.1.attn_v.weight":
            raw = rng.integers(0, 256, size=(t.shape[0], t.shape[1] // 256, 210), dtype=np.uint8)
            raw[..., 208:210] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
            raw = raw.reshape(t.shape[0], -1)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=Q.Q6_K)
        elif len(t.shape) == 2:
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=Q(t.type_id))
        else:
            w.add_tensor(t.name, np.array(raw))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    lm = load(tmp_path / "mix.gguf", dtype=torch.float32, kernels=path)
    qkv = lm.model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, TiledLinear) and [p.type_name for p in qkv.parts] == ["Q4_K", "Q4_K", "Q6_K"]
    exact = load(tmp_path / "mix.gguf", dtype=torch.float32, quant="none")
    for step in (False, True):
        got, want = logits(lm, TOKENS, step), logits(exact, TOKENS, step)
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99


def _add_kv(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, list):
        if value and isinstance(value[0], str):
            w.add_array(key, value)
        elif value and isinstance(value[0], float):
            w.add_array(key, [float(v) for v in value])
        else:
            w.add_array(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_uint32(key, value)


@pytest.fixture
def exact_smollm2(embedded_lm_exact):
    return embedded_lm_exact


@pytest.mark.parametrize("path", [*PATHS, "torch"])
def test_embedded_model_tracks_its_exact_dequantization(exact_smollm2, path):
    """SmolLM2 (Q4_1 layers, Q8_0 embeddings) on each path, over a fixed text, prompt and step
    by step: top-1 agreement with the exactly dequantized float32 model (measured 0.96-0.98
    native, 0.94 on torch's int4 kernel)."""
    lm = load(None, dtype=torch.float32, kernels=path)
    assert lm.kernels == path
    ids = lm.tokenizer.encode(TEXT)
    for step in (False, True):
        got, want = logits(lm, ids, step), logits(exact_smollm2, ids, step)
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
        assert agree >= 0.9, f"{path} {'step' if step else 'prompt'}: top-1 agreement {agree}"


def test_float16_kv_cache_agrees_with_float32(exact_smollm2):
    """The cache's rounding alone (the unquantized model, so nothing else differs): decoding
    500 positions of a fixed text with float16 and float32 caches."""
    from galatea.model.checkpoint import embedded_model_path

    text = (embedded_model_path().parent / "__init__.py").read_text() * 20 + TEXT * 10
    ids = exact_smollm2.tokenizer.encode(text)[:500]
    runs = {}
    for dtype in (torch.float32, torch.float16):
        exact_smollm2.model.cache_dtype = dtype
        runs[dtype] = logits(exact_smollm2, ids, step=True)
    exact_smollm2.model.cache_dtype = None
    agree = (runs[torch.float16].argmax(-1) == runs[torch.float32].argmax(-1)).float().mean()
    assert agree >= 0.99, agree


def test_native_decoding_uses_a_float16_cache_and_fused_steps():
    lm = load(None, kernels="auto")
    if not PATHS:
        assert lm.kernels == "torch"
        return
    assert lm.model.fused is not None
    assert lm.model.make_cache(1, 8).keys.dtype == torch.float16
    assert load(None, kernels="auto", kv_cache="float32").model.make_cache(1, 8).keys.dtype == torch.float32
