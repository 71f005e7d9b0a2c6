"""`galatea bench`: prompt-processing and decoding speed, measured the way baseline.md measures
llama.cpp (a prompt of N tokens read at once; then one token per step, greedy, EOS banned)."""

from __future__ import annotations

import time
from typing import Any

import torch

from galatea.model.checkpoint import LoadedModel

# A real text, repeated to length: token ids as a user's prompt would have them.
TEXT = ("Aria's Persona: Aria is a cheerful travelling bard who tells stories about distant lands.\n"
        "<START>\nYou: Hello! Who are you?\nAria: I'm Aria, a bard. Shall I sing you a song?\n")


def bench(lm: LoadedModel, prompt_tokens: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict[str, Any]:
    model = lm.model
    ids = lm.tokenizer.encode(TEXT * (prompt_tokens // 8 + 1))[:prompt_tokens]
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
        "weight_types": lm.tensor_types,  # as the file stores them (a GGUF's types stay as they are)
        "kernels": lm.kernels,
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": round(prompt_tokens / prefill_s, 1),
        "decode_tok_s": round(gen_tokens / decode_s, 1),
        "decode_ms_per_token": round(1000 * decode_s / gen_tokens, 2),
    }


def llama_bench(exe: str, model: Any, prompt_tokens: int, gen_tokens: int, threads: int) -> dict[str, Any]:
    """llama.cpp's own llama-bench on the same file: pp`prompt_tokens` and tg`gen_tokens`, its
    averages over its repetitions (5)."""
    import json
    import subprocess

    from galatea.errors import GalateaError

    try:
        run = subprocess.run([exe, "-m", str(model), "-p", str(prompt_tokens), "-n", str(gen_tokens),
                              "-t", str(threads), "-o", "json"], capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise GalateaError(f"--llama-bench {exe}: cannot run it ({e.strerror}); pass llama.cpp's llama-bench") from None
    if run.returncode != 0:
        raise GalateaError(f"--llama-bench: llama-bench failed ({run.stderr.strip().splitlines()[-1:]})")
    rows = json.loads(run.stdout)
    pp = next(r for r in rows if r.get("n_prompt") and not r.get("n_gen"))
    tg = next(r for r in rows if r.get("n_gen") and not r.get("n_prompt"))
    return {"engine": f"llama.cpp llama-bench ({pp.get('build_commit', '?')})",
            "prefill_tok_s": round(pp["avg_ts"], 1), "decode_tok_s": round(tg["avg_ts"], 1)}


def _timed(fn: Any) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


# ---- a new chat turn at full context -----------------------------------------------------------

# Lines that name none of Aria's lorebook keys: an entry switching on or off changes the text
# right after the persona, and then no shift is possible (in KoboldCpp neither).
_LINES = [
    "Tell me about the {n}th town you visited, the one with the crooked bell tower.",
    "Ah, town number {n}! The bell rang every hour except noon, and a goat stole a pie from the baker.",
    "What did the baker do about the goat and pie number {n}?",
    "She chased it past {n} market stalls, then laughed and asked me to play at her daughter's wedding.",
]


def chat_turn_prompts(tok: Any, context: int, max_new_tokens: int) -> tuple[str, str]:
    """(what the cache holds after the last turn: its prompt and the reply, the next turn's
    prompt), at the first turn where the window is full and the oldest messages drop out."""
    from galatea.chat.cards import load_character
    from galatea.chat.prompt import Turn, build_prompt

    char = load_character("aria")
    history = [Turn(i % 2 == 0, _LINES[i % 4].format(n=i // 4 + 1)) for i in range(4 * context // 40)]

    def prompt(n: int) -> Any:
        return build_prompt(char, history[:n], history[n].text, tok, context, max_new_tokens)

    n = next(k for k in range(2, len(history) - 2, 2) if prompt(k).messages_dropped)
    return prompt(n).text + " " + history[n + 1].text, prompt(n + 2).text


def bench_chat_turn(lm: LoadedModel, context: int = 2048, max_new_tokens: int = 128) -> dict[str, Any]:
    """Time to first token of a new turn in a chat whose window is full (the oldest turns drop
    out as it slides): recomputing the whole prompt, prefix reuse only (what llama.cpp's
    cache_prompt gives), and context shift; next to the time to read only the new tokens.
    Drift: top-1 agreement of next-token predictions over the new turn, shifted vs fresh."""
    from galatea.engine.prompt_cache import PromptCache

    model, tok = lm.model, lm.tokenizer
    prev_text, new_text = chat_turn_prompts(tok, context, max_new_tokens)
    prev, new = tok.encode(prev_text), tok.encode(new_text)

    def primed(shift: bool) -> PromptCache:
        slot = PromptCache(context_shift=shift)
        cache, _ = slot.reuse(model, [*prev, 0], context)
        model.prefill(torch.tensor([prev], device=model.device), 0, cache)
        slot.holds(prev)
        return slot

    def turn(slot: PromptCache | None) -> tuple[float, int, torch.Tensor]:
        """Time to the first token's logits; where the last computed range starts, and its logits."""
        t = time.perf_counter()
        if slot is None:
            cache, ranges = model.make_cache(1, context), [(0, len(new))]
        else:
            cache, plan = slot.reuse(model, new, context)
            ranges = list(plan.compute)
        for a, b in ranges[:-1]:
            model.prefill(torch.tensor([new[a:b]], device=model.device), a, cache)
        start = ranges[-1][0]
        logits = model(torch.tensor([new[start:]], device=model.device), start, cache, all_logits=True)[0]
        return time.perf_counter() - t, start, logits

    model.prefill(torch.tensor([new[:16]], device=model.device), 0, model.make_cache(1, 64))  # warm-up
    fresh_s, _, fresh_logits = turn(None)
    prefix_slot = primed(False)
    prefix_s, prefix_reused, _ = turn(prefix_slot)
    shift_slot = primed(True)
    shift_s, shift_reused, shift_logits = turn(shift_slot)
    shifted = shift_slot.last_shift
    # the ideal: reading only the new tokens, at their positions, into an already-filled cache
    cache = model.make_cache(1, context)
    model.prefill(torch.tensor([new[:shift_reused]], device=model.device), 0, cache)
    t = time.perf_counter()
    model.prefill(torch.tensor([new[shift_reused:]], device=model.device), shift_reused, cache)
    only_new_s = time.perf_counter() - t
    agree = (shift_logits.argmax(-1) == fresh_logits[shift_reused:].argmax(-1)).float().mean().item()
    return {
        "bench": "chat turn at full context", "model": str(lm.path), "quant": lm.quant, "context": context,
        "prompt_tokens": len(new), "new_tokens": len(new) - shift_reused, "shifted_tokens": shifted,
        "ttft_recompute_s": round(fresh_s, 3),
        "ttft_prefix_reuse_s": round(prefix_s, 3), "prefix_reused_tokens": prefix_reused,
        "ttft_shift_s": round(shift_s, 3),
        "prefill_only_new_s": round(only_new_s, 3),
        "shift_vs_only_new": round(shift_s / only_new_s, 2),
        "speedup_vs_recompute": round(fresh_s / shift_s, 1),
        "top1_agreement_vs_fresh": round(agree, 3),
    }


# ---- many users at once ------------------------------------------------------------------------

def bench_concurrent(lm: LoadedModel, streams: tuple[int, ...] = (1, 4, 8), gen_tokens: int = 64,
                     speculative: bool = True) -> dict[str, Any]:
    """Aggregate decoding speed of N simultaneous requests through the server's engine
    (continuous batching): N different short prompts, `gen_tokens` greedy tokens each. The
    engine runs on this thread (the one that loaded the model), as in `galatea serve`."""
    import threading

    from galatea.engine.sampling import SamplingParams
    from galatea.engine.scheduler import Scheduler

    params = SamplingParams(max_new_tokens=gen_tokens, temperature=0, repetition_penalty=1.0, ban_eos=True)
    out: dict[str, Any] = {"bench": "concurrent streams", "model": str(lm.path), "quant": lm.quant,
                           "weight_types": lm.tensor_types, "gen_tokens": gen_tokens, "speculative": speculative}

    def run(n: int) -> float:
        engine = Scheduler(lm, max_context=512, max_batch=max(n, 1), cache_slots=max(n, 1), start=False,
                        speculative=speculative)
        prompts = [lm.tokenizer.encode(f"You: Tell me story number {i} about a dragon.\nAria:") for i in range(n)]
        counts = [0] * n

        def client(i: int) -> None:
            for chunk in engine.generate_sync(prompts[i], params):
                counts[i] += chunk.token is not None

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        closer = threading.Thread(target=lambda: ([th.join() for th in threads], engine.close()))
        t = time.perf_counter()
        for th in threads:
            th.start()
        closer.start()
        engine.run()
        wall = time.perf_counter() - t
        return sum(counts) / wall

    run(1)  # warm-up
    for n in streams:
        out[f"streams_{n}_tok_s"] = round(run(n), 1)
    base = out[f"streams_{streams[0]}_tok_s"]
    for n in streams[1:]:
        out[f"streams_{n}_vs_1"] = round(out[f"streams_{n}_tok_s"] / base, 2)
    return out
