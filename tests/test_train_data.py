"""Training datasets: the examples are the inference prompt plus the reply, and only the reply
and EOS carry loss. Checked against `galatea prompt` (the inference path) and the reference
tokenizer library (sentencepiece on the LLaMA tokenizer.model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from galatea.chat.cards import from_object
from galatea.chat.store import Store
from galatea.cli import main
from galatea.model.checkpoint import load_tokenizer
from galatea.train.data import IGNORE, encode_example, labels_for, read_jsonl
from tests import persona_data
from tests.checkpoints import hf_model, write_safetensors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny LLaMA with the LLaMA tokenizer and a 256-token context."""
    return write_safetensors(hf_model("gqa"), tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def brine(tmp_path_factory) -> tuple[Path, list[Path]]:
    return persona_data.write(tmp_path_factory.mktemp("brine"))


def build(*args: str) -> None:
    assert main(["train", "data", "build", *args]) == 0


def galatea(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "galatea", *args], capture_output=True, text=True, timeout=300, **kw)


def test_loss_covers_exactly_the_reply_and_eos(base, brine, tmp_path):
    import sentencepiece

    card, chats = brine
    out = tmp_path / "d.jsonl"
    build(*map(str, chats), "--character", str(card), "--model", str(base), "--out", str(out))
    rows = read_jsonl(out)
    assert len(rows) == len(persona_data.EXCHANGES)  # one per reply; the greeting is not a reply
    tok = load_tokenizer(base)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))  # the reference library

    def ref(text: str) -> list[int]:
        return [1, *spm.encode(text)]  # LLaMA: BOS, then SentencePiece
    for r in rows:
        assert r["prompt"].endswith("\nCaptain Brine:")
        assert r["generation"].startswith(" " + persona_data.CATCHPHRASE)
        ids, n_prompt = encode_example(tok, r["prompt"], r["generation"])
        labels = labels_for(ids, n_prompt)
        assert ids[:n_prompt] == ref(r["prompt"])  # BOS + the prompt, as read at inference
        target = [v for v in labels if v != IGNORE]
        assert target == ids[n_prompt:] and target[-1] == 2  # the reply's tokens, then EOS (id 2, not "</s>" text)
        assert spm.decode(target[:-1]) == r["generation"].strip()
        assert ids == [*ref(r["prompt"] + r["generation"]), 2]  # the joint encoding, then EOS
        assert labels[n_prompt - 1] == ids[n_prompt]  # the position reading "Captain Brine:" predicts the reply
        assert all(v == IGNORE for v in labels[: n_prompt - 1])
        assert r["prompt_tokens"] == n_prompt and r["target_tokens"] == len(target)


def test_prompt_is_what_galatea_prompt_sends_with_the_window(base, tmp_path):
    """A saved chat, built with a small context so old turns drop out: each example's prompt
    equals `galatea prompt --chat` for the chat cut just before that reply, with the reply's
    length as the budget (and no recall block: examples are built from the window alone)."""
    data_dir = tmp_path / "data"
    store = Store.open_default(data_dir)
    cid = store.add_character(from_object(persona_data.CARD))
    chat = store.new_chat(cid)
    for user, reply in persona_data.EXCHANGES[:8]:
        store.add_message(chat, True, "You", user)
        store.add_message(chat, False, "Captain Brine", f"{persona_data.CATCHPHRASE} {reply}")
    out = tmp_path / "d.jsonl"
    build("--chat", str(chat), "--data-dir", str(data_dir), "--model", str(base), "--context", "150",
          "--val-fraction", "0", "--out", str(out))
    rows = read_jsonl(out)
    assert len(rows) == 8 and all(r["split"] == "train" for r in rows)
    assert rows[-1]["messages_dropped"] > 0  # the window slid
    # Cut the chat back message by message and compare with the inference path at each reply.
    for r in reversed(rows):
        last = store.messages(chat)[-1]
        assert not last.is_user and " " + last.text == r["generation"]
        store.delete_message(last.id)
        p = galatea("prompt", "--chat", str(chat), "--model", str(base), "--max-context", "150",
                    "-n", str(r["target_tokens"]), "--recall-tokens", "0", "--json", "--data-dir", str(data_dir))
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        assert info["prompt"] == r["prompt"]
        assert info["messages_dropped"] == r["messages_dropped"]
        assert info["tokens"] + r["target_tokens"] <= 150
        store.delete_message(store.messages(chat)[-1].id)  # the user line
    store.close()


