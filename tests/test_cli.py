"""The `galatea` command, run as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from galatea.cli import main
from tests.checkpoints import ROOT, shared_vocab

PROMPT = "Aria's Persona: A cheerful bard.\n<START>\nYou: Hello! Who are you?\nAria:"


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tokenize_vocab_only_gguf(capsys):
    # ids as llama.cpp / SentencePiece give them for LLaMA, BOS first
    assert run_json(capsys, "tokenize", "--model", str(shared_vocab()), "Hello world") == {"ids": [1, 15043, 3186]}
    assert run_json(capsys, "tokenize", "--no-bos", "--model", str(shared_vocab()), " Hello") == \
        {"ids": [29871, 15043]}


def test_generate_json_greedy_is_reproducible(capsys):
    args = ["generate", "--json", "--temperature", "0", "-n", "12", "--ban-eos", PROMPT]
    assert main(args) == 0
    captured = capsys.readouterr()
    first = json.loads(captured.out)
    assert captured.err.count("using the embedded default") == 1  # the fallback is announced once
    second = run_json(capsys, *args)
    assert first["text"] == second["text"] and first["text"].strip()
    assert first["tokens"] == 12 and first["finish_reason"] == "length"
    assert first["prompt_tokens"] > 10 and first["prefill_tok_s"] > 0 and first["decode_tok_s"] > 0
    assert set(first) >= {"text", "tokens", "finish_reason", "prompt_tokens", "prefill_tok_s", "decode_tok_s"}


def test_generate_seed_reproduces_sampling(capsys):
    args = ["generate", "--json", "--seed", "42", "--temperature", "1.0", "-n", "10", "--ban-eos", PROMPT]
    assert run_json(capsys, *args)["text"] == run_json(capsys, *args)["text"]


def test_generate_streams_to_stdout_and_stops(capsys):
    assert main(["generate", "--temperature", "0", "-n", "40", "--stop", "\\n", PROMPT]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and "\n" not in out[:-1]  # stopped at the first newline, which is cut


def test_inspect_embedded(capsys):
    assert main(["inspect", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["layers"] == 30 and info["kv_heads"] == 3
    assert info["attention_heads"] == 9 and info["vocab_size"] == 49152 and info["tied_embeddings"]
    assert info["tensor_types"]["Q4_1"] == 210 and 130e6 < info["parameters"] < 140e6
    assert info["tokenizer"].startswith("bpe")


def test_inspect_vocab_only(capsys):
    assert main(["inspect", str(shared_vocab())]) == 0
    out = capsys.readouterr().out
    assert "vocabulary only" in out and "sentencepiece" in out


def test_bench_small(capsys):
    result = run_json(capsys, "bench", "--prompt-tokens", "32", "--gen-tokens", "4")
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0 and result["quant"] == "int4"


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "galatea", "tokenize", "--model", str(shared_vocab()), "<START>"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ids"][0] == 1


def test_prompt_for_the_bundled_character(capsys):
    assert main(["prompt", "--model", str(shared_vocab()), "--message", "Hi there!"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Aria's Persona: Aria is a cheerful travelling bard")
    assert text.endswith("<START>\nAria: *Aria looks up from tuning her lute and gives you a bright smile.* "
                         "Well met, traveller! Come, sit by the fire. Pip and I were just wondering who would "
                         "walk in out of the rain tonight.\nYou: Hi there!\nAria:\n")


def test_prompt_json_reports_the_window(capsys):
    out = run_json(capsys, "prompt", "--json", "--model", str(shared_vocab()), "--max-context", "420",
                   "-n", "100", "--message", "Tell me about the inn")
    assert out["context"] == 420 and out["tokens"] <= 320
    assert out["examples_dropped"] >= 1 and out["messages_dropped"] == 0
    assert "inn" in out["lore_used"] and out["prompt"].endswith("You: Tell me about the inn\nAria:")


def test_characters_and_chats_commands(capsys, tmp_path):
    from galatea.chat.store import Store

    data = ["--data-dir", str(tmp_path / "data")]
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({"char_name": "Mira", "char_persona": "A witch.", "char_greeting": "Welcome."}))
    assert main(["characters", "import", str(card), *data]) == 0
    out = capsys.readouterr().out
    assert "Mira" in out and "(gradio from mira.json)" in out
    assert main(["characters", "list", *data]) == 0
    assert capsys.readouterr().out.split() == ["1", "Mira"]
    assert main(["characters", "show", "mira", *data]) == 0
    assert json.loads(capsys.readouterr().out)["description"] == "A witch."
    png = tmp_path / "mira.png"
    assert main(["characters", "export", "Mira", str(png), *data]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")

    store = Store(tmp_path / "data" / "galatea.db")
    chat = store.new_chat(1)
    store.add_message(chat, True, "You", "Hi!")
    store.add_message(chat, False, "Mira", "Hello.")
    capsys.readouterr()
    assert main(["chats", "list", *data]) == 0
    assert "Mira\t3 messages" in capsys.readouterr().out
    assert main(["chats", "show", str(chat), *data]) == 0
    assert capsys.readouterr().out.splitlines() == ["#1 Mira: Welcome.", "#2 You: Hi!", "#3 Mira: Hello."]
    st = tmp_path / "chat.jsonl"
    tg = tmp_path / "history.json"
    assert main(["chats", "export", str(chat), str(st), *data]) == 0
    assert main(["chats", "export", str(chat), str(tg), *data]) == 0
    assert main(["chats", "import", str(st), "--character", "Mira", *data]) == 0
    assert main(["chats", "import", str(tg), "--character", "Mira", *data]) == 0
    capsys.readouterr()
    for imported in (chat + 1, chat + 2):
        assert [m.text for m in store.messages(imported)] == ["Welcome.", "Hi!", "Hello."]
    assert main(["prompt", "--chat", str(chat), "--message", "Bye", "--model", str(shared_vocab()), *data]) == 0
    assert capsys.readouterr().out.endswith("Mira: Hello.\nYou: Bye\nMira:\n")
    assert main(["characters", "delete", "Mira", "--yes", *data]) == 0
    assert main(["chats", "show", str(chat), *data]) == 2
    assert "no chat" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_suite_reports_every_scenario(capsys):
    assert main(["bench", "--suite", "--context", "512", "--prompt-tokens", "64", "--gen-tokens", "8"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    g = result["galatea"]
    for key in ("load_s", "peak_rss_mb", "prefill_tok_s", "decode_tok_s", "ttft_recompute_s", "ttft_shift_s",
                "streams_1_tok_s", "streams_4_tok_s", "streams_8_tok_s"):
        assert g[key] > 0, key
    assert g["shifted_tokens"] > 100 and g["new_tokens"] < 60  # the window slid: the survivors were moved
    assert g["ttft_shift_s"] < g["ttft_recompute_s"]
    assert "8 streams, aggregate (tok/s)" in captured.err  # the table
    assert "bench: a new chat turn" in captured.err  # it says what it measures while it runs
    llama = result["llama.cpp"]
    if importlib.util.find_spec("llama_cpp") is not None:
        assert llama["decode_tok_s"] > 0 and llama["prefill_tok_s"] > 0
    else:  # the test environment has no llama.cpp: the table says so, and how to get it
        assert llama.startswith("not measured: ") and "--llama-cpp-python" in llama, llama


@pytest.mark.slow
def test_bench_concurrent_reports_plain_and_speculative_decoding(capsys):
    """Speculation inflates the one-stream figure on repetitive text: both are reported, plain
    first, each naming the file's weight types."""
    assert main(["bench", "concurrent", "--gen-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["plain"]["speculative"] is False and result["speculative"]["speculative"] is True
    for run in result.values():
        assert run["streams_8_tok_s"] > 0 and run["weight_types"].get("Q4_1", 0) > 0, run
    assert main(["bench", "concurrent", "--gen-tokens", "8", "--no-speculative"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["speculative"] is False


@pytest.mark.parametrize("spelling", [["bench", "xor"], ["bench", "--xor"]], ids=["word", "flag"])
def test_bench_xor(capsys, spelling):
    """A scenario as a word (`galatea bench xor`) or as the older flag: the same measurement."""
    assert main([*spelling, "--size-mb", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bench"] == "xor apply"
    assert result["size_mb"] == 8.4 and result["galatea_mb_s"] > 0 and result["original_mb_s"] > 0


def test_bench_replay_names_a_missing_session(capsys):
    assert main(["bench", "replay", "no-such-session.jsonl"]) == 2
    assert "no-such-session.jsonl: not a recorded session" in capsys.readouterr().err


@pytest.mark.training
def test_bench_train_against_transformers_peft(tmp_path, capsys):
    from tests.checkpoints import hf_model, write_safetensors

    base = write_safetensors(hf_model("gqa"), tmp_path / "tiny")
    capsys.readouterr()
    assert main(["bench", "--train", "--model", str(base)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["galatea_tok_s"] > 0 and result["reference_tok_s"] > 0
    assert result["reference"].startswith("transformers") and result["lora"]["r"] == 8


def test_the_library_commands_a_new_user_trips_over(capsys, tmp_path, monkeypatch):
    """Issue 15's CLI findings: a PNG given to `chats import` is one line, not a traceback;
    `prompt --character NAME` finds a library character as `chat` does; `characters delete`
    asks first; `train data build --all-chats` skips a chat with no reply yet."""
    from galatea.chat.store import Store

    data = ["--data-dir", str(tmp_path / "data")]
    card = tmp_path / "mira.json"
    card.write_text(json.dumps({"name": "Mira", "description": "A witch of the marsh.", "first_mes": "Welcome."}))
    assert main(["characters", "import", str(card), *data]) == 0
    png = tmp_path / "mira.png"
    assert main(["characters", "export", "Mira", str(png), *data]) == 0
    capsys.readouterr()

    assert main(["chats", "import", str(png), "--character", "Mira", *data]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a chat file" in err and "galatea characters import" in err

    assert main(["prompt", "--character", "Mira", "--model", str(shared_vocab()), *data]) == 0
    assert capsys.readouterr().out.startswith("Mira's Persona: A witch of the marsh.")

    store = Store(tmp_path / "data" / "galatea.db")
    replied = store.new_chat(1)
    store.add_message(replied, True, "You", "Hi!")
    store.add_message(replied, False, "Mira", "Hello, traveller.")
    store.new_chat(1)  # opened, nothing said yet
    out = tmp_path / "d.jsonl"
    assert main(["train", "data", "build", "--all-chats", "--out", str(out), "--model", str(shared_vocab()),
                 *data]) == 0
    assert "1 chats without a reply yet skipped" in capsys.readouterr().err
    assert [json.loads(line)["generation"] for line in out.read_text().splitlines()] == [" Hello, traveller."]

    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["characters", "delete", "Mira", *data]) == 2  # a script must say --yes
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda question: "n")
    assert main(["characters", "delete", "Mira", *data]) == 1
    assert store.character("Mira")[1].name == "Mira"  # nothing deleted
    asked: list[str] = []
    monkeypatch.setattr("builtins.input", lambda question: asked.append(question) or "y")
    assert main(["characters", "delete", "Mira", *data]) == 0
    assert asked == ["delete Mira (id 1) and its 2 chats? [y/N] "]
    assert capsys.readouterr().out == "nothing deleted\ndeleted Mira and its 2 chats\n"
    assert main(["characters", "list", *data]) == 0 and capsys.readouterr().out == ""
