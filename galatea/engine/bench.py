"""`galatea bench`: prompt-processing and decoding speed, measured the way baseline.md measures
llama.cpp (a prompt of N tokens read at once; then one token per step, greedy, EOS banned)."""

from __future__ import annotations

import time
from typing import Any

import torch

from galatea.model.checkpoint import LoadedModel


def bench(lm: LoadedModel, prompt_tokens: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict[str, Any]:
    model = lm.model
    # A real text, repeated to length: token ids as a user's prompt would have them.
    text = ("Aria's Persona: Aria is a cheerful travelling bard who tells stories about distant lands.\n"
            "<START>\nYou: Hello! Who are you?\nAria: I'm Aria, a bard. Shall I sing you a song?\n")
    ids = lm.tokenizer.encode(text * (prompt_tokens // 8 + 1))[:prompt_tokens]
    prompt = torch.tensor([ids], device=model.device)
    cache = model.make_cache(1, prompt_tokens + gen_tokens)

    model.prefill(prompt[:, :16], 0, cache)  # warm-up: first-call allocations and kernel selection
    prefill_s = min(_timed(lambda: model.prefill(prompt, 0, cache)) for _ in range(repeats))

    def decode() -> None:
        logits = model.prefill(prompt, 0, cache)[0]
        for pos in range(prompt_tokens, prompt_tokens + gen_tokens):
            token = int(torch.argmax(logits))
            logits = model(torch.tensor([[token]], device=model.device), pos, cache)[0]

    decode_s = min(_timed(decode) for _ in range(max(1, repeats - 1))) - prefill_s
    return {
        "model": str(lm.path),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quant": lm.quant,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 1),
        "decode_tok_s": round(gen_tokens / decode_s, 1),
        "decode_ms_per_token": round(1000 * decode_s / gen_tokens, 2),
    }


def _timed(fn: Any) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t