def test_sources_dedup_split_and_stats(base, brine, tmp_path):
    card, chats = brine
    # text-generation-webui history of the first chat, and PygmalionAI-style lines (input/output)
    tgw = tmp_path / "history.json"
    pairs = [["<|BEGIN-VISIBLE-CHAT|>", "Ahoy there, landlubber."]] + [
        [u, f"{persona_data.CATCHPHRASE} {r}"] for u, r in persona_data.EXCHANGES[:3]]
    tgw.write_text(json.dumps({"internal": pairs, "visible": pairs}))
    pyg = tmp_path / "pyg.jsonl"
    pyg.write_text("\n".join(json.dumps({"input": f"Bob's Persona: a cook.\n<START>\nYou: Hi {i}\nBob:",
                                         "output": f" Hello {i}!"}) for i in range(5)))
    out = tmp_path / "d.jsonl"
    # chat00 twice and the history (the same three exchanges): 6 duplicates of 3 examples
    build(str(chats[0]), str(chats[0]), str(tgw), *map(str, chats[1:4]), str(pyg), "--character", str(card),
          "--model", str(base), "--out", str(out), "--val-fraction", "0.25", "--seed", "3")
    rows = read_jsonl(out)
    assert len(rows) == 12 + 5
    assert sum(r["split"] == "validation" for r in rows) == round(17 * 0.25)
    assert {r["generation"] for r in rows if r["source"].startswith("pyg.jsonl")} == {f" Hello {i}!" for i in range(5)}
    # the split depends on the seed and the examples only, not on the order of the sources
    again = tmp_path / "again.jsonl"
    build(str(pyg), *map(str, reversed(chats[:4])), "--character", str(card), "--model", str(base),
          "--out", str(again), "--val-fraction", "0.25", "--seed", "3")
    split = {(r["prompt"], r["generation"]): r["split"] for r in rows}
    assert {(r["prompt"], r["generation"]): r["split"] for r in read_jsonl(again)} == split

    p = galatea("train", "data", "stats", str(out), "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    tok = load_tokenizer(base)
    lengths = [len(encode_example(tok, r["prompt"], r["generation"])[0]) for r in rows]
    assert info["examples"] == 17 and info["splits"]["validation"] == 4
    assert info["total_tokens"]["max"] == max(lengths) and info["total_tokens"]["total"] == sum(lengths)
    assert info["history"]["messages_dropped"] == 0
    p = galatea("train", "data", "stats", str(out))
    assert "examples        17 (13 train, 4 validation)" in p.stdout and "history dropped 0 messages" in p.stdout


def test_bad_inputs_are_one_line_errors(base, brine, tmp_path):
    card, chats = brine
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_replies = tmp_path / "silent.jsonl"
    no_replies.write_text("\n".join(json.dumps(x) for x in [
        {"user_name": "You", "character_name": "Captain Brine"}, {"name": "You", "is_user": True, "mes": "Hello?"}]))
    long_pyg = tmp_path / "long.jsonl"
    long_pyg.write_text(json.dumps({"prompt": "word " * 400, "generation": " hi"}))
    big_card = tmp_path / "big.json"
    big_card.write_text(json.dumps({**persona_data.CARD, "data": {**persona_data.CARD["data"],
                                                                  "description": "salt " * 300}}))
    out = str(tmp_path / "o.jsonl")
    m = ["--model", str(base), "--out", out]
    cases = [
        (["train", "data", "build", str(empty), *m], "the file is empty"),
        (["train", "data", "build", str(no_replies), "--character", str(card), *m], "no character reply"),
        (["train", "data", "build", str(chats[0]), *m], "pass --character"),
        (["train", "data", "build", str(long_pyg), *m], "more than the context of 256"),
        (["train", "data", "build", str(chats[0]), "--character", str(big_card), *m], "--skip-long"),
        (["train", "data", "build", str(tmp_path / "missing.jsonl"), *m], "no such file"),
        (["train", "data", "stats", str(empty)], "the dataset is empty"),
        (["train", "--model", str(base), "--data", str(empty), "--out", str(tmp_path / "run")], "the dataset is empty"),
    ]
    for argv, needle in cases:
        p = galatea(*argv)
        assert p.returncode == 2, (argv, p.stdout, p.stderr)
        assert needle in p.stderr and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    # --skip-long leaves the long replies out instead, and says so
    p = galatea("train", "data", "build", str(long_pyg), str(chats[0]), "--character", str(card), "--skip-long", *m)
    assert p.returncode == 0 and "1 too long skipped" in p.stderr
    assert len(read_jsonl(Path(out))) == 3


def test_examples_in_other_prompt_formats(base, brine, tmp_path):
    """`--format chatml` on the LLaMA vocabulary: the prompt is the one `galatea prompt --format
    chatml` sends, the reply ends with the format's `<|im_end|>` (text: not this tokenizer's EOS),
    then EOS. On SmolLM2, whose EOS *is* `<|im_end|>`, the reply is followed by that EOS id alone."""
    from galatea.chat import formats
    from galatea.chat.prompt import Turn
    from galatea.model.checkpoint import embedded_model_path
    from galatea.train.data import Conversation, conversation_examples

    card, chats = brine
    out = tmp_path / "d.jsonl"
    build(*map(str, chats), "--character", str(card), "--model", str(base), "--out", str(out), "--format", "chatml")
    rows = read_jsonl(out)
    tok = load_tokenizer(base)
    for r in rows:
        assert r["prompt"].startswith("<|im_start|>system\n") and r["prompt"].endswith("<|im_start|>assistant\n")
        assert r["generation"].startswith(persona_data.CATCHPHRASE) and r["generation"].endswith("<|im_end|>")
        ids, n_prompt = encode_example(tok, r["prompt"], r["generation"])
        assert ids[-1] == 2 and ids[:n_prompt] == tok.encode(r["prompt"])
    char = from_object(json.loads(card.read_text()), where="card")
    conv = Conversation(char, [Turn(True, "Hello?"), Turn(False, "Ahoy there.")], "test")
    smol = load_tokenizer(embedded_model_path())
    (example,), _ = conversation_examples(conv, smol, 2048, fmt=formats.choose("auto", smol))
    assert example.generation == "Ahoy there." and example.prompt.endswith("<|im_start|>assistant\n")
    ids, n_prompt = encode_example(smol, example.prompt, example.generation)
    assert smol.decode(ids[n_prompt:]) == "Ahoy there.<|im_end|>"  # the template's end, as its EOS id
