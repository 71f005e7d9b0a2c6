"""Recall (issue 27, point 5): once a chat outgrows the window, the old messages that match the
newest user message come back as a "Past events:" block. The ranking is the databases' own
full-text search (SQLite FTS5, PostgreSQL text search), tested on both; the prompt is the real
one of a 300-message chat on the embedded model's tokenizer; the page's prompt view says what was
recalled and why."""

from __future__ import annotations

import json

import httpx
import pytest

from galatea.chat.cards import load_character
from galatea.chat.recall import matched, query_terms
from galatea.chat.session import ChatSession
from galatea.chat.store import Store
from tests.helpers import Server
from tests.test_store import location, store  # noqa: F401  (SQLite and PostgreSQL)

FACT = "By the way, my sister's name is Marguerite and she keeps bees on the hill above Valtoria."
QUESTION = "Remind me, what is my sister called, and what does she keep on that hill?"


def test_the_newest_message_is_searched_for_its_telling_words():
    assert query_terms(QUESTION) == ["remind", "sister", "called", "keep", "hill"]
    assert matched(["sister", "keeping", "hill"], FACT) == ["sister", "keeping", "hill"]  # 'keeps': one stem
    assert query_terms("Is it? Yes, it is, 42.") == []


def test_recall_ranks_a_chats_messages_by_full_text_search(store):  # noqa: F811
    cid = store.add_character(load_character("aria"))
    chat, other = store.new_chat(cid), store.new_chat(cid)
    bees = store.add_message(chat, True, "You", FACT)
    hill = store.add_message(chat, False, "Aria", "The hill above the river is windy in spring.")
    store.add_message(chat, True, "You", "We went fishing at the lake yesterday.")
    store.add_message(other, True, "You", "My sister keeps bees too.")  # another chat: never recalled here
    assert store.recall(chat, query_terms(QUESTION)) == [bees, hill]  # two terms beat one
    store.edit_message(bees, "I have a brother who sails.")  # the index follows edits ...
    assert store.recall(chat, query_terms(QUESTION)) == [hill]
    swiped = store.add_swipe(hill, "Shall I sing?")  # ... and the swipe shown
    assert swiped and store.recall(chat, query_terms(QUESTION)) == []
    store.delete_message(hill)
    assert store.recall(chat, ["hill"]) == [] and store.recall(chat, []) == []


def test_an_older_sqlite_library_is_indexed_when_it_opens(tmp_path):
    path = tmp_path / "galatea.db"
    s = Store(path)
    cid = s.add_character(load_character("aria"))
    chat = s.new_chat(cid)
    bees = s.add_message(chat, True, "You", FACT)
    with s._write() as db:  # as version 1 left it: no index
        for name in ("swipes_fts_insert", "swipes_fts_delete", "swipes_fts_update"):
            db.execute(f"DROP TRIGGER {name}")
        db.execute("DROP TABLE swipes_fts")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    s.close()
    s = Store(path)
    assert s.schema_version() == 2 and s.recall(chat, ["sister"]) == [bees]


def long_chat(library: Store) -> int:
    """Aria's greeting (message 1), then 299 more: the user states the fact in message 5, small
    talk follows."""
    chat = library.new_chat(library.add_character(load_character("aria")))
    lines = [(True, "Hello Aria!"), (False, "Hello there, traveller. Sit by the fire."),
             (True, "Thank you. What a cold night."), (True, FACT)]
    topics = ["the weather over the marsh", "the price of bread in town", "a song about the sea", "the old mill",
              "your lute's broken string", "the road to the capital", "Pip the ferret's mischief"]
    for i in range(len(lines), 299):
        user = i % 2 == 0
        lines.append((user, f"Tell me more about {topics[i % len(topics)]}, please." if user else
                      f"Ah, {topics[(i - 1) % len(topics)]}! It is a long story, and a good one, I promise."))
    for user, text in lines:
        library.add_message(chat, user, "You" if user else "Aria", text)
    return chat


@pytest.mark.slow
def test_a_fact_out_of_the_window_comes_back_when_asked_about(tmp_path, embedded_lm, capsys):
    s = Store(tmp_path / "galatea.db")
    chat = long_chat(s)
    session = ChatSession(s, embedded_lm, chat, {"max_context": 1024, "max_new_tokens": 100})
    p = session.prompt(QUESTION)
    assert p.messages_dropped > 10 and p.text.count(FACT) == 1  # out of the window, back once
    assert p.recalled == [4]  # message 5, out of the window, and nothing the window still holds
    assert f"Past events:\nYou: {FACT}" in p.text and p.text.index("Past events:") < p.text.index(QUESTION)
    assert p.tokens <= 1024 - 100
    assert session.recalled(p) == [(5, ["sister", "keep", "hill"])]
    # a question about what the window still holds brings nothing back twice
    recent = session.prompt("And Pip the ferret's mischief?")
    assert all(i < recent.messages_dropped for i in recent.recalled)
    assert "Marguerite" not in recent.text
    # Pygmalion's layout: after the persona and scenario, before <START>
    pyg = ChatSession(s, embedded_lm, chat, {"max_context": 1024, "max_new_tokens": 100, "format": "pygmalion"})
    text = pyg.prompt(QUESTION).text
    assert f"\nPast events:\nYou: {FACT}\n<START>\n" in text and text.index("Scenario:") < text.index("Past events:")
    # `galatea prompt --chat` shows the same
    from galatea.cli import main

    assert main(["prompt", "--chat", str(chat), "--message", QUESTION, "--max-context", "1024", "--max-new-tokens",
                 "100", "--json", "--data-dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recalled"] == [4] and FACT in shown["prompt"]
    # off: recall_tokens 0
    off = ChatSession(s, embedded_lm, chat, {"max_context": 1024, "max_new_tokens": 100, "recall_tokens": 0})
    assert off.prompt(QUESTION).recalled == [] and "Marguerite" not in off.prompt(QUESTION).text


@pytest.mark.server
def test_the_pages_prompt_view_says_what_was_recalled_and_why(tmp_path):
    s = Store(tmp_path / "galatea.db")
    chat = long_chat(s)
    s.add_message(chat, True, "You", QUESTION)
    s.close()
    server = Server(tmp_path)
    try:
        httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"max_context": 1024}, timeout=10)
        p = httpx.get(f"{server.url}/galatea/chats/{chat}/prompt", timeout=60).json()
        assert p["recalled"] == [{"number": 5, "matched": ["sister", "keep", "hill"]}], p["recalled"]
        assert "Marguerite" in p["prompt"]
        bad = httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"recall_tokens": -1}, timeout=10)
        assert bad.status_code == 400
    finally:
        log = server.stop()
    assert "Traceback" not in log
