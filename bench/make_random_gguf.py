"""Write a random-weight GGUF of a real model's shape, for speed measurements.

Speed does not depend on the weights' values: blocks of random bytes with fixed fp16 scales,
the shape's hyper-parameters, and a vocabulary of the shape's size (llama.cpp's LLaMA vocabulary
from tests/data, padded with filler pieces). Shapes: Pygmalion 7B's (`llama-7b`, the default),
`llama-3.1-8b` (GQA, 128k vocabulary, Llama 3.1's rope_freqs), `qwen3-30b-a3b` (a mixture of
128 experts, 8 per token, q/k norms) and `gemma-3-12b` (sandwich norms, window layers, tied
262k vocabulary). Types as llama.cpp's quantizer chooses them: Q4_K_M is Q4_K with Q6_K for the
output and for attn_v and ffn_down in the layers its `use_more_bits` picks; Q4_0 and Q8_0 all
one type; IQ4_XS and Q3_K_S with a Q6_K output. `--layers N` cuts a model to its first N layers (the
per-token work of the rest is the same). Tensors are made and written one at a time, so a file
larger than memory can be made.

    python bench/make_random_gguf.py OUT.gguf [--shape llama-7b] [--type Q4_0|Q4_K_M|Q8_0|IQ4_XS|Q3_K_S] [--layers N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

from galatea.model.gguf_file import GGUFFile

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "ggml-vocab-llama-spm.gguf"
Q = gguf.GGMLQuantizationType

SHAPES = {
    "llama-7b": dict(arch="llama", hidden=4096, ffn=11008, heads=32, kv=32, head_dim=128, layers=32, vocab=32000,
                     context=2048, theta=10000.0),
    "llama-3.1-8b": dict(arch="llama", hidden=4096, ffn=14336, heads=32, kv=8, head_dim=128, layers=32, vocab=128256,
                         context=131072, theta=500000.0, llama3_rope=True),
    "qwen3-30b-a3b": dict(arch="qwen3moe", hidden=2048, ffn=6144, heads=32, kv=4, head_dim=128, layers=48,
                          vocab=151936, context=40960, theta=1000000.0, experts=128, used=8, expert_ffn=768,
                          qk_norm=True),
    "gemma-3-12b": dict(arch="gemma3", hidden=3840, ffn=15360, heads=16, kv=8, head_dim=256, layers=48, vocab=262144,
                        context=131072, theta=1000000.0, window=1024, qk_norm=True, gemma=True),
}
# byte offsets of each type's fp16 scales (d, and dmin for K-quants): set, so no NaN/inf
SCALE_AT = {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_XS: (0,), Q.Q3_K: (108,)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama-7b", choices=list(SHAPES))
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_K_M", "Q8_0", "IQ4_XS", "Q3_K_S"])
    ap.add_argument("--layers", type=int, help="keep the first N layers (default: all of the shape's)")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    write(Path(args.out), shape, args.type, args.layers or shape["layers"])


def write(out: Path, s: dict, kind: str, layers: int) -> None:
    arch, hidden, heads, kv, hd = s["arch"], s["hidden"], s["heads"], s["kv"], s["head_dim"]
    main_type = Q.Q4_K if kind == "Q4_K_M" else Q.Q3_K if kind == "Q3_K_S" else Q[kind]

    def type_of(name: str, layer: int = 0) -> gguf.GGMLQuantizationType:
        if kind in ("IQ4_XS", "Q3_K_S"):  # llama.cpp's: the output in Q6_K (IQ4_XS: attn_v in Q5_K with GQA >= 4)
            return Q.Q6_K if name == "output" else main_type
        if kind != "Q4_K_M":
            return main_type
        more = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2  # use_more_bits
        big = name in ("output", "token_embd_tied") or (name in ("attn_v", "ffn_down", "ffn_down_exps") and more)
        return Q.Q6_K if big else Q.Q4_K

    w = gguf.GGUFWriter(str(out), arch)
    _metadata(w, s, arch, layers)
    tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType | None]] = []  # None: F32 ones

    def matrix(name: str, rows: int, cols: int, qtype: gguf.GGMLQuantizationType, experts: int = 0) -> None:
        tensors.append((name, (experts, rows, cols) if experts else (rows, cols), qtype))

    def norm(name: str, n: int = hidden) -> None:
        tensors.append((name, (n,), None))

    tied = s.get("gemma", False)
    matrix("token_embd.weight", s["vocab"], hidden, type_of("token_embd_tied") if tied else main_type)
    if s.get("llama3_rope"):
        tensors.append(("rope_freqs.weight", (hd // 2,), None))
    for i in range(layers):
        b = f"blk.{i}"
        norm(f"{b}.attn_norm.weight")
        norm(f"{b}.ffn_norm.weight")
        if tied:  # Gemma's norms after attention and after the MLP
            norm(f"{b}.post_attention_norm.weight")
            norm(f"{b}.post_ffw_norm.weight")
        if s.get("qk_norm"):
            norm(f"{b}.attn_q_norm.weight", hd)
            norm(f"{b}.attn_k_norm.weight", hd)
        matrix(f"{b}.attn_q.weight", heads * hd, hidden, type_of("attn_q", i))
        matrix(f"{b}.attn_k.weight", kv * hd, hidden, type_of("attn_k", i))
        matrix(f"{b}.attn_v.weight", kv * hd, hidden, type_of("attn_v", i))
        matrix(f"{b}.attn_output.weight", hidden, heads * hd, type_of("attn_output", i))
        if s.get("experts"):
            e, f = s["experts"], s["expert_ffn"]
            tensors.append((f"{b}.ffn_gate_inp.weight", (e, hidden), Q.F32))  # the router stays F32
            matrix(f"{b}.ffn_gate_exps.weight", f, hidden, type_of("ffn_gate_exps", i), e)
            matrix(f"{b}.ffn_up_exps.weight", f, hidden, type_of("ffn_up_exps", i), e)
            matrix(f"{b}.ffn_down_exps.weight", hidden, f, type_of("ffn_down_exps", i), e)
        else:
            matrix(f"{b}.ffn_gate.weight", s["ffn"], hidden, type_of("ffn_gate", i))
            matrix(f"{b}.ffn_up.weight", s["ffn"], hidden, type_of("ffn_up", i))
            matrix(f"{b}.ffn_down.weight", hidden, s["ffn"], type_of("ffn_down", i))
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", s["vocab"], hidden, type_of("output"))

    for name, dims, qtype in tensors:
        if qtype is None or qtype == Q.F32:
            w.add_tensor_info(name, dims, np.dtype(np.float32), 4 * int(np.prod(dims)))
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (*dims[:-1], dims[-1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for _, dims, qtype in tensors:
        if qtype is None:
            w.write_tensor_data(np.ones(dims, dtype=np.float32))
        elif qtype == Q.F32:
            w.write_tensor_data(rng.normal(0, 0.02, size=dims).astype(np.float32))
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(dims[:-1]))  # one tensor at a time in memory (the largest: ~0.8 GB)
            raw = rng.integers(0, 256, size=(rows, dims[-1] // block, size), dtype=np.uint8)
            for at in SCALE_AT[qtype]:
                raw[..., at : at + 2] = scale
            w.write_tensor_data(raw.reshape(*dims[:-1], -1))
    w.close()


def _metadata(w: gguf.GGUFWriter, s: dict, arch: str, layers: int) -> None:
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(layers)
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(s["head_dim"])
    if s.get("experts"):
        w.add_expert_count(s["experts"])
        w.add_expert_used_count(s["used"])
        w.add_expert_feed_forward_length(s["expert_ffn"])
    if s.get("window"):
        w.add_sliding_window(s["window"])
    meta = GGUFFile(VOCAB).metadata
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta["tokenizer.ggml.scores"])
    types = list(meta["tokenizer.ggml.token_type"])
    filler = s["vocab"] - len(tokens)  # pieces no text ever becomes, to give the shape its vocabulary
    tokens += [f"\u2581filler{i}" for i in range(filler)]
    scores += [-1e6] * filler
    types += [1] * filler
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


if __name__ == "__main__":
    main()
