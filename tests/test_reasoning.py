"""Reasoning models in persona chat (issue 25, point 5): thinking is off in chat unless a chat
turns it on (Qwen3's template gets `enable_thinking`), a `<think>` block the model writes is kept
apart from its reply - streamed to the page as reasoning, stored beside the reply, shown folded,
and never put back into the next prompt (SillyTavern's handling)."""

from __future__ import annotations

from pathlib import Path

import pytest

from galatea.chat.cards import load_character
from galatea.chat.reasoning import ThinkSplitter
from galatea.chat.session import ChatSession
from galatea.chat.store import Store
from galatea.engine.generate import Chunk
from tests.test_formats import with_template

QWEN3 = (Path(__file__).parent / "data" / "templates" / "qwen3.jinja").read_text()
WRITTEN = "<think>\nShe asked my name. I should be warm.\n</think>\n\nI am Aria, the bard of the marsh."


def split_in_pieces(text: str, size: int, opened: bool = False) -> tuple[str, str]:
    s = ThinkSplitter(opened)
    reply = thought = ""
    for i in range(0, len(text), size):
        r, t = s.feed(text[i : i + size])
        reply, thought = reply + r, thought + t
    r, t = s.flush()
    return reply + r, thought + t


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_a_think_block_is_told_apart_however_the_text_arrives(size):
    assert split_in_pieces(WRITTEN, size) == ("I am Aria, the bard of the marsh.",
                                              "\nShe asked my name. I should be warm.\n")
    assert split_in_pieces("Hello <think>not at the start</think>", size) == (
        "Hello <think>not at the start</think>", "")
    assert split_in_pieces("<thinking is fun>", size) == ("<thinking is fun>", "")
    # the template opened the block in the prompt; the model never closed it (ran out of tokens)
    assert split_in_pieces("still pondering </thi", size, opened=True) == ("", "still pondering </thi")
    assert split_in_pieces("x</think>Reply", size, opened=True) == ("Reply", "x")


class Scripted:
    """A model that writes `text` in small pieces, and remembers the prompts it was given."""

    def __init__(self, tokenizer, text: str) -> None:
        self.tokenizer, self.text, self.prompts = tokenizer, text, []

    def __call__(self, ids, params, cancel, progress):
        self.prompts.append(self.tokenizer.decode(ids))
        for i in range(0, len(self.text), 4):
            yield Chunk(self.text[i : i + 4], None)
        yield Chunk("", None, finish_reason="stop", prompt_tokens=len(ids), generated_tokens=20)


@pytest.fixture
def qwen_chat(tmp_path, embedded_lm, smol_tok):
    """A chat whose model has Qwen3's template (the embedded model's tokenizer carrying it)."""
    tok = with_template(smol_tok, QWEN3, bos="<|endoftext|>", eos="<|im_end|>")
    store = Store(tmp_path / "g.db")
    chat = store.new_chat(store.add_character(load_character(None)))
    lm = type(embedded_lm)(**{**embedded_lm.__dict__, "tokenizer": tok})
    model = Scripted(tok, WRITTEN)
    return ChatSession(store, lm, chat, generate=model), model


def test_thinking_is_off_in_chat_until_the_chat_turns_it_on(qwen_chat):
    session, model = qwen_chat
    "".join(session.send("Who are you?"))
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    session.settings["thinking"] = True
    "".join(session.regenerate())
    assert model.prompts[-1].endswith("<|im_start|>assistant\n")


def test_the_reasoning_is_stored_apart_and_never_fed_back(qwen_chat):
    session, model = qwen_chat
    thoughts: list[str] = []
    session.thinking = thoughts.append
    shown = "".join(session.send("Who are you?"))
    assert shown == "I am Aria, the bard of the marsh." and "".join(thoughts).strip().startswith("She asked")
    reply = session.messages()[-1]
    assert reply.text == "I am Aria, the bard of the marsh."
    assert reply.swipes[0].extra == {"reasoning": "She asked my name. I should be warm."}
    "".join(session.send("And your lute?"))
    assert "I should be warm" not in model.prompts[-1] and "I am Aria, the bard of the marsh." in model.prompts[-1]
    "".join(session.regenerate())  # a swipe keeps its own reasoning too
    assert session.messages()[-1].swipes[-1].extra["reasoning"].startswith("She asked")
