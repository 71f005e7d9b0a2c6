"""Speculative decoding from the chat itself: greedy output identical to plain decoding, alone
and in a batch of streams; sampled output distributed exactly as plain sampling's (a
chi-square test against the exact distribution, which a biased acceptance rule fails)."""

from __future__ import annotations

import pytest
import torch

from galatea.engine import speculative
from galatea.engine.generate import Generation, generate
from galatea.engine.sampling import Sampler, SamplingParams
from galatea.engine.scheduler import Scheduler
from galatea.engine.speculative import DraftLength, PromptLookup
from galatea.model.checkpoint import load
from tests.helpers import PATHS, greedy, run_clients

pytestmark = pytest.mark.slow

PROMPTS = [
    # repeats itself: drafts are found and mostly right
    "Aria's Persona: Aria is a cheerful bard. She often says *smiles warmly*.\n<START>\nYou: Hello!\n"
    "Aria: *smiles warmly* Hello, traveller! Welcome to the Silver Swan inn.\nYou: What is this place?\n"
    "Aria: *smiles warmly* This is the Silver Swan inn, traveller. Welcome!\nYou: Say it again.\nAria:",
    "You: Count with me: one two three four five six seven eight nine ten. Again!\n"
    "Aria: one two three four five six seven eight nine ten. Again?\nYou: Yes, again!\nAria:",
    # does not: drafts are rare and mostly wrong
    "You: Write a short poem about a lighthouse in winter.\nAria:",
    "You: What would you cook for a dragon who is tired of sheep?\nAria:",
]


@pytest.fixture(scope="module", params=PATHS)
def lm(request):
    return load(None, kernels=request.param)


def test_greedy_speculative_output_is_plain_output(lm, monkeypatch):
    # the draft length weighs drafts against a row's measured cost; a loaded machine's timings
    # would make the count of drafts below a coin flip, so the cost is the unmeasured default
    monkeypatch.setattr(type(lm.model.fused), "row_cost", property(lambda self: 0.15))
    drafted = accepted = 0
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        penalized = SamplingParams(max_new_tokens=60, temperature=0, repetition_penalty=1.15)
        for params in (greedy(80, ban_eos=False), penalized):
            _, _, plain = generate(lm.model, lm.tokenizer, ids, params, speculative=False)
            _, last, fast = generate(lm.model, lm.tokenizer, ids, params, speculative=True)
            assert fast == plain, prompt
            drafted, accepted = drafted + last.drafted_tokens, accepted + last.accepted_tokens
    assert accepted >= 60 and drafted > accepted  # drafts were taken, and some were wrong


def test_greedy_speculative_streams_in_a_batch_are_plain_output(lm):
    """Four streams at once through the server's engine: each with its own drafts, all verified
    in one pass per step, each giving what it gives alone without drafts."""
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    alone = [generate(lm.model, lm.tokenizer, p, greedy(40, ban_eos=False), speculative=False)[2] for p in prompts]
    engine = Scheduler(lm, max_context=512, max_batch=4)
    finished = []
    engine.finished.append(finished.append)
    try:
        results, finish, _, _ = run_clients(engine, prompts, greedy(40, ban_eos=False), cancel_at={})
    finally:
        engine.close()
    assert results == alone and all(f == "length" for f in finish)
    assert [c.finish_reason for c in finished] == ["length"] * 4  # each job told its listeners it ended


def test_prompt_lookup_takes_the_longest_most_recent_match():
    look = PromptLookup()
    tokens = [1, 2, 3, 9, 9, 2, 3, 7, 7, 5, 1, 2, 3]
    # "1 2 3" occurred at the start, followed by 9 9; "2 3" most recently followed by 7 7
    assert look.draft(tokens, 3) == [9, 9, 2]
    assert look.draft([*tokens, 4, 4], 2) == []  # "3 4", "4 4" never occurred before
    assert PromptLookup().draft([5, 6, 5, 6], 4) == [5, 6]  # what followed "5 6" the first time, to the end


