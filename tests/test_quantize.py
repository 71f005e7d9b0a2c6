"""`galatea quantize`: a pre-quantized folder computes exactly what the model quantized at load
computes, and loads without converting anything. Format 2 holds the native kernels' tiles;
format 1 (written where only the torch fallback runs) torch's int4 pack."""

from __future__ import annotations

import json

import pytest
import torch

from galatea.cli import main
from galatea.model import prequantized
from galatea.model.checkpoint import embedded_model_path, load
from galatea.model.quant import Int4Linear, Int8Linear, int4_block_n
from galatea.model.tiled import TiledEmbedding, TiledLinear
from tests.checkpoints import hf_model, write_safetensors

pytestmark = pytest.mark.slow

TEXT = "Aria's Persona: A cheerful bard.\n<START>\nYou: Hello! Who are you?\nAria:"


def logits(lm, text=TEXT):
    ids = lm.tokenizer.encode(text)
    return lm.model(torch.tensor([ids]), 0, lm.model.make_cache(1, 128), all_logits=True)[0]


def test_embedded_gguf_tiles_folder_is_bit_identical(tmp_path, monkeypatch):
    """Every matrix keeps its GGUF type (Q4_1 layers, the tied Q8_0 embedding once), and the
    tiles are used where they lie in the file."""
    monkeypatch.setenv("GALATEA_KERNELS", "auto")
    assert main(["quantize", "-q", str(embedded_model_path()), str(tmp_path / "q")]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "galatea" and qc["format"] == 2 and qc["mode"] == "int4"
    assert qc["modules"]["model.layers.0.self_attn.qkv_proj"] == {
        "tiles": [["Q4_1", 576], ["Q4_1", 192], ["Q4_1", 192]], "in_features": 576}
    assert qc["modules"]["model.embed_tokens"]["tiles"] == [["Q8_0", 49152]]
    assert qc["modules"]["lm_head"] == {"tied": "model.embed_tokens"}
    ours = load(tmp_path / "q")
    assert ours.quant == "int4" and ours.kernels != "torch"
    assert isinstance(ours.model.model.layers[0].mlp.gate_up_proj, TiledLinear)
    assert isinstance(ours.model.model.embed_tokens, TiledEmbedding)
    assert ours.model.lm_head.parts == [ours.model.model.embed_tokens.table]
    assert torch.equal(logits(ours), logits(load(embedded_model_path())))
    tiles = ours.model.model.layers[0].mlp.gate_up_proj.parts[0].tiles
    assert not tiles.untyped_storage().resizable()  # a memory map, not a copy


def test_a_tiles_folder_without_the_native_kernels_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GALATEA_KERNELS", "auto")
    assert main(["quantize", "-q", str(embedded_model_path()), str(tmp_path / "q")]) == 0
    monkeypatch.setenv("GALATEA_KERNELS", "torch")
    assert main(["generate", "--model", str(tmp_path / "q"), "-n", "1", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "holds tiles for Galatea's native kernels" in err and "load the model it was quantized from" in err


def test_embedded_gguf_torch_folder_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("GALATEA_KERNELS", "torch")
    assert main(["quantize", "-q", str(embedded_model_path()), str(tmp_path / "q")]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == 1
    assert qc["quant_method"] == "galatea" and qc["mode"] == "int4" and qc["int4_block_n"] == int4_block_n()
    assert qc["modules"]["model.layers.0.self_attn.qkv_proj"] == "int4" and qc["modules"]["lm_head"] == "int8"
    ours = load(tmp_path / "q")
    assert ours.quant == "int4"
    assert isinstance(ours.model.model.layers[0].mlp.gate_up_proj, Int4Linear)
    assert isinstance(ours.model.lm_head, Int8Linear)
    assert torch.equal(logits(ours), logits(load(embedded_model_path())))
    # the packed weights are used where they lie in the file: a memory map, not a copy
    w = ours.model.model.layers[0].mlp.gate_up_proj.weight
    assert w.data_ptr() % 64 == 0 and not w.untyped_storage().resizable()


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_hf_folder_int8_matches_quantizing_at_load(tmp_path, monkeypatch, kernels):
    monkeypatch.setenv("GALATEA_KERNELS", kernels)
    src = write_safetensors(hf_model("mha", seed=5), tmp_path / "hf")  # tied embeddings
    assert main(["quantize", "-q", "--quant", "int8", str(src), str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    a, b = load(tmp_path / "q"), load(src, quant="int8")
    assert a.kernels == b.kernels and (a.kernels == "torch") == (kernels == "torch")
    assert torch.equal(logits(a), logits(b))


def test_another_cpus_int4_layout_is_repacked(tmp_path, monkeypatch):
    monkeypatch.setenv("GALATEA_KERNELS", "torch")  # format 1: torch's layout depends on the CPU
    src = write_safetensors(hf_model("gqa", seed=6), tmp_path / "hf")
    assert main(["quantize", "-q", str(src), str(tmp_path / "q")]) == 0
    want = logits(load(tmp_path / "q"))
    # pretend the file came from a CPU with another block size: it is unpacked and packed again
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    here = config["quantization_config"]["int4_block_n"]
    from galatea.model.quant import GROUP

    for name, kind in config["quantization_config"]["modules"].items():
        assert kind in ("int4", "int8"), name
    other = 32 if here == 64 else 64
    import safetensors.torch as st

    tensors = st.load_file(str(tmp_path / "q" / "model.safetensors"))
    for name, kind in config["quantization_config"]["modules"].items():
        if kind != "int4":
            continue
        sz = tensors[f"{name}.scales_and_zeros"]
        n, k = sz.shape[1], sz.shape[0] * GROUP
        q = prequantized.unpack_int4(tensors[f"{name}.weight"], n, k, here)
        # the same codes in the other block size's layout: [N/BN, K, BN/2], rows j and j + BN/2 per byte
        blocks = q.view(n // other, other, k).permute(0, 2, 1)  # [N/BN, K, BN]
        tensors[f"{name}.weight"] = (blocks[..., : other // 2] | (blocks[..., other // 2 :] << 4)).reshape(n, k // 2)
    st.save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"]["int4_block_n"] = other
    config_path.write_text(json.dumps(config))
    assert torch.equal(logits(load(tmp_path / "q")), want)


@pytest.mark.parametrize("case, message", [
    ("quant-none", "this folder is stored as int4; --quant none needs the original weights"),
    ("exists", "already exists; pass --force"),
    ("missing", "not found"),
])
def test_clear_errors(tmp_path, capsys, monkeypatch, case, message):
    folder = tmp_path / "q"
    if case == "quant-none":
        monkeypatch.setenv("GALATEA_KERNELS", "torch")
    if case in ("quant-none", "exists"):
        assert main(["quantize", "-q", str(embedded_model_path()), str(folder)]) == 0
        capsys.readouterr()
    if case == "quant-none":
        code = main(["generate", "--model", str(folder), "--quant", "none", "-n", "1", "Hi"])
    elif case == "exists":
        code = main(["quantize", "-q", str(embedded_model_path()), str(folder)])
    else:
        code = main(["quantize", "-q", str(tmp_path / "nowhere"), str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
