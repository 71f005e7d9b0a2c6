"""Token ids identical to independent reference tokenizers on a corpus of hard strings.

References: llama.cpp's tokenizer (C++, recorded in tests/data/llama_cpp_tokens.json by
tests/data/record_llama_cpp_tokens.py) for both vocabularies, and HF transformers reading the
SmolLM2 GGUF (live) for the GPT-2 style BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from galatea.model.checkpoint import embedded_model_path
from galatea.model.tokenizer import from_hf_folder
from tests.checkpoints import write_tokenizer_model

RECORDED = json.loads((Path(__file__).parent / "data" / "llama_cpp_tokens.json").read_text())
CORPUS: list[str] = RECORDED["corpus"]


def test_corpus_covers_the_hard_cases():
    joined = "".join(CORPUS)
    for needle in ["  ", "\t", "\n\n", "\U0001f999", "\u65e5", "\u00e8", "<START>", "</s>", "333", "\r\n"]:
        assert needle in joined
    assert any(len(t) > 150 for t in CORPUS)


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_llama_vocab_matches_llama_cpp(llama_tok, index):
    assert llama_tok.encode(CORPUS[index], add_bos=False) == RECORDED["vocabs"]["llama-spm"][index]


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_smollm2_vocab_matches_llama_cpp(smol_tok, index):
    assert smol_tok.encode(CORPUS[index], add_bos=False) == RECORDED["vocabs"]["smollm2"][index]


@pytest.mark.slow
def test_smollm2_vocab_matches_transformers(smol_tok):
    from transformers import AutoTokenizer

    path = embedded_model_path()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    extra = ["<|im_start|>user\nHi<|im_end|>", "a<|endoftext|>b"]
    # transformers' GGUF converter drops SmolLM2's Digits pre-tokenizer (llama.cpp's "smollm"
    # keeps it), which shows only on non-ASCII numerals such as "½"; llama.cpp is the reference
    # for those strings (test above).
    comparable = [t for t in CORPUS + extra if not any(c.isnumeric() and not c.isascii() for c in t)]
    assert len(comparable) == len(CORPUS) + len(extra) - 1
    for text in comparable:
        assert smol_tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False).input_ids, repr(text)
        assert smol_tok.decode(smol_tok.encode(text)) == text


def test_llama_round_trip(llama_tok):
    for text in CORPUS:
        assert llama_tok.decode(llama_tok.encode(text)) == text, repr(text)


def test_bos_policy(llama_tok, smol_tok):
    assert llama_tok.encode("Hello world") == [1, 15043, 3186]  # add_bos_token true in the vocab file
    assert llama_tok.encode("Hello world", add_bos=False) == [15043, 3186]
    assert smol_tok.encode("Hello")[0] != smol_tok.bos_id  # SmolLM2's GGUF says add_bos_token false


def test_start_is_plain_text(llama_tok):
    ids = llama_tok.encode("<START>", add_bos=False)
    assert len(ids) > 1 and all(i > 2 for i in ids)


def test_hf_folder_tokenizer_model_equals_gguf_vocab(llama_tok, tmp_path):
    write_tokenizer_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    folder_tok = from_hf_folder(tmp_path, {})
    assert folder_tok.kind == "sentencepiece" and folder_tok.add_bos
    for text in CORPUS:
        assert folder_tok.encode(text) == llama_tok.encode(text)


@pytest.mark.slow
def test_hf_tokenizer_json_folder(tmp_path):
    """A folder with only tokenizer.json (SmolLM2's own layout) loads through `tokenizers` and
    gives transformers' ids for that same file."""
    from transformers import AutoTokenizer

    path = embedded_model_path()
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    tok = from_hf_folder(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})
    assert tok.kind == "bpe"
    for text in CORPUS:
        assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False).input_ids
    assert tok.encode("Hi") == ref("Hi").input_ids  # BOS policy read from the folder


PRE_TEXTS = ["I'm 12345 tokens, DON'T\n\n  you'LL see?! 3.14159 HELLO world's 'tis",
             "CamelCaseWords and snake_case 2024-11-30", "Ünïcödé 日本語 1234567"]


@pytest.mark.slow
@pytest.mark.parametrize("arch,pre", [("qwen2", "qwen2"), ("llama", "llama-bpe"), ("llama", "tekken"),
                                      ("llama", "gpt-2")])
def test_bpe_pre_tokenizers_of_qwen2_llama3_and_tekken(arch, pre, tmp_path):
    """A GGUF's `tokenizer.ggml.pre` says how text is split before BPE (Llama 3 groups digits by
    three, Qwen2 splits each, Tekken splits on case): the same vocabulary under each name gives
    llama.cpp's ids and transformers' (both read the same file)."""
    import gguf
    import llama_cpp
    from transformers import AutoTokenizer

    from galatea.model.gguf_file import GGUFFile
    from galatea.model.tokenizer import from_gguf_metadata

    meta = GGUFFile(embedded_model_path()).metadata
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), arch)  # vocabulary only, with the hyper-parameters llama.cpp reads
    w.add_context_length(256), w.add_embedding_length(64), w.add_block_count(1), w.add_feed_forward_length(128)
    w.add_head_count(4), w.add_head_count_kv(4), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(1e4)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(meta["tokenizer.ggml.merges"]), w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours = from_gguf_metadata(GGUFFile(path).metadata)
    cpp = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in PRE_TEXTS + [t for t in CORPUS if len(t) < 400]:
        expected = cpp.tokenize(text.encode(), add_bos=False, special=False)
        assert ours.encode(text, add_bos=False) == expected, (pre, text)
        assert hf(text, add_special_tokens=False).input_ids == expected, (pre, text)
