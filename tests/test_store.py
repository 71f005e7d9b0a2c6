"""The chat store on a real SQLite file and on a real PostgreSQL server (the same tests on
both): every operation, kills mid-write, concurrent writers, and chat files of other front ends."""

from __future__ import annotations

import json
import multiprocessing
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from galatea.chat import chatfiles
from galatea.chat.cards import Character
from galatea.chat.store import Store
from galatea.errors import GalateaError
from tests.checkpoints import ROOT


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a store lives: an SQLite file, or a new database on the session's PostgreSQL."""
    return str(tmp_path / "galatea.db") if request.param == "sqlite" else request.getfixturevalue("postgres").database()


@pytest.fixture
def store(location):
    s = Store(location)
    yield s
    s.close()


@pytest.fixture
def char_id(store):
    return store.add_character(Character(name="Mira", description="A witch.", first_mes="Welcome.",
                                         alternate_greetings=["Oh, hi."]))


def texts(store, chat_id):
    return [(m.is_user, m.text) for m in store.messages(chat_id)]


def test_new_chat_starts_with_the_greeting_and_its_swipes(store, char_id):
    chat = store.new_chat(char_id)
    [greeting] = store.messages(chat)
    assert not greeting.is_user and greeting.text == "Welcome."
    assert [s.text for s in greeting.swipes] == ["Welcome.", "Oh, hi."]
    assert store.swipe(greeting.id, +1) == 1 and store.messages(chat)[0].text == "Oh, hi."
    assert store.swipe(greeting.id, +5) == 1  # clamped


def test_send_regenerate_swipe_edit_delete_undo(store, char_id):
    chat = store.new_chat(char_id)
    store.add_message(chat, True, "You", "Hello")
    reply = store.add_message(chat, False, "Mira", "First reply.", seed=1, gen_started=1.0, gen_finished=2.0)
    assert store.add_swipe(reply, "Second reply.", seed=2) == 1
    msgs = store.messages(chat)
    assert msgs[-1].text == "Second reply." and [s.seed for s in msgs[-1].swipes] == [1, 2]
    assert store.swipe(reply, -1) == 0 and store.messages(chat)[-1].text == "First reply."
    store.edit_message(reply, "Edited reply.")
    assert store.messages(chat)[-1].swipes[0].text == "Edited reply."
    assert store.messages(chat)[-1].swipes[1].text == "Second reply."
    store.append_to_message(reply, " And more.")
    assert store.messages(chat)[-1].text == "Edited reply. And more."
    store.add_message(chat, True, "You", "Again")
    store.add_message(chat, False, "Mira", "Reply two.")
    assert store.undo_last_exchange(chat) == 2
    assert texts(store, chat)[-1] == (False, "Edited reply. And more.")
    store.delete_message(store.messages(chat)[1].id)
    assert [t for _, t in texts(store, chat)] == ["Welcome.", "Edited reply. And more."]
    with pytest.raises(GalateaError, match="no message"):
        store.edit_message(999, "x")


def test_rename_branch_and_resume(store, char_id):
    chat = store.new_chat(char_id)
    store.add_message(chat, True, "You", "One")
    m = store.add_message(chat, False, "Mira", "Two")
    store.add_swipe(m, "Two again")
    store.add_message(chat, True, "You", "Three")
    store.rename_user(chat, "Ann")
    assert store.chat(chat).user_name == "Ann"
    assert {x.name for x in store.messages(chat) if x.is_user} == {"Ann"}
    branch = store.branch(chat, m)
    copied = store.messages(branch)
    assert [x.text for x in copied] == ["Welcome.", "One", "Two again"]
    assert len(copied[-1].swipes) == 2 and copied[-1].active == 1
    assert len(store.messages(chat)) == 4  # the original is untouched
    assert store.last_chat(char_id) == branch
    store.add_message(chat, True, "Ann", "Back here")
    assert store.last_chat(char_id) == chat


def test_deleting_a_character_deletes_its_chats(store, char_id):
    chat = store.new_chat(char_id)
    store.delete_character(char_id)
    with pytest.raises(GalateaError, match="no chat"):
        store.chat(chat)
    assert store.db.execute("SELECT count(*) FROM swipes").fetchone()[0] == 0


def test_character_lookup(store, char_id):
    assert store.character("mira")[0] == char_id and store.character(char_id)[1].name == "Mira"
    with pytest.raises(GalateaError, match="no character"):
        store.character("nobody")


WRITER = textwrap.dedent("""
    import sys
    from galatea.chat.store import Store
    from galatea.chat.cards import Character
    s = Store(sys.argv[1])
    cid = s.character("Mira")[0] if s.characters() else s.add_character(Character(name="Mira"))
    chat = s.new_chat(cid, greeting=False) if sys.argv[2] == "new" else int(sys.argv[2])
    print(chat, flush=True)
    for i in range(int(sys.argv[3])):
        m = s.add_message(chat, i % 2 == 0, "x", "message %d " % i + "y" * 2000)
        if i % 2:
            s.add_swipe(m, "swipe %d" % i)
        print(i, flush=True)  # acknowledged: committed
""")


