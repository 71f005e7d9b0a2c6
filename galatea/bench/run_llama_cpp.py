"""llama.cpp (llama-cpp-python) measured the way `galatea bench` measures Galatea, for the
side-by-side table of `galatea bench --suite`.

A standalone script (it imports nothing from Galatea, so it runs under any interpreter that has
`llama_cpp`; named so that its own folder on sys.path does not shadow `llama_cpp`):
`galatea bench --suite --llama-cpp-python PYTHON` runs it there. llama-cpp-python is
benchmark-only, never a Galatea dependency; build it from source for a fair comparison:
    pip install --no-binary llama-cpp-python llama-cpp-python

    python run_llama_cpp.py SPEC.json   ->  one JSON object on stdout

SPEC: {"model": path, "threads": n, "prompt_tokens": n, "gen_tokens": n, "text": str,
       "chat_turn": {"previous": str, "new": str, "context": n} (optional)}
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    import numpy as np
    from llama_cpp import Llama, __version__

    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    n_prompt, n_gen = spec["prompt_tokens"], spec["gen_tokens"]
    ctx = max(n_prompt + n_gen + 8, spec.get("chat_turn", {}).get("context", 0) + 8)
    t = time.perf_counter()
    llm = Llama(model_path=spec["model"], n_threads=spec["threads"], n_batch=512, n_ctx=ctx, verbose=False)
    out = {"engine": f"llama.cpp (llama-cpp-python {__version__})", "load_s": round(time.perf_counter() - t, 2)}

    ids = llm.tokenize(spec["text"].encode())[:n_prompt]
    n_vocab = llm.n_vocab()
    best_prefill = best_decode = float("inf")
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best_prefill = min(best_prefill, time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n_gen):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        best_decode = min(best_decode, time.perf_counter() - t)
    out["prefill_tok_s"] = round(n_prompt / best_prefill, 1)
    out["decode_tok_s"] = round(n_gen / best_decode, 1)
    out["peak_rss_single_stream_mb"] = peak_rss_mb()  # its context is allocated at load: n_ctx

    turn = spec.get("chat_turn")
    if turn:
        # llama-cpp-python's generate() reuses the longest common token prefix (cache_prompt);
        # it has no context shift. Time to first token of the new turn, then a fresh reference.
        prev, new = llm.tokenize(turn["previous"].encode()), llm.tokenize(turn["new"].encode())
        llm.reset()
        llm.eval(prev)

        def first_token(tokens: list[int]) -> float:
            t = time.perf_counter()
            for _ in llm.generate(tokens, temp=0.0, top_k=1):
                break
            return time.perf_counter() - t

        out["ttft_prefix_reuse_s"] = round(first_token(new), 3)
        llm.reset()
        out["ttft_recompute_s"] = round(first_token(new), 3)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    main()
