"""A reasoning model's thinking, told apart from its reply as the text streams.

Qwen3 and its kin open a reply with `<think>...</think>` (thinking on), or are given an empty
block by their template (thinking off: `enable_thinking` false). As SillyTavern does, a block at
the very start of the reply is reasoning: shown folded, stored beside the reply, and never put
back into the next prompt (the history holds the reply alone). A prompt that already ends inside
an open `<think>` (some templates open it for the model) starts in the block.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Feed the reply's text as it streams; get back (reply text, reasoning text) to show now.
    Text that might still be the start of a tag is held until it is decided."""

    def __init__(self, opened: bool = False) -> None:
        self.state = "think" if opened else "start"  # start -> think -> gap -> reply, or start -> reply
        self.pending = ""
        self.reasoning = ""  # all of it so far

    @classmethod
    def for_prompt(cls, prompt: str) -> ThinkSplitter:
        """Starts inside the block when the prompt leaves one open."""
        tail = prompt.rstrip()
        return cls(opened=tail.endswith(OPEN))

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        reply = thought = ""
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(OPEN):
                    self.state, self.pending = "think", head[len(OPEN):]
                    continue
                if OPEN.startswith(head):  # "", "<", "<thi": not decided yet
                    break
                self.state = "reply"
                continue
            if self.state == "think":
                end = self.pending.find(CLOSE)
                if end >= 0:
                    thought += self.pending[:end]
                    self.state, self.pending = "gap", self.pending[end + len(CLOSE):]
                    continue
                keep = _partial_suffix(self.pending, CLOSE)
                thought += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            if self.state == "gap":  # the blank lines between the block and the reply are neither
                self.pending = self.pending.lstrip()
                if not self.pending:
                    break
                self.state = "reply"
            reply, self.pending = reply + self.pending, ""
            break
        self.reasoning += thought
        return reply, thought

    def flush(self) -> tuple[str, str]:
        """What is left when the reply ends: an unclosed block is reasoning (the model stopped
        while thinking), undecided text is reply."""
        rest, self.pending = self.pending, ""
        if self.state == "think":
            self.reasoning += rest
            return "", rest
        return rest, ""


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
