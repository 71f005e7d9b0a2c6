"""Samplers against transformers' logits processors (the reference for the shared ones) and
hand-worked examples for the KoboldAI-only ones (tail-free, top-a, penalty range and slope)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from galatea.engine import sampling as S
from galatea.errors import GalateaError

V = 500


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(V) * 3


def kept(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero().flatten().tolist())


def hf(processor, logits, ids=None):
    ids = torch.tensor([ids or [0]])
    return processor(ids, logits[None].clone())[0]


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k(logits, k):
    assert kept(S.top_k(logits, k)) == kept(hf(TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p(logits, p):
    assert kept(S.top_p(logits, p)) == kept(hf(TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_min_p(logits, p):
    assert kept(S.min_p(logits, p)) == kept(hf(MinPLogitsWarper(p), logits))


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9])
def test_typical(logits, mass):
    assert kept(S.typical(logits, mass)) == kept(hf(TypicalLogitsWarper(mass), logits))


def test_repetition_penalty_whole_context(logits):
    ctx = [3, 7, 7, 11, 499]
    ours = S.repetition_penalty(logits, ctx, 1.3)
    assert torch.allclose(ours, hf(RepetitionPenaltyLogitsProcessor(1.3), logits, ctx))


def test_temperature(logits):
    p = S.SamplingParams(temperature=0.5, sampler_order=(5,))
    sampler = S.Sampler(p, V)
    probs = torch.zeros(V)
    for _ in range(2000):
        probs[sampler(logits, [])] += 1
    expected = hf(TemperatureLogitsWarper(0.5), logits).softmax(-1)
    assert (probs / 2000 - expected).abs().max() < 0.05


def test_penalty_range_only_counts_recent_tokens():
    x = torch.tensor([2.0, 2.0, -2.0, 2.0])
    out = S.repetition_penalty(x, [0, 2, 1], 2.0, rng=2)  # only tokens 2 and 1 are in range
    assert out.tolist() == [2.0, 1.0, -4.0, 2.0]


def test_penalty_slope_ramps_towards_recent_tokens():
    # KoboldAI: range 4, slope 1 -> penalties 1, 4/3, 5/3, 2 from oldest to newest position.
    x = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0])
    out = S.repetition_penalty(x, [0, 1, 2, 3], 2.0, rng=4, slope=1.0)
    assert torch.allclose(out, torch.tensor([3.0, 3 / (4 / 3), 3 / (5 / 3), 1.5, 3.0]))


def test_top_a():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    out = S.top_a(probs.log(), 0.3)  # limit 0.3 * 0.5^2 = 0.075
    assert kept(out) == {0, 1, 2}


def test_tail_free():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.03, 0.02])
    # second differences |d2| of the sorted probabilities: .05, .1, .02, .06 -> cdf .217, .652, .739, 1
    out = S.tail_free(probs.log(), 0.7)
    assert kept(out) == {0, 1, 2}  # first kept always, cut after the cdf passes z, last dropped
    assert kept(S.tail_free(probs.log(), 1.0)) == set(range(6))


def test_sampler_order_matters(logits):
    hot = S.SamplingParams(temperature=5.0, top_p=0.5, seed=1)
    temp_last = S.Sampler(S.SamplingParams(**{**hot.__dict__, "sampler_order": (2, 5)}), V)
    temp_first = S.Sampler(S.SamplingParams(**{**hot.__dict__, "sampler_order": (5, 2)}), V)
    a = {temp_last(logits, []) for _ in range(300)}
    b = {temp_first(logits, []) for _ in range(300)}
    assert a <= kept(S.top_p(logits, 0.5))
    assert len(b) > len(a)  # flattening first lets many more tokens through top_p


def test_seed_reproduces_and_differs(logits):
    def draw(seed):
        s = S.Sampler(S.SamplingParams(temperature=1.0, seed=seed), V)
        return [s(logits, []) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_greedy_bias_bans_and_eos():
    x = torch.tensor([1.0, 5.0, 3.0, 4.0])
    greedy = S.SamplingParams(temperature=0)
    assert S.Sampler(greedy, 4)(x, []) == 1
    assert S.Sampler(S.SamplingParams(temperature=0, banned_tokens=(1,)), 4)(x, []) == 3
    assert S.Sampler(S.SamplingParams(temperature=0, logit_bias={2: 10.0}), 4)(x, []) == 2
    assert S.Sampler(S.SamplingParams(temperature=0, ban_eos=True), 4, eos_ids=[1])(x, []) == 3


def test_presence_and_frequency_penalties():
    x = torch.zeros(4)
    out = S.apply_penalties(x.clone(), [1, 1, 2], S.SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [0.0, -1.0, -0.75, 0.0]


def test_bad_values_are_refused():
    with pytest.raises(GalateaError, match="top_p"):
        S.Sampler(S.SamplingParams(top_p=1.5), V)
    with pytest.raises(GalateaError, match="sampler_order"):
        S.Sampler(S.SamplingParams(sampler_order=(9,)), V)


def test_sampling_never_picks_a_removed_token(logits):
    s = S.Sampler(S.SamplingParams(temperature=1.5, top_k=5, seed=3), V)
    allowed = kept(S.top_k(logits, 5))
    assert all(s(logits, []) in allowed for _ in range(200))
    assert not math.isnan(logits.sum().item())
