"""The library beyond cards: SillyTavern world info as standalone lorebooks (read, attached,
used in the prompt, exported back), cards imported twice, chats renamed, deleted, searched and
imported with their own dates. Through the `galatea` command, as a user runs it."""

from __future__ import annotations

import json
from datetime import datetime

from galatea.chat.lorebooks import read_lorebook, to_world_info
from galatea.chat.store import Store
from galatea.cli import main
from tests.checkpoints import ROOT, shared_vocab

WORLD = ROOT / "tests" / "data" / "world-info-sillytavern.json"  # SillyTavern 1.12's world-info file layout


def test_sillytavern_world_info_maps_as_sillytavern_maps_it_and_goes_back_unchanged():
    """SillyTavern's own mapping between world info and a card's book (convertCharacterBook /
    convertWorldInfoToCharacterBook): key->keys, keysecondary->secondary_keys, order->
    insertion_order, disable->!enabled, position 0->before_char, the rest in extensions."""
    book = read_lorebook(WORLD.read_bytes(), name="Eldoria")
    assert book.name == "Eldoria" and len(book.entries) == 4
    first = book.entries[0]
    assert first["keys"] == ["eldoria", "wood", "forest"] and first["secondary_keys"] == []
    assert first["content"].startswith("{{char}} knows Eldoria") and first["comment"] == "eldoria"
    assert (first["insertion_order"], first["enabled"], first["position"], first["constant"]) == \
        (100, True, "before_char", False)
    assert first["extensions"]["depth"] == 4 and first["extensions"]["probability"] == 100
    assert book.entries[2]["constant"] and book.entries[2]["position"] == "after_char"
    assert not book.entries[3]["enabled"]

    original = json.loads(WORLD.read_text())["entries"]
    back = to_world_info(book)["entries"]
    for uid, entry in original.items():
        for field in ("key", "keysecondary", "comment", "content", "constant", "selective", "order", "position",
                      "disable", "depth", "probability", "useProbability", "group", "sticky", "cooldown"):
            assert back[uid][field] == entry[field], (uid, field)


def test_lorebooks_from_the_command_line_reach_the_prompt(capsys, tmp_path):
    data = ["--data-dir", str(tmp_path / "data")]
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({"name": "Mira", "description": "A witch of the marsh.", "first_mes": "Welcome."}))
    assert main(["characters", "import", str(card), *data]) == 0
    capsys.readouterr()
    assert main(["lorebooks", "import", str(WORLD), "--name", "Eldoria", *data]) == 0
    assert capsys.readouterr().out.split("\t")[1:] == ["Eldoria", "4 entries\n"]
    assert main(["lorebooks", "attach", "Eldoria", "--character", "Mira", *data]) == 0
    assert main(["lorebooks", "list", *data]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("Eldoria\t4 entries\tMira")

    store = Store(tmp_path / "data" / "galatea.db")
    chat = store.new_chat(1)
    store.add_message(chat, True, "You", "Is a shadowfang about tonight?")  # three back: past the scan depth
    store.add_message(chat, False, "Mira", "Old roads.")
    store.add_message(chat, True, "You", "What lies in the forest?")
    assert main(["prompt", "--chat", str(chat), "--model", str(shared_vocab()), *data]) == 0
    # SillyTavern's classic Pygmalion story string: "eldoria" (position 0, before the character;
    # its key "forest" is in the last two messages, the scan depth; {{char}} filled), the persona,
    # the constant "moon" (position 1, after); "shadowfang" (its keys only further back) and the
    # disabled entry stay out
    assert capsys.readouterr().out == (
        "Mira knows Eldoria as the Whispering Wood, where the three old roads meet.\n"
        "Mira's Persona: A witch of the marsh.\n"
        "Over Eldoria the moon is always full.\n"
        "<START>\n"
        "Mira: Welcome.\n"
        "You: Is a shadowfang about tonight?\n"
        "Mira: Old roads.\n"
        "You: What lies in the forest?\n"
        "Mira:\n")

    assert main(["lorebooks", "detach", "Eldoria", "--character", "Mira", *data]) == 0
    assert main(["lorebooks", "attach", "1", "--chat", str(chat), *data]) == 0
    out = tmp_path / "back.json"
    assert main(["lorebooks", "export", "Eldoria", str(out), *data]) == 0
    assert json.loads(out.read_text())["entries"]["1"]["keysecondary"] == ["night", "dark"]
    capsys.readouterr()
    assert main(["prompt", "--chat", str(chat), "--model", str(shared_vocab()), *data]) == 0
    assert "Whispering Wood" in capsys.readouterr().out  # attached to the chat now

    assert main(["lorebooks", "import", str(card), *data]) == 2  # a card without a book: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without a lorebook" in err
    assert main(["lorebooks", "delete", "Eldoria", *data]) == 2  # not a terminal: asks for --yes
    assert "--yes" in capsys.readouterr().err
    assert main(["lorebooks", "delete", "Eldoria", "--yes", *data]) == 0
    assert store.chat_lorebooks(chat) == []


def test_the_same_card_twice_is_one_character_and_chats_are_managed(capsys, tmp_path):
    data = ["--data-dir", str(tmp_path / "data")]
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({"name": "Mira", "description": "A witch of the marsh.", "first_mes": "Welcome."}))
    for _ in range(2):
        assert main(["characters", "import", str(card), *data]) == 0
    assert "already in the library" in capsys.readouterr().out
    assert main(["characters", "import", "--copy", str(card), *data]) == 0
    store = Store(tmp_path / "data" / "galatea.db")
    assert [name for _, name in store.characters()] == ["Mira", "Mira"]

    # a SillyTavern chat with its own dates, for another character than the one chosen
    st = tmp_path / "chat.jsonl"
    lines = [{"user_name": "You", "character_name": "Seraphina", "create_date": "2024-05-14@21h33m19s"},
             {"name": "Seraphina", "is_user": False, "send_date": "May 14, 2024 9:33pm", "mes": "*smiles* Hello."},
             {"name": "You", "is_user": True, "send_date": "2024-05-14T21:35:00.000Z", "mes": "Where is the glade?"}]
    st.write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["chats", "import", str(st), "--character", "1", *data]) == 0
    captured = capsys.readouterr()
    assert "with 'Seraphina', not 'Mira'" in captured.err and captured.err.count("\n") == 1
    chat = int(captured.out.split()[-1])
    first, second = store.messages(chat)
    assert first.created_at == datetime(2024, 5, 14, 21, 33).timestamp()
    assert second.created_at == datetime.fromisoformat("2024-05-14T21:35:00+00:00").timestamp()
    assert store.chat(chat).created_at == datetime(2024, 5, 14, 21, 33, 19).timestamp()

    assert main(["chats", "rename", str(chat), "The glade", *data]) == 0
    assert store.chat(chat).title == "The glade"
    assert main(["chats", "search", "GLADE", *data]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"chat {chat} #2: Where is the glade?"
    assert main(["chats", "search", "100%", *data]) == 0  # LIKE wildcards are plain text
    assert capsys.readouterr().out == ""
    assert main(["chats", "delete", str(chat), *data]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["chats", "delete", str(chat), "--yes", *data]) == 0
    assert chat not in [c.id for c in store.chats()]
