"""`galatea bench --suite`: every speed scenario in one run, as JSON and as a table, with
llama.cpp measured the same way in the same run when llama-cpp-python is available.

Scenarios: load time and peak memory; single-stream prefill and decode; time to first token of a
new chat turn at full context (recompute / prefix reuse / context shift); aggregate tokens/s of
1, 4 and 8 concurrent streams (continuous batching). llama.cpp runs the first three
(llama-cpp-python reuses a common prefix but has no context shift, and batches no clients).
"""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from galatea.bench.generation import TEXT, bench, bench_chat_turn, bench_concurrent, chat_turn_prompts
from galatea.model.checkpoint import LoadedModel


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def say(step: str) -> None:
    """What is being measured now: the suite takes minutes on a 7B, and says so as it goes."""
    print(f"bench: {step}...", file=sys.stderr, flush=True)


def run_suite(lm: LoadedModel, load_s: float, context: int = 2048, prompt_tokens: int = 512,
              gen_tokens: int = 128, llama_python: str | None = None) -> dict[str, Any]:
    rss_after_load = peak_rss_mb()
    say(f"prefill ({prompt_tokens} tokens) and decode ({gen_tokens} tokens)")
    galatea: dict[str, Any] = {"engine": "galatea", "kernels": lm.kernels_note, "load_s": round(load_s, 2),
                               "peak_rss_after_load_mb": rss_after_load}
    galatea.update({k: v for k, v in bench(lm, prompt_tokens, gen_tokens).items()
                    if k in ("prefill_tok_s", "decode_tok_s", "quant", "dtype", "threads")})
    galatea["peak_rss_single_stream_mb"] = peak_rss_mb()  # one chat: the model and one cache
    say(f"a new chat turn at a full context of {context}: recompute, prefix reuse, context shift")
    turn = bench_chat_turn(lm, context)
    galatea.update({k: turn[k] for k in ("ttft_recompute_s", "ttft_prefix_reuse_s", "ttft_shift_s",
                                         "prefill_only_new_s", "new_tokens", "shifted_tokens",
                                         "top1_agreement_vs_fresh")})
    say("1, 4 and 8 streams at once")
    galatea.update({k: v for k, v in bench_concurrent(lm, speculative=False).items() if k.startswith("streams_")})
    galatea["peak_rss_mb"] = peak_rss_mb()
    out: dict[str, Any] = {"model": str(lm.path), "context": context, "prompt_tokens": prompt_tokens,
                           "gen_tokens": gen_tokens, "galatea": galatea}
    python = llama_python or (sys.executable if importlib.util.find_spec("llama_cpp") else None)
    if python and lm.source == "gguf":
        prev, new = chat_turn_prompts(lm.tokenizer, context, 128)
        spec = {"model": str(lm.path), "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
                "gen_tokens": gen_tokens, "text": TEXT * (prompt_tokens // 8 + 1),
                "chat_turn": {"previous": prev, "new": new, "context": context}}
        say(f"llama.cpp, the same scenarios ({python})")
        out["llama.cpp"] = _run_llama_cpp(python, spec)
        out["ratios"] = _ratios(galatea, out["llama.cpp"])
    else:
        out["llama.cpp"] = "not measured: " + ("the model is not a GGUF file" if python else
                                               "llama_cpp is not importable (pass --llama-cpp-python PYTHON)")
    return out


def _run_llama_cpp(python: str, spec: dict[str, Any]) -> dict[str, Any]:
    script = Path(__file__).with_name("run_llama_cpp.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        run = subprocess.run([python, str(script), f.name], capture_output=True, text=True, timeout=3600)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"llama.cpp run failed: {last}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _ratios(g: dict[str, Any], ll: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 2) if isinstance(a, int | float) and isinstance(b, int | float) and b else None

    return {
        "prefill": ratio(g.get("prefill_tok_s"), ll.get("prefill_tok_s")),
        "decode": ratio(g.get("decode_tok_s"), ll.get("decode_tok_s")),
        # speed ratios: above 1 means Galatea is faster
        "new_turn_ttft_speedup": ratio(ll.get("ttft_prefix_reuse_s"), g.get("ttft_shift_s")),
        "load_speedup": ratio(ll.get("load_s"), g.get("load_s")),
    }


ROWS = [
    ("load (s)", "load_s"),
    ("peak RSS, one stream (MB)", "peak_rss_single_stream_mb"),
    ("peak RSS, whole suite (MB)", "peak_rss_mb"),
    ("prefill (tok/s)", "prefill_tok_s"),
    ("decode (tok/s)", "decode_tok_s"),
    ("new turn, recompute: TTFT (s)", "ttft_recompute_s"),
    ("new turn, prefix reuse: TTFT (s)", "ttft_prefix_reuse_s"),
    ("new turn, context shift: TTFT (s)", "ttft_shift_s"),
    ("  reading only the new tokens (s)", "prefill_only_new_s"),
    ("  top-1 agreement, shifted vs fresh", "top1_agreement_vs_fresh"),
    ("1 stream (tok/s)", "streams_1_tok_s"),
    ("4 streams, aggregate (tok/s)", "streams_4_tok_s"),
    ("8 streams, aggregate (tok/s)", "streams_8_tok_s"),
]


def format_table(result: dict[str, Any]) -> str:
    g = result["galatea"]
    ll = result["llama.cpp"] if isinstance(result["llama.cpp"], dict) else {}
    lines = [f"{result['model']}  (context {result['context']}, prompt {result['prompt_tokens']}, "
             f"{result['gen_tokens']} generated; galatea {g.get('quant')}/{g.get('dtype')}, "
             f"{g.get('threads')} threads; {g.get('kernels')})",
             f"{'':38}{'galatea':>12}{'llama.cpp':>12}{'ratio':>8}"]
    for label, key in ROWS:
        a, b = g.get(key), ll.get(key)
        r = ""
        if isinstance(a, int | float) and isinstance(b, int | float) and a and b:
            r = f"{(a / b if key.endswith('tok_s') else b / a):.2f}x"
        lines.append(f"{label:38}{_cell(a):>12}{_cell(b):>12}{r:>8}")
    if not ll:
        lines.append(f"llama.cpp: {result['llama.cpp']}")
    lines.append("ratio: how many times faster Galatea is (time rows: llama.cpp / galatea)")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)
