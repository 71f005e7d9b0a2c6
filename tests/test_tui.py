"""The real `galatea chat` program driven through a pseudo-terminal, with the embedded model:
send, regenerate, swipe, edit, stop a reply with Ctrl-C, quit, and resume."""

from __future__ import annotations

import os
import pty
import re
import select
import sys
import time

import pytest

from tests.checkpoints import ROOT

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


class Terminal:
    def __init__(self, *args: str, env: dict[str, str]) -> None:
        # pty.fork makes the pty the child's controlling terminal, so Ctrl-C becomes SIGINT
        pid, self.master = pty.fork()
        if pid == 0:  # the child: become the real program
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "galatea", "chat", *args], env)
        self.pid = pid
        self.raw = b""
        self.seen = 0  # how much of `screen` earlier read_until calls consumed

    @property
    def screen(self) -> str:
        text = self.raw.decode("utf-8", "replace")
        return ANSI.sub("", text).replace("\r", "").replace("\x01", "").replace("\x02", "")

    def read_until(self, pattern: str, timeout: float = 120) -> str:
        """Read until `pattern` (a regex) appears after what earlier calls consumed; returns the
        output up to the end of the match and consumes just that. One pty read can carry a reply
        and the next prompt: consuming whole reads would let a later wait match a stale prompt."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            new = self.screen[self.seen :]
            match = re.search(pattern, new)
            if match:
                self.seen += match.end()
                return new[: match.end()]
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    break
        raise AssertionError(f"timed out waiting for {pattern!r}; screen so far:\n{self.screen[-3000:]}")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        deadline = time.time() + 30
        try:
            while time.time() < deadline:
                try:
                    os.read(self.master, 65536)  # drain, so the child never blocks on output
                except OSError:
                    pass
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return os.waitstatus_to_exitcode(status)
                time.sleep(0.05)
            os.kill(self.pid, 9)
            raise AssertionError("the chat did not exit")
        finally:
            os.close(self.master)


def test_terminal_chat(tmp_path):
    env = {**os.environ, "GALATEA_DATA_DIR": str(tmp_path), "TERM": "xterm"}
    # Pygmalion's layout (the embedded model's own template is ChatML: --format overrides it)
    t = Terminal("-n", "10", "--seed", "3", "--format", "pygmalion", env=env)
    screen = t.read_until(r"You> ")
    assert "#1 Aria: *Aria looks up from tuning her lute" in screen and "[1/2]" in screen

    t.type("Hello Aria!\n")
    out = t.read_until(r"tok/s\]\s*\nYou> ")
    assert "Aria:" in out and "[prompt" in out

    t.type("/regen\n")
    t.read_until(r"tok/s\]\s*\nYou> ")
    t.type("/prev\n")
    assert "[1/2]" in t.read_until(r"You> ")
    t.type("/next\n")
    assert "[2/2]" in t.read_until(r"You> ")

    t.type("/edit 2 Hello there, bard!\n")
    assert "(edited #2)" in t.read_until(r"You> ")

    # Ctrl-C during a reply stops the reply, not the program
    t.type("/name Ann\n")
    t.read_until(r"Ann> ")
    t.type("/set max_new_tokens 2000\n")
    assert "(max_new_tokens = 2000 for this chat)" in t.read_until(r"Ann> ")
    t.type("/set ban_eos 1\n")
    assert "unknown setting" in t.read_until(r"Ann> ")
    # greedy without a repetition penalty: this small model goes on for ~70 tokens here
    t.type("/set temperature 0\n")
    t.read_until(r"Ann> ")
    t.type("/set repetition_penalty 1.0\n")
    t.read_until(r"Ann> ")
    t.type("Tell me a very long story about the sea.\n")
    t.read_until(r"Aria: \S+ \S+")
    t.type("\x03")
    out = t.read_until(r"Ann> ")
    assert "stopped]" in out
    t.type("/prompt\n")
    assert "Ann: Tell me a very long story about the sea.\nAria:" in t.read_until(r"--- end ---\s*Ann> ")
    # the prompt settings the page has, from /set: a persona, a preset (only the samplers change)
    t.type("/set persona {{user}} is a sailor.\n")
    t.read_until(r"Ann> ")
    t.type("/set preset min-p\n")
    assert "(preset Min-P for this chat)" in t.read_until(r"Ann> ")
    t.type("/set\n")
    shown = t.read_until(r"Ann> ")
    assert "min_p=0.1" in shown and "max_new_tokens=2000" in shown and "persona='{{user}} is a sailor.'" in shown
    t.type("/set max_new_tokens 3\n")
    t.read_until(r"Ann> ")
    t.type("Ahoy!\n")
    t.read_until(r"tok/s[\s\S]*Ann> ")
    t.type("/prompt\n")  # the prompt of that last reply (read up to the next input prompt, whole)
    assert "\nAnn is a sailor.\n<START>" in t.read_until(r"--- end ---\s*Ann> ")
    # another prompt format for this chat: the next reply's prompt is ChatML
    t.type("/set format chatml\n")
    assert "(format = chatml for this chat)" in t.read_until(r"Ann> ")
    t.type("Where to?\n")
    t.read_until(r"tok/s[\s\S]*Ann> ")
    t.type("/prompt\n")
    assert "<|im_start|>user\nAhoy!<|im_end|>\n" in t.read_until(r"--- end ---")

    t.type("/quit\n")
    assert t.close() == 0

    # resume: the same chat comes back, with the edit, the swipes and the new name
    t = Terminal(env=env)
    screen = t.read_until(r"Ann> ")
    assert "#2 Ann: Hello there, bard!" in screen
    assert "[2/2]" in screen and "#4 Ann: Tell me a very long story about the sea." in screen
    assert "Ann: Ahoy!" in screen and "Ann: Where to?" in screen
    t.type("\x04")  # Ctrl-D leaves too
    assert t.close() == 0
