"""Write a random-weight LLaMA-7B-shaped GGUF (Pygmalion 7B's shape) for speed measurements.

Speed does not depend on the weights' values: Q4_0 blocks of random bytes with a fixed fp16
scale, LLaMA-7B hyper-parameters, and the LLaMA vocabulary from shared/data. About 3.8 GB.

    python bench/make_random_gguf.py OUT.gguf [--type Q4_0|Q8_0] [--layers 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

from galatea.model.gguf_file import GGUFFile

VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ggml-vocab-llama-spm.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q8_0"])
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    qtype = gguf.GGMLQuantizationType[args.type]
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
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)

    def quant(rows: int, cols: int) -> np.ndarray:
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        raw[..., :2] = scale
        return raw.reshape(rows, -1)

    def add(name: str, rows: int, cols: int) -> None:
        raw = quant(rows, cols)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    add("token_embd.weight", vocab_size, hidden)
    for i in range(args.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{n}.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add("output.weight", vocab_size, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
