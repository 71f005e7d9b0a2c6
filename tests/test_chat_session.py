"""A chat with the embedded model: replies saved cleanly, swipes with new seeds, continue,
impersonate, a stopped reply keeps what was written."""

from __future__ import annotations

import threading

import pytest

from galatea.chat.cards import load_character
from galatea.chat.session import ChatSession, clean_reply, reply_stops
from galatea.chat.store import Store


@pytest.fixture
def lm(embedded_lm):
    return embedded_lm


@pytest.fixture
def session(lm, tmp_path):
    store = Store(tmp_path / "g.db")
    cid = store.add_character(load_character(None))
    chat = store.new_chat(cid)
    return ChatSession(store, lm, chat, {"max_new_tokens": 12, "seed": 5})


def test_clean_reply_and_stops():
    assert clean_reply("  Aria: Hello <USER>, I am <BOT>.  ", "Aria", "Aria", "Ann") == "Hello Ann, I am Aria."
    assert reply_stops("Aria", "Ann") == ["\nYou:", "\nAnn:", "<START>", "\nAria's Persona:", "</s>"]
    assert reply_stops("Aria", "You").count("\nYou:") == 1


def test_send_saves_message_and_reply(session):
    streamed = "".join(session.send("Hello! What is your lute called?"))
    msgs = session.messages()
    assert [m.is_user for m in msgs] == [False, True, False]
    assert msgs[1].text == "Hello! What is your lute called?"
    assert msgs[2].text == clean_reply(streamed, "Aria", "Aria", "You") and msgs[2].text
    assert msgs[2].swipes[0].seed == 5 and msgs[2].swipes[0].gen_finished >= msgs[2].swipes[0].gen_started
    assert session.last.prompt_tokens == session.last_prompt.tokens
    # the embedded SmolLM2 carries a ChatML chat template: "auto" follows it, and its end marker stops
    assert session.last_prompt.format == "template"
    assert session.last_prompt.text.endswith("<|im_start|>user\nHello! What is your lute called?<|im_end|>\n"
                                             "<|im_start|>assistant\n")
    assert "<|im_end|>" not in streamed and "<|im_end|>" in session.last_prompt.stops


def test_regenerate_adds_a_swipe_with_a_new_seed(session):
    list(session.send("Sing me a song."))
    list(session.regenerate())
    last = session.messages()[-1]
    assert len(last.swipes) == 2 and last.active == 1
    assert last.swipes[0].seed != last.swipes[1].seed


def test_continue_and_impersonate(session):
    list(session.send("Tell me a story."))
    before = session.messages()[-1].text
    list(session.continue_last())
    after = session.messages()[-1].text
    assert after.startswith(before) and len(session.messages()) == 3
    assert session.last_prompt.text.endswith("<|im_start|>assistant\n" + before)  # continued, not restarted
    n = len(session.messages())
    "".join(session.impersonate())
    assert session.last_prompt.text.endswith("<|im_start|>user\n") and len(session.messages()) == n  # not saved
    session.settings["format"] = "pygmalion"  # the same in Pygmalion's layout
    before = session.messages()[-1].text
    list(session.continue_last())
    assert session.last_prompt.text.endswith("Aria: " + before)
    "".join(session.impersonate())
    assert session.last_prompt.text.endswith("\nYou:")


def test_stopped_reply_keeps_what_was_written(session):
    cancel = threading.Event()
    session.settings["max_new_tokens"] = 200
    parts = []
    for text in session.send("Tell me everything about the inn.", cancel):
        parts.append(text)
        if len(parts) == 3:
            cancel.set()
    assert session.last.finish_reason == "cancelled"
    assert session.messages()[-1].text == clean_reply("".join(parts), "Aria", "Aria", "You")


def test_a_reply_stopped_before_its_first_token_leaves_no_message(session):
    """The page's Stop pressed while the prompt is still read: the user's message stays, no
    empty reply is stored, and a regenerate after it keeps the old reply's swipes intact."""
    stopped = threading.Event()
    stopped.set()
    assert "".join(session.send("Hello there.", stopped)) == ""
    msgs = session.messages()
    assert session.last.finish_reason == "cancelled" and msgs[-1].is_user and msgs[-1].text == "Hello there."
    session.settings["max_new_tokens"] = 4
    "".join(session.reply())
    before = session.messages()[-1]
    assert "".join(session.regenerate(stopped)) == ""
    after = session.messages()[-1]
    assert len(after.swipes) == len(before.swipes) == 1 and after.text == before.text