def test_draft_length_weighs_acceptance_against_row_cost():
    n = DraftLength(most=8)
    for _ in range(20):
        n.update(4, 4)  # drafts keep being right: worth all eight even where rows are dear
    assert n.next(cost=0.1) == 8 and n.next(cost=0.25) == 8
    middling = DraftLength(most=8, rate=0.7)
    assert middling.next(cost=0.05) > middling.next(cost=0.3) > 0  # dearer rows: fewer drafts
    for _ in range(20):
        n.update(1, 0)  # drafts keep being wrong
    assert [n.next(cost=0.25) for _ in range(DraftLength.PROBE_EVERY - 1)] == [0] * (DraftLength.PROBE_EVERY - 1)
    assert n.next(cost=0.25) == 1  # then one probe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LLaMA (Q8_0 GGUF) on the native kernels: its distributions are known exactly."""
    import gguf

    from tests.checkpoints import hf_model, write_gguf

    path = write_gguf(hf_model("kquant", seed=7), tmp_path_factory.mktemp("spec") / "m.gguf",
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    lm = load(path, dtype=torch.float32, kernels=PATHS[0])
    assert lm.model.fused is not None
    return lm


PARAMS = dict(max_new_tokens=3, temperature=1.3, top_k=3, repetition_penalty=1.3, ban_eos=True)
PROMPT = [1, 450, 4799, 338]


def exact_distribution(lm) -> dict[tuple[int, ...], float]:
    """P(3-token continuation) under plain sampling: the sampler's chain at each prefix (its
    penalties included), from the model's logits computed one position at a time."""
    sampler = Sampler(SamplingParams(**PARAMS, seed=0), lm.config.vocab_size)

    def probs(prefix: list[int]) -> torch.Tensor:
        cache = lm.model.make_cache(1, 16)
        logits = [lm.model(torch.tensor([[t]]), i, cache)[0] for i, t in enumerate(prefix)][-1]
        return torch.softmax(sampler.distribution(logits, prefix), -1)

    out: dict[tuple[int, ...], float] = {}
    first = probs(PROMPT)
    for a in first.nonzero().flatten().tolist():
        second = probs([*PROMPT, a])
        for b in second.nonzero().flatten().tolist():
            third = probs([*PROMPT, a, b])
            for c in third.nonzero().flatten().tolist():
                out[(a, b, c)] = first[a].item() * second[b].item() * third[c].item()
    return out


def draw(lm, seeds: range, monkeypatch, drafts: list[int] | None) -> dict[tuple[int, ...], int]:
    """Continuations over many seeds; with `drafts`, every forward pass verifies those tokens."""
    if drafts is not None:
        monkeypatch.setattr(PromptLookup, "draft", lambda self, tokens, k: drafts[:k])
        monkeypatch.setattr(DraftLength, "next", lambda self, cost: len(drafts))
    counts: dict[tuple[int, ...], int] = {}
    for seed in seeds:
        gen = Generation(lm.model, lm.tokenizer, PROMPT, SamplingParams(**PARAMS, seed=seed),
                         speculative=drafts is not None)
        gen.prefill_step()
        while not gen.done:
            gen.sample()
            if gen.needs_forward:
                gen.forward()
        key = tuple(gen.tokens[len(PROMPT):])
        counts[key] = counts.get(key, 0) + 1
    return counts


def chi_square(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float]) -> tuple[float, int]:
    n = sum(counts.values())
    assert set(counts) <= set(exact), "a continuation plain sampling can never give"
    stat = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in exact.items())
    return stat, len(exact) - 1


def test_sampled_speculative_output_has_the_plain_distribution(tiny, monkeypatch):
    """3 tokens, top-3 at temperature 1.3 with a repetition penalty: 27 continuations with known
    probabilities. Every forward pass verifies two drafts: the most likely first token's likely
    successor pair, so drafts are accepted often and rejected often. Chi-square over 3000 seeds
    against the exact distribution, 26 degrees of freedom: the 0.999 quantile is 54.1."""
    exact = exact_distribution(tiny)
    top = max(exact, key=exact.get)
    stat, dof = chi_square(draw(tiny, range(3000), monkeypatch, drafts=[top[1], top[2]]), exact)
    assert dof == 26 and stat < 54.1, stat


def test_a_biased_acceptance_rule_fails_the_same_test(tiny, monkeypatch):
    """The same test catches a plausible bug: on rejection, drawing from p without removing the
    rejected draft (the draft then gets probability p + (1-p) p)."""
    exact = exact_distribution(tiny)
    top = max(exact, key=exact.get)

    def biased(processed, draft, greedy, rng):
        probs = torch.softmax(processed, dim=-1)
        if torch.rand(1, generator=rng).item() < probs[draft].item():
            return draft, True
        return int(torch.multinomial(probs, 1, generator=rng)), False

    monkeypatch.setattr(speculative, "accept", biased)
    monkeypatch.setattr("galatea.engine.generate.accept", biased)
    stat, _ = chi_square(draw(tiny, range(3000), monkeypatch, drafts=[top[1], top[2]]), exact)
    assert stat > 54.1, stat


def test_plain_sampling_passes_the_same_test(tiny, monkeypatch):
    stat, _ = chi_square(draw(tiny, range(3000), monkeypatch, drafts=None), exact_distribution(tiny))
    assert stat < 54.1, stat
