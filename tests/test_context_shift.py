"""Context shift and prompt cache slots: when the window drops old turns, the persona's cache is
kept, the surviving turns are moved and re-rotated, and only the new turn is read."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from galatea.chat.cards import load_character
from galatea.chat.session import ChatSession
from galatea.chat.store import Store
from galatea.engine.generate import stream_generate
from galatea.engine.prompt_cache import MIN_SHIFT, PromptCache, PromptCachePool, plan_reuse
from tests.helpers import greedy

pytestmark = pytest.mark.slow

PERSONA = ("Aria's Persona: Aria is a cheerful travelling bard with a battered lute and a pet ferret "
           "called Pip. She loves old ballads, bad puns and warm bread.\n<START>\n")
TURNS = [
    ("You", "Hello there! What brings you to this village?"),
    ("Aria", "The harvest fair, of course! Pip smelled the honey cakes from three valleys away."),
    ("You", "Will you play something at the fair tonight?"),
    ("Aria", "Only if the crowd promises to sing along to the chorus, even the grumpy miller."),
    ("You", "What is your favourite ballad?"),
    ("Aria", "The Lay of the Lost Lighthouse. It has eleven verses and every one ends in a storm."),
    ("You", "Does Pip ever join in?"),
    ("Aria", "He squeaks on the high notes. The audience usually throws him more coins than me."),
]


def chat_text(turns) -> str:
    return PERSONA + "".join(f"{who}: {text}\n" for who, text in turns)


@pytest.fixture
def lm(embedded_lm_exact):
    return embedded_lm_exact


def test_plan_finds_the_surviving_turns_after_the_persona():
    persona, turns = list(range(1000, 1050)), [list(range(i * 100, i * 100 + 40)) for i in range(6)]
    held = persona + functools.reduce(operator.iadd, turns[:5], [])
    new = persona + functools.reduce(operator.iadd, turns[2:], [])  # turns 0 and 1 dropped out, turn 5 is new
    plan = plan_reuse(held, new, context_shift=True)
    assert (plan.common, plan.moves) == (50, ((50 + 80, 50, 120),))
    assert plan.compute == ((170, len(new)),)  # only the new turn is read
    assert plan_reuse(held, new, context_shift=False).reused == 50
    # an edited first turn: the turns after it are still kept, at their old positions
    edited = persona + [7] * 40 + functools.reduce(operator.iadd, turns[1:], [])
    plan = plan_reuse(held, edited, context_shift=True)
    assert plan.moves == ((90, 90, 160),) and plan.compute == ((50, 90), (250, len(edited)))
    # too little survives to be worth moving
    short = persona + turns[4][-(MIN_SHIFT - 1):] + turns[5]
    assert plan_reuse(held, short, context_shift=True).moved == 0


def fill(lm, slot: PromptCache, ids: list[int], context: int) -> None:
    cache, plan = slot.reuse(lm.model, [*ids, 0], context)
    assert plan.compute[-1][1] == len(ids) + 1
    lm.model.prefill(torch.tensor([ids[plan.first_change :]]), plan.first_change, cache)
    slot.holds(ids)


def test_shift_keeps_the_persona_and_re_rotates_the_survivors(lm):
    tok = lm.tokenizer
    context = 512
    held = tok.encode(chat_text(TURNS))
    new = tok.encode(chat_text([*TURNS[2:], ("You", "Sing it for me now, please!")]) + "Aria:")
    slot = PromptCache(context_shift=True)
    fill(lm, slot, held, context)
    before_k, before_v = slot.cache.keys.clone(), slot.cache.values.clone()
    plan = slot.plan(new)

    cache, plan = slot.reuse(lm.model, new, context)
    reused = plan.reused
    plan_common = next(i for i, (a, b) in enumerate(zip(held, new, strict=False)) if a != b)
    assert slot.last_shift > MIN_SHIFT and reused == plan_common + slot.last_shift
    assert len(plan.compute) == 1 and plan.first_change == reused
    # the persona's entries are untouched, in every layer
    assert torch.equal(cache.keys[:, :, :, :plan_common], before_k[:, :, :, :plan_common])
    assert torch.equal(cache.values[:, :, :, :plan_common], before_v[:, :, :, :plan_common])

    fresh = lm.model.make_cache(1, context)
    lm.model.prefill(torch.tensor([new[:reused]]), 0, fresh)
    span = slice(plan_common, reused)
    # layer 0's keys/values depend only on the token and its position: equal to a fresh run
    torch.testing.assert_close(cache.keys[0, :, :, span], fresh.keys[0, :, :, span], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache.values[0, :, :, span], fresh.values[0, :, :, span], atol=1e-4, rtol=0)
    # deeper layers once attended to the dropped turns: they differ, by design
    assert (cache.keys[-1, :, :, span] - fresh.keys[-1, :, :, span]).abs().max() > 1e-3
    # moved without re-rotation, layer 0's keys would be wrong: the rotation is what fixes them
    (src_at, _, length), = plan.moves
    src = slice(src_at, src_at + length)
    assert (before_k[0, :, :, src] - fresh.keys[0, :, :, span]).abs().max() > 1e-2


def run(lm, ids, slot, n=8):
    out, last = [], None
    for chunk in stream_generate(lm.model, lm.tokenizer, ids, greedy(n), None, 512, slot):
        if chunk.token is not None:
            out.append(chunk.token)
        last = chunk
    return out, last


def test_shifted_predictions_track_a_fresh_computation(lm):
    """The drift: next-token predictions over the new turn, teacher-forced, after a shift vs fresh."""
    tok = lm.tokenizer
    held = tok.encode(chat_text(TURNS))
    new = tok.encode(chat_text([*TURNS[2:], ("You", "Tell me the first verse of the lighthouse ballad.")]) + "Aria:")
    slot = PromptCache(context_shift=True)
    fill(lm, slot, held, 512)
    cache, plan = slot.reuse(lm.model, new, 512)
    reused = plan.first_change
    assert slot.last_shift > 0 and len(plan.compute) == 1
    shifted = lm.model(torch.tensor([new[reused:]]), reused, cache, all_logits=True)[0]
    fresh_cache = lm.model.make_cache(1, 512)
    fresh = lm.model(torch.tensor([new]), 0, fresh_cache, all_logits=True)[0, reused:]
    agree = (shifted.argmax(-1) == fresh.argmax(-1)).float().mean().item()
    assert agree >= 0.8, agree


def test_without_shift_the_result_is_a_fresh_computation(lm):
    tok = lm.tokenizer
    held = tok.encode(chat_text(TURNS))
    new = tok.encode(chat_text([*TURNS[2:], ("You", "Sing it for me now, please!")]) + "Aria:")
    slot = PromptCache(context_shift=False)
    fill(lm, slot, held, 512)
    ids, last = run(lm, new, slot)
    assert last.shifted_tokens == 0 and 0 < last.cached_tokens < 60  # only the persona was reused
    assert ids == run(lm, new, None)[0]


def test_pool_keeps_alternating_clients_apart(lm):
    tok = lm.tokenizer
    a = tok.encode(chat_text(TURNS[:3]) + "Aria:")
    b = tok.encode("A completely different story begins here. Once upon a time, in a city of glass,")
    pool = PromptCachePool(slots=2)
    for ids in (a, b):
        run(lm, ids, pool.acquire(ids), n=4)
    _, last_a = run(lm, a, pool.acquire(a), n=4)
    _, last_b = run(lm, b, pool.acquire(b), n=4)
    assert last_a.cached_tokens == len(a) - 1 and last_b.cached_tokens == len(b) - 1
    one = PromptCachePool(slots=1)  # a single slot: each client evicts the other
    for ids in (a, b):
        run(lm, ids, one.acquire(ids), n=4)
    assert run(lm, a, one.acquire(a), n=4)[1].cached_tokens <= 1  # at most the shared first token


@pytest.mark.parametrize("shift", [True, False])
def test_a_long_chat_shifts_once_the_window_is_full(lm, tmp_path, shift):
    store = Store(tmp_path / "g.db")
    cid = store.add_character(load_character("aria"))
    chat = store.new_chat(cid)
    session = ChatSession(store, lm, chat, {"max_new_tokens": 24, "temperature": 0}, max_context=400,
                          context_shift=shift)
    shifted, dropped = [], []
    for i in range(9):
        list(session.send(f"Tell me story number {i} about Pip and the lute, please."))
        shifted.append(session.last.shifted_tokens)
        dropped.append(session.last_prompt.messages_dropped if session.last_prompt else 0)
        assert session.last.reply_tokens > 0
    assert any(dropped), "the test chat must outgrow the window"
    assert any(shifted) if shift else not any(shifted)


def test_chunk_reuse_moves_runs_both_ways_and_reads_only_what_changed(lm):
    """SillyTavern's rewrites: a world-info block appears after the first line (everything after
    it moves up), an example block further on disappears (what follows moves back down), a new
    message ends the prompt. Kept runs' layer-0 keys/values equal a fresh computation at their
    new positions (they depend only on token and position); only the changed text is read."""
    tok = lm.tokenizer
    first = "Aria's Persona: Aria is a cheerful travelling bard with a battered lute and a ferret.\n"
    lore = "[Eldoria: a land of misty glades, old ruins and the river Velka that runs through it.]\n"
    examples = "<START>\nYou: Do you sing?\nAria: Every day, and twice on market days, whatever the weather.\n"
    chat = "".join(f"{who}: {text}\n" for who, text in TURNS)
    held = tok.encode(first + examples + chat + "You: Tell me about Pip.\nAria: He is a ferret.\n")
    new = tok.encode(first + lore + chat + "You: Tell me about Pip.\nAria: He is a ferret.\nYou: And the lute?\nAria:")
    slot = PromptCache(context_shift=True)
    fill(lm, slot, held, 512)
    cache, plan = slot.reuse(lm.model, new, 512)
    assert plan.moves and plan.moved > 100
    read = sum(b - a for a, b in plan.compute)
    assert read <= len(tok.encode(lore)) + len(tok.encode("You: And the lute?\nAria:")) + 8, plan
    for a, b in plan.compute:  # the changed text, each range after what precedes it
        lm.model.prefill(torch.tensor([new[a:b]]), a, cache)
    fresh = lm.model.make_cache(1, 512)
    lm.model.prefill(torch.tensor([new]), 0, fresh)
    for _, dst, n in plan.moves:
        span = slice(dst, dst + n)
        torch.testing.assert_close(cache.keys[0, :, :, span], fresh.keys[0, :, :, span], atol=1e-4, rtol=0)
        torch.testing.assert_close(cache.values[0, :, :, span], fresh.values[0, :, :, span], atol=1e-4, rtol=0)
    # and the reply follows the prompt: generation through the slot agrees with a fresh run
    slot2 = PromptCache(context_shift=True)
    fill(lm, slot2, held, 512)
    ids, last = run(lm, new, slot2)
    assert last.shifted_tokens == plan.moved and last.cached_tokens == plan.reused
    assert ids[:4] == run(lm, new, None)[0][:4]