def test_the_newer_samplers_reach_the_chat(session, monkeypatch):
    """`/set dry_multiplier 0.8` (or mirostat, xtc_probability, ...) changes the parameters the
    reply is generated with."""
    seen = []
    real = session._run

    def spy(ids, params, cancel, progress):
        seen.append(params)
        return real(ids, params, cancel, progress)

    monkeypatch.setattr(session, "_run", spy)
    session.settings.update(dry_multiplier=0.8, mirostat=2, mirostat_tau=3.0, xtc_probability=0.5, max_new_tokens=8)
    reply = "".join(session.send("Sing me something."))
    p = seen[-1]
    assert reply and p.dry_multiplier == 0.8 and p.mirostat == 2 and p.mirostat_tau == 3.0
    assert p.xtc_probability == 0.5 and len(p.dry_sequence_breakers) == 4
    # and KoboldAI's older ones, with their order, as the page's "More samplers" sets them
    session.settings.update(typical_p=0.9, tfs=0.95, top_a=0.2, repetition_penalty_slope=0.7, presence_penalty=0.3,
                            frequency_penalty=0.1, top_k=40.0, sampler_order=[6, 5, 0, 1, 2, 3, 4])
    "".join(session.send("Again."))
    p = seen[-1]
    assert (p.typical_p, p.tfs, p.top_a, p.repetition_penalty_slope, p.presence_penalty, p.frequency_penalty) == \
        (0.9, 0.95, 0.2, 0.7, 0.3, 0.1)
    assert p.top_k == 40 and isinstance(p.top_k, int) and tuple(p.sampler_order) == (6, 5, 0, 1, 2, 3, 4)


def test_settings_come_in_layers_and_bad_stored_values_are_ignored(lm, tmp_path):
    from galatea.chat.settings import parse

    store = Store(tmp_path / "g.db")
    chat = store.new_chat(store.add_character(load_character(None)))
    store.set_default_settings({"temperature": 0.3, "persona": "A bard's apprentice.", "max_context": 512})
    store.set_settings(chat, {"temperature": 0.5, "top_p": float("nan"), "stop": "not a list"})
    s = ChatSession(store, lm, chat, {"max_new_tokens": 7})
    assert (s.settings["temperature"], s.settings["top_p"], s.settings["max_new_tokens"]) == (0.5, 0.9, 7)
    assert s.settings["persona"] == "A bard's apprentice." and s.settings["stop"] == [] and s.context == 512
    assert s.ignored == ["stop", "top_p"]
    assert "\nA bard's apprentice.<|im_end|>\n" in s.prompt().text  # the persona closes the story
    # the format: the card's (its extensions), under the chat's, under the command line's
    card = load_character(None)
    card.extensions["galatea"] = {"format": "metharme"}
    chat = store.new_chat(store.add_character(card))
    assert ChatSession(store, lm, chat).prompt().format == "metharme"
    store.set_settings(chat, {"format": "auto"})  # a chat saved at auto follows its card
    assert ChatSession(store, lm, chat).prompt().format == "metharme"
    store.set_settings(chat, {"format": "alpaca"})
    assert ChatSession(store, lm, chat).prompt().format == "alpaca"
    assert ChatSession(store, lm, chat, {"format": "pygmalion"}).prompt().text.startswith("Aria's Persona:")
    store.set_settings(chat, {"format": "chatgpt"})
    assert ChatSession(store, lm, chat).ignored == ["format"]
    assert parse("format", "ChatML") == "chatml"
    with pytest.raises(Exception, match="not a prompt format; one of auto, template, pygmalion"):
        parse("format", "gpt")
    assert parse("stop", "Ann:|\\n\\n") == ["Ann:", "\n\n"] and parse("persona", "-") == ""
    assert parse("max_context", "2048") == 2048 and parse("temperature", "0.8") == 0.8
    with pytest.raises(Exception, match="not a finite number"):
        parse("temperature", "inf")