def test_kill_mid_write_loses_nothing_acknowledged(location):
    for delay in (0.8, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, location, "new", "1000000"], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        chat = int(proc.stdout.readline())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        acknowledged = [int(line) for line in proc.stdout.read().split()]
        proc.wait()
        s = Store(location)  # it opens and works
        texts_ = [m.swipes[0].text for m in s.messages(chat)]
        assert len(acknowledged) > 5 and len(texts_) >= len(acknowledged)
        lost = [i for i in acknowledged if not texts_[i].startswith(f"message {i} ")]
        assert not lost, (lost[:5], [t[:20] for t in texts_[:5]])  # none lost
        # every message kept all of its parts: at least one swipe, and reply swipes came with it
        orphans = s.db.execute("SELECT count(*) FROM messages m WHERE NOT EXISTS "
                               "(SELECT 1 FROM swipes s WHERE s.message_id = m.id)").fetchone()[0]
        assert orphans == 0
        assert all(len(m.swipes) == (1 if m.is_user else 2) for m in s.messages(chat)[:-1])
        s.add_message(chat, True, "x", "after the kill")
        assert s.messages(chat)[-1].text == "after the kill"
        s.close()
    if not location.startswith("postgresql"):
        assert sqlite3.connect(location).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _write_many(db: str, chat: int, n: int) -> None:
    subprocess.run([sys.executable, "-c", WRITER, db, str(chat), str(n)], cwd=ROOT, check=True,
                   capture_output=True)


@pytest.mark.slow
def test_concurrent_writers_do_not_corrupt(location):
    s = Store(location)
    cid = s.add_character(Character(name="Mira"))
    chat = s.new_chat(cid, greeting=False)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_write_many, [(location, chat, 40)] * 4)
    msgs = s.messages(chat)
    assert len(msgs) == 160
    assert sorted(m.position for m in msgs) == list(range(160))
    assert all(len(m.swipes) == (1 if m.is_user else 2) for m in msgs)
    if not location.startswith("postgresql"):
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


ST_CHAT = "\n".join([
    json.dumps({"user_name": "Ann", "character_name": "Mira", "create_date": "2024-09-28@01h02m36s",
                "chat_metadata": {"note_prompt": ""}}),
    json.dumps({"name": "Mira", "is_user": False, "is_system": False, "send_date": "June 19, 2023 2:20pm",
                "mes": "Welcome.", "swipe_id": 0, "swipes": ["Welcome.", "Oh, hi."], "extra": {}}),
    json.dumps({"name": "Ann", "is_user": True, "is_system": False, "send_date": "June 19, 2023 2:21pm",
                "mes": "Hello there", "extra": {}}),
    "this line is broken {",
    json.dumps({"name": "Mira", "is_user": False, "send_date": "June 19, 2023 2:21pm", "mes": "Second",
                "swipe_id": 1, "swipes": ["First", "Second"],
                "swipe_info": [{"gen_started": "2023-06-19T14:21:00.000Z", "gen_finished": "2023-06-19T14:21:03.000Z",
                                "extra": {"api": "kobold"}}, {}],
                "gen_started": "2023-06-19T14:21:00.000Z", "extra": {"api": "kobold"}}),
])


def test_sillytavern_import_export_round_trip(store, char_id):
    chat = chatfiles.import_sillytavern(store, ST_CHAT, char_id)
    msgs = store.messages(chat)
    assert [(m.is_user, m.name, m.text) for m in msgs] == \
        [(False, "Mira", "Welcome."), (True, "Ann", "Hello there"), (False, "Mira", "Second")]
    assert msgs[2].active == 1 and msgs[2].swipes[0].gen_started == pytest.approx(1687184460.0)
    assert store.chat(chat).user_name == "Ann"
    exported = chatfiles.export_sillytavern(store, chat).splitlines()
    head = json.loads(exported[0])
    assert set(head) >= {"user_name", "character_name", "create_date", "chat_metadata"}
    lines = [json.loads(x) for x in exported[1:]]
    assert lines[2]["swipes"] == ["First", "Second"] and lines[2]["swipe_id"] == 1 and lines[2]["mes"] == "Second"
    assert lines[1]["is_user"] and "swipes" not in lines[1]
    again = chatfiles.import_sillytavern(store, "\n".join(exported), char_id)
    assert [(m.is_user, m.text, [s.text for s in m.swipes], m.active) for m in store.messages(again)] == \
        [(m.is_user, m.text, [s.text for s in m.swipes], m.active) for m in msgs]


