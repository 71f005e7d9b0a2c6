"""KoboldCpp's newer samplers against references written here from their published
descriptions, in a different way than the code (brute force, float64 numpy), and each shown to
change what a real model writes on a case built for it.

- DRY (p-e-w's description, text-generation-webui PR 5677): the penalty of token t is
  multiplier * base^(L - allowed_length), L the longest run ending the context that also occurs
  earlier followed by t, no sequence breaker inside the run, t not a breaker.
- XTC (p-e-w, text-generation-webui PR 6335): with probability p, drop every token with
  probability >= threshold except the least likely of them.
- Dynamic temperature (kalomaze; llama.cpp's `temp_ext`): T in [T - r, T + r] by normalised
  entropy^exponent.
- Smoothing factor (kalomaze's quadratic sampling): max - f * (l - max)^2.
- Mirostat (Basu et al. 2021): the observed surprise of the drawn tokens averages to tau.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from galatea.engine import sampling as S
from galatea.engine.generate import generate, stream_generate
from galatea.engine.modern_samplers import Mirostat

V = 300


def finite(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero().flatten().tolist())


def dry_reference(context: list[int], vocab: int, mult: float, base: float, allowed: int,
                  breakers: set[int]) -> np.ndarray:
    """Brute force: for every candidate t and every length L, does context[-L:] + [t] occur
    earlier (the run free of breakers)?"""
    pen = np.zeros(vocab)
    if not context or context[-1] in breakers:
        return pen
    n = len(context)
    for t in range(vocab):
        if t in breakers:
            continue
        best = 0
        for length in range(1, n):
            run = context[n - length:]
            if any(x in breakers for x in run):
                break
            pattern = [*run, t]
            if any(context[s:s + length + 1] == pattern for s in range(0, n - length)):
                best = length
        if best >= allowed:
            pen[t] = mult * base ** (best - allowed)
    return pen


@pytest.mark.parametrize("seed", range(6))
def test_dry_penalties_equal_the_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    vocab = 12
    # a context with repeats: pieces copied from earlier in it, and some breakers (10, 11)
    context = list(rng.integers(0, vocab, 20))
    for _ in range(4):
        s = int(rng.integers(0, len(context) - 5))
        context += [*context[s:s + int(rng.integers(2, 6))], int(rng.integers(0, vocab))]
    context += context[3:8]
    logits = torch.tensor(rng.normal(size=vocab), dtype=torch.float32)
    params = S.SamplingParams(temperature=0, dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2,
                              dry_sequence_breakers=(10, 11))
    got = S.Sampler(params, vocab).distribution(logits, context)
    ref = logits.double().numpy() - dry_reference(context, vocab, 0.8, 1.75, 2, {10, 11})
    assert np.allclose(got.double().numpy(), ref, atol=1e-5), (got.numpy() - ref)


def test_dry_is_off_at_zero_and_respects_its_range():
    context = [1, 2, 3, 4, 1, 2, 3]
    logits = torch.zeros(6)
    off = S.Sampler(S.SamplingParams(temperature=0), 6).distribution(logits, context)
    assert torch.equal(off, logits)
    on = S.Sampler(S.SamplingParams(temperature=0, dry_multiplier=1.0), 6).distribution(logits, context)
    assert on[4] == -1.0 * 1.75 ** (3 - 2) and on[[0, 1, 2, 3, 5]].eq(0).all()
    near = S.Sampler(S.SamplingParams(temperature=0, dry_multiplier=1.0, dry_range=4), 6).distribution(logits, context)
    assert torch.equal(near, logits)  # the earlier run is out of range


def test_xtc_removes_the_top_choices_but_the_least_likely_of_them():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.05])
    logits = probs.log()
    always = S.Sampler(S.SamplingParams(xtc_threshold=0.12, xtc_probability=1.0, temperature=1.0), 6)
    assert finite(always.distribution(logits, [])) == {2, 3, 4, 5}  # 0.4 and 0.25 go, 0.15 stays
    one_above = S.Sampler(S.SamplingParams(xtc_threshold=0.3, xtc_probability=1.0), 6)
    assert finite(one_above.distribution(logits, [])) == set(range(6))
    half = S.Sampler(S.SamplingParams(xtc_threshold=0.12, xtc_probability=0.5, seed=3), 6)
    applied = sum(0 not in finite(half.distribution(logits, [])) for _ in range(2000)) / 2000
    assert abs(applied - 0.5) < 0.05


def test_dynamic_temperature_follows_the_entropy():
    rng = np.random.default_rng(0)
    for spread, exponent in [(0.5, 1.0), (0.9, 2.0)]:
        x = rng.normal(size=V) * 2
        x[rng.choice(V, 100, replace=False)] = -np.inf  # candidates already removed
        p = np.exp(x - x[np.isfinite(x)].max())
        p /= p.sum()
        nz = p[p > 0]
        norm_entropy = -(nz * np.log(nz)).sum() / math.log(np.isfinite(x).sum())
        low, high = max(0.0, 1.0 - spread), 1.0 + spread
        t = low + (high - low) * norm_entropy ** exponent
        expect = x / t
        got = S.Sampler(S.SamplingParams(temperature=1.0, dynatemp_range=spread, dynatemp_exponent=exponent),
                        V).distribution(torch.tensor(x, dtype=torch.float32), [])
        fin = np.isfinite(expect)
        assert np.allclose(got.numpy()[fin], expect[fin], rtol=1e-4) and not np.isfinite(got.numpy()[~fin]).any()


def test_smoothing_factor_is_quadratic_around_the_top():
    x = torch.tensor([3.0, 2.0, 0.0, -1.0, float("-inf")])
    got = S.Sampler(S.SamplingParams(smoothing_factor=0.5, temperature=2.0), 5).distribution(x, [])
    expect = torch.tensor([3.0, 2.5, -1.5, -5.0, float("-inf")]) / 2.0
    assert torch.allclose(got[:4], expect[:4]) and got[4] == float("-inf")


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_mirostat_holds_the_surprise_at_tau(version, tau):
    """On a Zipf-like distribution over 2000 tokens (surprise of plain sampling: ~7.6 bits),
    the drawn tokens' surprise under Mirostat averages to tau."""
    vocab = 2000
    logits = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    s = S.Sampler(S.SamplingParams(mirostat=version, mirostat_tau=tau, mirostat_eta=0.1, seed=1), vocab)
    probs = logits.softmax(-1)
    surprises = []
    for _ in range(1500):
        processed = s.distribution(logits, [])
        token = s.draw(processed)
        s.observe(processed, token)
        surprises.append(-math.log2(float(processed.softmax(-1)[token])))
    mean = sum(surprises[300:]) / len(surprises[300:])
    plain = float(-(probs * probs.log2()).sum())
    assert abs(mean - tau) < 0.35 and plain > tau + 3, (mean, plain)


