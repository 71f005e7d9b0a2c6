"""Golden prompts: exact strings for the Pygmalion layout, and the sliding window under the
LLaMA tokenizer (the one Pygmalion 7B uses)."""

from __future__ import annotations

import pytest

from galatea.chat.cards import Character
from galatea.chat.prompt import Turn, build_prompt, example_blocks, substitute
from galatea.errors import GalateaError
from galatea.model.checkpoint import load_tokenizer
from tests.checkpoints import shared_vocab


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(shared_vocab())


def test_model_card_format(tok):
    """Only a persona: exactly the Pygmalion 7B model card's example."""
    char = Character(name="Assistant", description="A helpful assistant.")
    history = [Turn(False, "Hello! How may I help you today?")]
    p = build_prompt(char, history, "What is Zork?", tok, 2048, 128)
    assert p.text == ("Assistant's Persona: A helpful assistant.\n"
                      "<START>\n"
                      "Assistant: Hello! How may I help you today?\n"
                      "You: What is Zork?\n"
                      "Assistant:")
    assert p.tokens == len(tok.encode(p.text)) and tok.encode(p.text)[0] == 1


def test_full_layout_with_macros_and_examples(tok):
    char = Character(
        name="Mira", description="{{char}} is a witch who teaches <USER> magic.",
        personality="sly, patient", scenario="{{User}} visits <bot>'s tower.",
        mes_example="<start>\n{{user}}: Hi\n{{char}}: Hello, {{user}}.\n<START>  \n\n"
                    "<START>\n<USER>: Teach me.\n<BOT>: Later.",
    )
    p = build_prompt(char, [Turn(True, " Hey "), Turn(False, "*waves*")], "Ready?", tok, 2048, 128, user="Ann")
    assert p.text == (
        "Mira's Persona: Mira is a witch who teaches Ann magic.\n"
        "Personality: sly, patient\n"
        "Scenario: Ann visits Mira's tower.\n"
        "<START>\nAnn: Hi\nMira: Hello, Ann.\n"
        "<START>\nAnn: Teach me.\nMira: Later.\n"
        "<START>\n"
        "Ann: Hey\n"
        "Mira: *waves*\n"
        "Ann: Ready?\n"
        "Mira:"
    )
    assert (p.examples_used, p.examples_dropped, p.messages_used, p.messages_dropped) == (2, 0, 3, 0)


def test_reply_without_new_message_ends_with_char_colon(tok):
    p = build_prompt(Character(name="Bo", description="x"), [Turn(True, "Hi")], None, tok, 2048, 16)
    assert p.text.endswith("You: Hi\nBo:") and not p.text.endswith(" ")


def test_example_blocks_split_case_insensitively():
    assert example_blocks("<START>\na\n<start>\n\nb\n<StArT>") == ["a", "b"]
    assert substitute("{{CHAR}} <Bot> {{user}} <USER>", "C", "U") == "C C U U"


def _long_chat(n: int) -> list[Turn]:
    return [Turn(i % 2 == 0, f"message number {i} with a few more words in it") for i in range(n)]


def test_window_drops_examples_first_then_oldest_messages(tok):
    char = Character(name="Ed", description="A clerk.",
                     mes_example="<START>\nYou: a\nEd: b\n<START>\nYou: c\nEd: d\n<START>\nYou: e\nEd: f")
    full = build_prompt(char, _long_chat(6), "new", tok, 4096, 64)
    budget = full.tokens - 5 + 64  # just too small for everything
    p = build_prompt(char, _long_chat(6), "new", tok, budget, 64)
    assert p.messages_dropped == 0 and p.examples_dropped >= 1  # examples go first, the last block first
    assert "You: a\nEd: b" in p.text and "You: e\nEd: f" not in p.text
    assert p.tokens + 64 <= budget

    long = build_prompt(char, _long_chat(40), "new", tok, 300, 64)
    assert long.examples_used == 0 and long.messages_dropped > 0
    assert long.tokens <= 300 - 64 and long.tokens == len(tok.encode(long.text))
    kept = long.text.split("<START>\n")[-1]
    first_kept = 40 - (long.messages_used - 1)
    assert kept.startswith(f"{'You' if first_kept % 2 == 0 else 'Ed'}: message number {first_kept} ")
    # the window is the tightest: one more message would not fit
    assert len(tok.encode(long.text.replace("<START>\n", "<START>\n" + ("You" if (first_kept - 1) % 2 == 0
               else "Ed") + f": message number {first_kept - 1} with a few more words in it\n"))) > 300 - 64