def test_textgen_history_import_export(store, char_id):
    history = {"internal": [["<|BEGIN-VISIBLE-CHAT|>", "Welcome & hello."], ["Hi <3", "Hey."]],
               "visible": [["<|BEGIN-VISIBLE-CHAT|>", "Welcome &amp; hello."], ["Hi &lt;3", "Hey."]]}
    chat = chatfiles.import_textgen(store, json.dumps(history), char_id)
    assert texts(store, chat) == [(False, "Welcome & hello."), (True, "Hi <3"), (False, "Hey.")]
    out = json.loads(chatfiles.export_textgen(store, chat))
    assert out == history
    visible_only = chatfiles.import_textgen(store, json.dumps({"visible": history["visible"]}), char_id)
    assert texts(store, visible_only) == texts(store, chat)
    with pytest.raises(GalateaError, match="pairs"):
        chatfiles.import_textgen(store, json.dumps({"nothing": 1}), char_id)


def test_unusable_database_gives_a_clear_error(tmp_path):
    bad = tmp_path / "galatea.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(GalateaError, match="cannot open the chat database"):
        Store(bad)


def _snapshot(s: Store) -> dict:
    """Everything a user keeps in a store, by content (ids differ between stores)."""
    names = {cid: name for cid, name in s.characters()}
    chats = {c.id: c for c in s.chats()}
    return {
        "characters": sorted((name, json.dumps(s.character(cid)[1].to_v2(), sort_keys=True), s.character(cid)[1].image)
                             for cid, name in names.items()),
        "chats": sorted((names[c.character_id], c.title, c.user_name, json.dumps(c.settings, sort_keys=True),
                         round(c.created_at, 3),
                         tuple((m.is_user, m.name, m.active, round(m.created_at, 3),
                                tuple((w.text, w.seed, w.gen_started, w.gen_finished, json.dumps(w.extra))
                                      for w in m.swipes)) for m in s.messages(c.id)))
                        for c in chats.values()),
        "lorebooks": sorted((book.name, json.dumps(book.book, sort_keys=True),
                             tuple(sorted(names[c] for c in s.lorebook_links(lid)["characters"])),
                             tuple(sorted(chats[c].title for c in s.lorebook_links(lid)["chats"])))
                            for lid, book in s.lorebooks()),
        "presets": s.presets(), "defaults": s.default_settings(),
    }


def test_a_library_moves_to_postgresql_and_back_unchanged(postgres, tmp_path, capsys):
    from galatea.chat.lorebooks import Lorebook
    from galatea.cli import main

    src = Store(tmp_path / "a" / "galatea.db")
    mira = src.add_character(Character(name="Mira", description="A witch.", first_mes="Welcome.",
                                       alternate_greetings=["Oh, hi."], image=b"\x89PNG fake picture"))
    chat = src.new_chat(mira, user_name="Ann", title="Marsh talk")
    src.add_message(chat, True, "Ann", "Hi \u2603 there")
    reply = src.add_message(chat, False, "Mira", "Hello.", seed=7, gen_started=1.5, gen_finished=2.5,
                            extra={"api": "kobold"})
    src.add_swipe(reply, "Well met.", seed=8)
    src.set_settings(chat, {"temperature": 0.4, "stop": ["Ann:"]})
    other = chatfiles.import_sillytavern(src, ST_CHAT, mira)  # with its own old dates
    book = src.add_lorebook(Lorebook("Marsh", {"entries": [{"keys": ["marsh"], "content": "Wet."}]}))
    src.attach_lorebook(book, character_id=mira)
    src.attach_lorebook(book, chat_id=other)
    src.save_preset("Calm", {"temperature": 0.3})
    src.set_default_settings({"persona": "A traveller."})

    url = postgres.database()
    assert main(["store", "copy", url, "--data-dir", str(tmp_path / "a")]) == 0
    assert "copied 1 characters, 2 chats, 1 lorebooks, 1 presets" in capsys.readouterr().out
    assert main(["chats", "list", "--store", url]) == 0
    assert "Marsh talk" in capsys.readouterr().out
    back = tmp_path / "b.db"
    assert main(["store", "copy", str(back), "--store", url]) == 0
    expected = _snapshot(src)
    assert _snapshot(Store(url)) == expected
    assert _snapshot(Store(back)) == expected
    assert main(["store", "info", "--store", url]) == 0
    assert "1 characters, 2 chats, 1 lorebooks, 1 presets (schema 2)" in capsys.readouterr().out
    # the copies' full-text indexes hold what was copied: recall finds the shown swipe in each
    for copy in (Store(url), Store(back)):
        (marsh,) = [c.id for c in copy.chats() if c.title == "Marsh talk"]
        assert [m.text for m in copy.messages(marsh) if m.id in copy.recall(marsh, ["well", "met"])] == ["Well met."]
    assert "***" in Store(url.replace("galatea@", "galatea:secret@")).label  # no password in messages


def test_an_unreachable_postgresql_is_one_line(capsys):
    from galatea.cli import main
    from tests.helpers import free_port

    url = f"postgresql://galatea:hunter2@127.0.0.1:{free_port()}/chats"
    assert main(["chats", "list", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the chat database" in err and "--store" in err
    assert "hunter2" not in err