def test_mirostat_v2_truncates_by_surprise_and_moves_mu():
    m = Mirostat(2, tau=3.0, eta=0.5)
    logits = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]).log()
    cut = m.truncate(logits)  # mu = 6: surprises 1, 2, 3, 4, 4 bits all stay
    assert finite(cut) == set(range(5))
    m.mu = 2.5
    cut = m.truncate(logits)
    assert finite(cut) == {0, 1}
    m.observe(cut, 1)  # p = 1/3 after renormalising: 1.585 bits
    assert math.isclose(m.mu, 2.5 - 0.5 * (math.log2(3) - 3.0), rel_tol=1e-6)


@pytest.fixture
def lm(embedded_lm):
    return embedded_lm


def test_dry_breaks_a_loop_that_greedy_decoding_falls_into(lm):
    prompt = ("You: Count with me: one two three four five six seven eight nine ten. Again!\n"
              "Aria: one two three four five six seven eight nine ten. Again?\nYou: Yes, again!\nAria:")
    ids = lm.tokenizer.encode(prompt)
    plain = S.SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    dry_on = S.SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0, dry_multiplier=0.8,
                              dry_sequence_breakers=tuple(lm.tokenizer.encode("\n", add_bos=False)))
    looped = generate(lm.model, lm.tokenizer, ids, plain, speculative=False)[0]
    broken = generate(lm.model, lm.tokenizer, ids, dry_on, speculative=False)[0]
    assert "five six seven eight nine ten" in looped, looped  # the whole count again, word for word
    assert "five six seven eight nine ten" not in broken, broken


COUNT = ("You: Count with me: one two three four five six seven eight nine ten. Again!\n"
         "Aria: one two three four five six seven eight nine ten. Again?\nYou: Yes, again!\nAria:")


@pytest.mark.parametrize("speculative", [False, True])
def test_a_banned_phrase_is_never_written_and_the_text_before_it_stays(lm, speculative):
    """KoboldCpp's phrase banning: when the reply writes a banned phrase (any case), generation
    rewinds to the token that began it, bans that token there, and goes on; nothing of the
    phrase was streamed. Greedy, so the text before the phrase must be the plain reply's."""
    ids = lm.tokenizer.encode(COUNT)
    plain = S.SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    text = generate(lm.model, lm.tokenizer, ids, plain, speculative=False)[0]
    at = text.lower().find("six seven")
    assert at > 0, text
    banned = S.SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0,
                              banned_phrases=("SIX SEVEN", "nine ten. again?"))
    chunks = [c.text for c in stream_generate(lm.model, lm.tokenizer, ids, banned, speculative=speculative)]
    out = "".join(chunks)
    assert "six seven" not in out.lower() and "nine ten. again?" not in out.lower(), out
    # the token that began the phrase (` six`, its space included) was undone; all before it stays
    assert out.startswith(text[: text.lower().find(" six seven")]), (out, text)
    assert len(lm.tokenizer.encode(out, add_bos=False)) >= 20  # it went on after the rewinds


def test_a_phrase_starting_inside_a_token_never_shows_part_of_it(lm):
    """`ix sev` starts inside the token ` six`: that whole token is held back and undone, so the
    streamed text is exactly the final text (nothing shown is taken back), and each token's
    log probability arrives once, with the chunk that made it final."""
    ids = lm.tokenizer.encode(COUNT)
    plain = S.SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    text = generate(lm.model, lm.tokenizer, ids, plain, speculative=False)[0]
    params = S.SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0, banned_phrases=("ix sev",),
                              logprobs=2)
    chunks = list(stream_generate(lm.model, lm.tokenizer, ids, params, speculative=False))
    out = "".join(c.text for c in chunks)
    assert "ix sev" not in out and out.startswith(text[: text.find(" six")]), out
    streamed = [e for c in chunks for e in (c.new_logprobs or [])]
    assert [e.token for e in streamed] == [e.token for e in chunks[-1].logprobs]
    assert lm.tokenizer.decode([e.token for e in streamed]) == out
