"""`galatea convert`: round trips between .bin, safetensors and GGUF, checked against transformers,
the `safetensors` package and the `gguf` package's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from galatea.cli import main
from galatea.model.checkpoint import embedded_model_path, load
from tests.checkpoints import hf_model, shared_vocab, write_bin_shards, write_gguf, write_safetensors
from tests.helpers import hf_logits, our_logits

pytestmark = pytest.mark.slow

Q = gguf.GGMLQuantizationType
TEXTS = ["Aria's Persona: A cheerful bard.\n<START>\nYou: Hello there, 123 friends!\nAria:",
         "  leading spaces, tabs\tand ünïcödé — 🎻", "You: What's 2+2?\nAria: It's 4."]


def convert(*args: str) -> None:
    assert main(["convert", "-q", *args]) == 0


@pytest.fixture(scope="module")
def tiny():
    return hf_model("gqa", seed=3)


def test_bin_shards_to_safetensors_are_the_same_tensors(tiny, tmp_path):
    src = write_bin_shards(tiny, tmp_path / "bin", shards=3)
    convert(str(src), str(tmp_path / "st"), "--to", "safetensors")
    got = load_file(str(tmp_path / "st" / "model.safetensors"))  # the safetensors package reads it
    want = {k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight" or not tiny.config.tie_word_embeddings}
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert (tmp_path / "st" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back), hf_logits(tiny), atol=0, rtol=0)
    torch.testing.assert_close(our_logits(tmp_path / "st"), hf_logits(tiny), atol=2e-4, rtol=1e-4)


def test_large_models_are_sharded_with_an_index(tiny, tmp_path):
    src = write_bin_shards(tiny, tmp_path / "bin")
    convert(str(src), str(tmp_path / "st"), "--to", "safetensors", "--shard-size", "1MB", "--dtype", "bfloat16")
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    assert len(shards) > 2
    for s, names in per_shard.items():  # at most the limit, unless one tensor alone is larger
        assert len(names) == 1 or (tmp_path / "st" / s).stat().st_size < 1.2e6
    assert json.loads((tmp_path / "st" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "st", dtype=torch.float32).eval()
    for name, v in back.state_dict().items():  # the original weights, rounded to bfloat16
        assert torch.equal(v, tiny.state_dict()[name].to(torch.bfloat16).float()), name
    for s in shards:
        assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "st" / s)).values())
    torch.testing.assert_close(our_logits(tmp_path / "st"), hf_logits(back), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype, atol", [(Q.F32, 2e-4), (Q.Q8_0, 2e-4)])
def test_gguf_to_hf_to_galatea_and_transformers(tiny, tmp_path, qtype, atol):
    src = write_gguf(tiny, tmp_path / "m.gguf", qtype)
    convert(str(src), str(tmp_path / "hf"), "--to", "safetensors", "--dtype", "float32")
    from_gguf = our_logits(src)
    torch.testing.assert_close(our_logits(tmp_path / "hf"), from_gguf, atol=atol, rtol=1e-4)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back), from_gguf, atol=atol, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    lm = load(tmp_path / "hf", quant="none")
    for text in TEXTS[:1]:
        assert tok(text)["input_ids"] == lm.tokenizer.encode(text)


def test_embedded_smollm2_becomes_an_hf_folder_transformers_reads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert(str(embedded_model_path()), str(tmp_path / "hf"), "--to", "safetensors", "--dtype", "float32")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"}
    ours = load(embedded_model_path(), dtype=torch.float32, quant="none")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert tok(text)["input_ids"] == ours.tokenizer.encode(text), text
    ids = ours.tokenizer.encode(TEXTS[0])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    cache = ours.model.make_cache(1, 128)
    mine = ours.model(torch.tensor([ids]), 0, cache, all_logits=True)[0]
    torch.testing.assert_close(theirs, mine, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kind, tensor_type, atol", [("f16", Q.F16, 2e-2), ("q8_0", Q.Q8_0, 0.15)])
def test_hf_to_gguf_reads_back_in_the_gguf_package_and_galatea(tiny, tmp_path, kind, tensor_type, atol):
    src = write_safetensors(tiny, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    convert(str(src), str(out), "--to", "gguf", "--type", kind)
    reader = gguf.GGUFReader(str(out))  # the reference reader
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * tiny.config.num_hidden_layers + 1  # embd, norm, output, 9 per layer
    assert tensors["blk.0.attn_q.weight"].tensor_type == tensor_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert list(tensors["token_embd.weight"].shape) == [64, 32000]  # GGUF lists the fastest dim first
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    field = reader.fields["llama.attention.head_count_kv"]
    assert int(field.parts[field.data[0]][0]) == 2
    want_tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
                   for i in reader.fields["tokenizer.ggml.tokens"].data[:5]]
    vocab = gguf.GGUFReader(str(shared_vocab())).fields["tokenizer.ggml.tokens"]
    assert want_tokens == [bytes(vocab.parts[i]).decode() for i in vocab.data[:5]]
    # q/k rows are in llama.cpp's order: the reader's raw F16 data is the permuted HF weight
    if kind == "f16":
        q = np.array(tensors["blk.0.attn_q.weight"].data, dtype=np.float32)
        w = tiny.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        from tests.checkpoints import llama_cpp_permute
        np.testing.assert_allclose(q, llama_cpp_permute(w, 4), atol=1e-3)
    got = our_logits(out)
    torch.testing.assert_close(got, hf_logits(tiny), atol=atol, rtol=1e-2)
    assert load(out).tokenizer.encode(TEXTS[0]) == load(src).tokenizer.encode(TEXTS[0])


def test_smollm2_round_trip_gguf_hf_gguf(tmp_path):
    convert(str(embedded_model_path()), str(tmp_path / "hf"), "--to", "safetensors")
    convert(str(tmp_path / "hf"), str(tmp_path / "back.gguf"), "--to", "gguf", "--type", "q8_0")
    a = load(embedded_model_path(), dtype=torch.float32, quant="none")
    b = load(tmp_path / "back.gguf", dtype=torch.float32, quant="none")
    for text in TEXTS:
        assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    ids = a.tokenizer.encode(TEXTS[0])
    la = a.model(torch.tensor([ids]), 0, a.model.make_cache(1, 128), all_logits=True)[0]
    lb = b.model(torch.tensor([ids]), 0, b.model.make_cache(1, 128), all_logits=True)[0]
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("not-a-model", "neither a GGUF file nor a Hugging Face model folder"),
    ("single-bin", "pass the folder holding it with its config.json"),
    ("no-config", "no config.json"),
    ("exists", "already exists; pass --force"),
    ("gguf-to-gguf", "already GGUF"),
    ("vocab-only", "vocabulary-only GGUF"),
    ("pickle", "refuses to execute it"),
    ("shard-size", "--shard-size"),
])
def test_clear_errors(tiny, tmp_path, capsys, case, message):
    src = write_bin_shards(tiny, tmp_path / "bin")
    dst, to, extra = tmp_path / "out", "safetensors", []
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "not-a-model":
        src = tmp_path / "notes.txt"
        src.write_text("hello")
    elif case == "single-bin":
        src = src / "pytorch_model-00001-of-00002.bin"
    elif case == "no-config":
        (src / "config.json").unlink()
    elif case == "exists":
        dst.mkdir()
        (dst / "model.safetensors").write_text("x")
    elif case == "gguf-to-gguf":
        src, dst, to = write_gguf(tiny, tmp_path / "m.gguf"), tmp_path / "o.gguf", "gguf"
    elif case == "vocab-only":
        src = shared_vocab()
    elif case == "pickle":
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        torch.save({"x": Evil()}, src / "pytorch_model-00001-of-00002.bin")
    elif case == "shard-size":
        extra = ["--shard-size", "huge"]
    assert main(["convert", "-q", str(src), str(dst), "--to", to, *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "pwned" not in captured.out
    if case != "exists" and dst.exists():
        assert not any(p.name.endswith(".partial") for p in dst.iterdir())


@pytest.mark.parametrize("failure, message", [("interrupt", r"interrupted while writing model\.safetensors"),
                                              ("disk-full", r"disk full while writing model\.safetensors")])
def test_failed_conversion_leaves_no_model_looking_folder(tiny, tmp_path, failure, message):
    import errno

    from galatea.errors import GalateaError
    from galatea.weights import convert as cv

    src = write_bin_shards(tiny, tmp_path / "bin")
    calls = []

    def bar(label, total):
        class Bar:
            def update(self, n):
                calls.append(n)
                if len(calls) == 5:
                    if failure == "interrupt":
                        raise KeyboardInterrupt
                    raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                pass
        return Bar()

    with pytest.raises(GalateaError, match=message):
        cv.hf_to_safetensors(src, tmp_path / "st", progress_factory=bar)
    assert list((tmp_path / "st").iterdir()) == []  # no partial shard, no config.json


RECORDED = json.loads((Path(__file__).parent / "data" / "llama_cpp_convert.json").read_text())


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_reads_our_gguf_as_we_do(tmp_path, kind):
    """llama.cpp's greedy continuation on the GGUF files `galatea convert` writes (recorded by
    tests/data/record_llama_cpp_convert.py) is what Galatea computes from the same files."""
    convert(str(embedded_model_path()), str(tmp_path / "hf"), "--to", "safetensors")
    convert(str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf", "--type", kind)
    want = RECORDED["results"][kind]
    lm = load(tmp_path / "m.gguf", dtype=torch.float32, quant="none")
    ids = lm.tokenizer.encode(RECORDED["prompt"])
    assert ids == want["prompt_ids"]
    cache = lm.model.make_cache(1, 256)
    logits = lm.model(torch.tensor([ids]), 0, cache)[0]  # [V]: the last position
    got = []
    for _ in range(len(want["greedy_ids"])):
        tok = int(logits.argmax())
        got.append(tok)
        logits = lm.model(torch.tensor([[tok]]), len(ids) + len(got) - 1, cache)[0]
    assert got == want["greedy_ids"], (lm.tokenizer.decode(got), want["text"])