def test_window_never_cuts_a_message(tok):
    p = build_prompt(Character(name="Ed", description="A clerk."), _long_chat(30), "new", tok, 200, 32)
    for line in p.text.split("<START>\n")[-1].splitlines()[:-2]:
        assert line.endswith("with a few more words in it")


def test_too_long_persona_says_so(tok):
    char = Character(name="Ed", description="word " * 400)
    with pytest.raises(GalateaError, match="persona and the newest exchange need"):
        build_prompt(char, [], "hi", tok, 256, 64)


def test_lorebook_activation_and_budget(tok):
    book = {"entries": [
        {"keys": ["dragon"], "content": "Dragons sleep in the north.", "insertion_order": 5, "enabled": True},
        {"keys": ["sword"], "content": "The sword is cursed.", "insertion_order": 1, "enabled": True},
        {"keys": [], "content": "Magic is rare.", "constant": True, "insertion_order": 9},
        {"keys": ["castle"], "secondary_keys": ["king"], "selective": True, "content": "The king is away."},
        {"keys": ["dragon"], "content": "Disabled entry.", "enabled": False},
        {"keys": ["moon"], "content": "Not mentioned.", "enabled": True},
    ]}
    char = Character(name="Ed", description="A clerk.", character_book=book)
    p = build_prompt(char, [Turn(True, "I saw a Dragon near the castle")], "and my sword?", tok, 2048, 64)
    assert p.text.startswith("Ed's Persona: A clerk.\nThe sword is cursed.\nDragons sleep in the north.\n"
                             "Magic is rare.\n<START>\n")
    assert "king" not in p.text and "Disabled" not in p.text and "Not mentioned" not in p.text
    book["token_budget"] = len(tok.encode("Dragons sleep in the north.\n", add_bos=False))
    small = build_prompt(char, [Turn(True, "I saw a Dragon near the castle")], "and my sword?", tok, 2048, 64)
    assert len(small.lore_used) == 1  # the budget holds one entry


def test_system_prompt_persona_and_lore_places_follow_sillytavern(tok):
    """SillyTavern's classic Pygmalion story string, written out by hand: `{{system}}`,
    `{{wiBefore}}`, `{{char}}'s Persona: {{description}}`, `Scenario:`, `{{wiAfter}}`, `{{persona}}`,
    each on its own line when set, then `<START>`. Entries without a position go after."""
    book = {"entries": [
        {"keys": ["tower"], "content": "Before: the tower is old.", "position": "before_char", "insertion_order": 1},
        {"keys": ["tower"], "content": "After: the tower is tall.", "position": "after_char", "insertion_order": 2},
        {"keys": ["tower"], "content": "Unplaced: the tower leans.", "insertion_order": 3},
    ]}
    char = Character(name="Ed", description="A clerk.", scenario="A rainy day.", system_prompt="Write as {{char}}.",
                     character_book=book)
    p = build_prompt(char, [], "The tower?", tok, 2048, 64, user="Ann", persona="{{user}} is a knight.")
    assert p.text == ("Write as Ed.\nBefore: the tower is old.\nEd's Persona: A clerk.\nScenario: A rainy day.\n"
                      "After: the tower is tall.\nUnplaced: the tower leans.\nAnn is a knight.\n<START>\n"
                      "Ann: The tower?\nEd:")
    override = build_prompt(char, [], "Hi", tok, 2048, 64, system="{{original}} Stay in character.")
    assert override.text.startswith("Write as Ed. Stay in character.\nEd's Persona: A clerk.\n")
