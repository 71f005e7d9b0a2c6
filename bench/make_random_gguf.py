"""Write a random-weight LLaMA-7B-shaped GGUF (Pygmalion 7B's shape) for speed measurements.

Speed does not depend on the weights' values: blocks of random bytes with fixed fp16 scales,
LLaMA-7B hyper-parameters, and the LLaMA vocabulary from tests/data. Q4_0 is about 3.8 GB;
Q4_K_M mixes types as llama.cpp's Q4_K_M does (Q6_K for the output matrix and for attn_v and
ffn_down in the layers its `use_more_bits` picks, Q4_K elsewhere), about 4.1 GB.

    python bench/make_random_gguf.py OUT.gguf [--type Q4_0|Q4_K_M|Q8_0] [--layers 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

from galatea.model.gguf_file import GGUFFile

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "ggml-vocab-llama-spm.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_K_M", "Q8_0"])
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    Q = gguf.GGMLQuantizationType
    main_type = Q.Q4_K if args.type == "Q4_K_M" else Q[args.type]

    def type_of(name: str, layer: int = 0) -> gguf.GGMLQuantizationType:
        if args.type != "Q4_K_M":
            return main_type
        n = args.layers  # llama.cpp's use_more_bits(i, n)
        more = layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2
        return Q.Q6_K if name == "output" or (name in ("attn_v", "ffn_down") and more) else Q.Q4_K

    hidden, ffn, heads, vocab_size = 4096, 11008, 32, 32000
    meta = GGUFFile(VOCAB).metadata
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(args.layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    # byte offsets of each type's fp16 scales (d, and dmin for K-quants): set, so no NaN/inf
    scale_at = {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)

    def add(name: str, rows: int, cols: int, qtype: gguf.GGMLQuantizationType) -> None:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for at in scale_at[qtype]:
            raw[..., at : at + 2] = scale
        raw = raw.reshape(rows, -1)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    add("token_embd.weight", vocab_size, hidden, main_type)
    for i in range(args.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{n}.weight", hidden, hidden, type_of(n, i))
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden, type_of("ffn_gate", i))
        add(f"blk.{i}.ffn_up.weight", ffn, hidden, type_of("ffn_up", i))
        add(f"blk.{i}.ffn_down.weight", hidden, ffn, type_of("ffn_down", i))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add("output.weight", vocab_size, hidden, type_of("output"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
