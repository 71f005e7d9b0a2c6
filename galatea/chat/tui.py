"""`galatea chat`: the terminal chat.

Plain line input (readline editing and history where the platform has it) and ANSI colours
(off when the output is not a terminal or NO_COLOR is set). Replies stream; Ctrl-C during a
reply stops that reply (what was written is kept), not the program.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from galatea.chat.session import ChatSession
from galatea.chat.store import Message, Store
from galatea.errors import GalateaError

HELP = """commands:
  /regen, /r          a new reply in place of the last one (kept as a swipe)
  /next, /prev        show the next / previous swipe of the last reply (/next past the last regenerates)
  /continue, /c       let the character go on with its last reply
  /impersonate, /i    the model suggests your next line; /send sends it
  /edit [N] TEXT      replace the text of message N (default: the last message)
  /delete N           delete message N
  /undo               delete your last message and the replies after it
  /name NAME          change your name in this chat
  /set [KEY VALUE]    show or change this chat's settings (temperature, top_p, max_new_tokens, max_context,
                      recall_tokens, stop A|B, persona TEXT, system_prompt TEXT, thinking on|off; `-` clears
                      a text);
                      /set preset NAME
  /thought [N]        what a reasoning model thought before reply N (default: the last), folded away
  /branch [N]         a new chat with the messages up to N (default: all), and switch to it
  /new                start a new chat with this character
  /chats, /open ID    list this character's chats; switch to one
  /characters         list the characters in the library
  /prompt             show the exact prompt that was sent last (or would be sent now)
  /history            show the whole chat again
  /help               this list
  /quit               leave (Ctrl-D works too)"""


class Colors:
    def __init__(self, enabled: bool) -> None:
        code = (lambda c: f"\033[{c}m") if enabled else (lambda c: "")
        self.user, self.char, self.dim, self.err, self.reset = code("1;36"), code("1;35"), code("2"), code("31"), \
            code("0")
        # readline needs invisible prompt bytes marked (\001 ... \002) to know the prompt's width
        self.prompt_user = f"\001{self.user}\002" if enabled else ""
        self.prompt_reset = f"\001{self.reset}\002" if enabled else ""


class TerminalChat:
    def __init__(self, session: ChatSession, out: TextIO = sys.stdout,
                 read: Callable[[str], str] = input) -> None:
        self.s = session
        self.out = out
        self.read = read
        tty = hasattr(out, "isatty") and out.isatty()
        self.c = Colors(tty and not os.environ.get("NO_COLOR"))
        self.suggestion: str | None = None

    # ---- output --------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def show_message(self, number: int, is_user: bool, name: str, text: str, swipe: str = "") -> None:
        color = self.c.user if is_user else self.c.char
        self.say(f"{self.c.dim}#{number}{self.c.reset} {color}{name}:{self.c.reset} {text}{swipe}")

    def show_history(self) -> None:
        info = self.s.store.chat(self.s.chat_id)
        self.say(f"{self.c.dim}chat {info.id} with {self.s.char.name}: {info.title} "
                 f"(/help for commands){self.c.reset}")
        for i, m in enumerate(self.s.messages(), 1):
            swipe = f" {self.c.dim}[{m.active + 1}/{len(m.swipes)}]{self.c.reset}" if len(m.swipes) > 1 else ""
            self.show_message(i, m.is_user, m.name, m.text, swipe)

    def stream(self, name: str, is_user: bool, chunks: Iterator[str]) -> None:
        """Print a streamed reply; Ctrl-C sets the cancel flag instead of raising."""
        color = self.c.user if is_user else self.c.char
        self.out.write(f"{color}{name}:{self.c.reset} ")
        self.out.flush()
        first = True
        for text in chunks:
            if first:
                text = text.lstrip()
                first = not text
            self.out.write(text)
            self.out.flush()
        self.say()
        last = self.s.last
        if last is not None and last.reasoning:
            self.say(f"{self.c.dim}[thought {len(last.reasoning.split())} words · /thought shows them]{self.c.reset}")
        if last is not None:
            stopped = " · stopped" if last.finish_reason == "cancelled" else ""
            shifted = f", {last.shifted_tokens} moved" if last.shifted_tokens else ""
            read = last.prompt_tokens - last.cached_tokens
            cached = f" ({last.cached_tokens} reused{shifted}, {read} read)" if last.cached_tokens else ""
            self.say(f"{self.c.dim}[prompt {last.prompt_tokens} tok{cached} · reply {last.reply_tokens} tok · "
                     f"{last.decode_tok_s:.1f} tok/s{stopped}]{self.c.reset}")

    def run_generation(self, name: str, is_user: bool, make: Callable[[threading.Event], Iterator[str]]) -> None:
        cancel = threading.Event()
        self.s.notice = lambda text: self.say(f"\n{self.c.dim}({text}){self.c.reset}")  # the store is down
        thought: list[str] = []  # a reasoning model's thinking: folded to a line; /thought shows it

        def thinking(text: str) -> None:
            if not thought:
                self.out.write(f"{self.c.dim}(thinking…){self.c.reset} ")
                self.out.flush()
            thought.append(text)

        self.s.thinking = thinking
        previous = signal.signal(signal.SIGINT, lambda *_: cancel.set()) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            self.stream(name, is_user, make(cancel))
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    # ---- the loop ------------------------------------------------------------------------------

    def loop(self) -> None:
        self.show_history()
        self._report_ignored()
        while True:
            try:
                line = self.read(f"{self.c.prompt_user}{self.s.user}>{self.c.prompt_reset} ")
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say(f"\n{self.c.dim}(/quit or Ctrl-D to leave){self.c.reset}")
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if self.command(line) == "quit":
                        return
                else:
                    self.run_generation(self.s.char.name, False, lambda c, t=line: self.s.send(t, c))
            except GalateaError as e:
                self.say(f"{self.c.err}error: {e}{self.c.reset}")
            except KeyboardInterrupt:  # Ctrl-C outside a reply (e.g. while the prompt is prepared)
                self.say(f"\n{self.c.dim}(stopped){self.c.reset}")

    def command(self, line: str) -> str | None:
        """Run one slash command; "quit" ends the chat. Long by design: one short branch per
        command, read as a table in one place rather than scattered over twenty methods."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        name = name.lower()
        s = self.s
        char = s.char.name
        if name in ("quit", "exit", "q"):
            return "quit"
        if name in ("help", "h", "?"):
            self.say(HELP)
        elif name in ("regen", "r", "regenerate"):
            self.run_generation(char, False, s.regenerate)
        elif name in ("next", "prev"):
            self._swipe(1 if name == "next" else -1)
        elif name in ("continue", "c"):
            self.run_generation(char, False, s.continue_last)
        elif name in ("impersonate", "i"):
            self.run_generation(s.user, True, s.impersonate)
            self.suggestion = s.last.text.strip() if s.last else None
            self.say(f"{self.c.dim}(/send to send this line){self.c.reset}")
        elif name == "send":
            if not self.suggestion:
                raise GalateaError("nothing to send; /impersonate first")
            text, self.suggestion = self.suggestion, None
            self.run_generation(char, False, lambda c: s.send(text, c))
        elif name == "edit":
            number, text = self._number_and_text(rest)
            s.store.edit_message(self._message(number).id, text)
            self.say(f"{self.c.dim}(edited #{number}){self.c.reset}")
        elif name in ("delete", "del"):
            number, _ = self._number_and_text(rest, need_text=False)
            s.store.delete_message(self._message(number).id)
            self.say(f"{self.c.dim}(deleted #{number}){self.c.reset}")
        elif name == "undo":
            n = s.store.undo_last_exchange(s.chat_id)
            self.say(f"{self.c.dim}(removed {n} message{'s' if n != 1 else ''}){self.c.reset}")
        elif name == "name":
            if not rest:
                raise GalateaError("usage: /name NAME")
            s.store.rename_user(s.chat_id, rest)
            self.say(f"{self.c.dim}(you are now {rest}){self.c.reset}")
        elif name == "set":
            self._set(rest)
        elif name == "branch":
            number = int(rest) if rest.isdigit() else len(s.messages())
            new_id = s.store.branch(s.chat_id, self._message(number).id)
            self._switch(new_id)
        elif name == "new":
            self._switch(s.store.new_chat(s.character_id, user_name=s.user))
        elif name == "chats":
            for info in s.store.chats(s.character_id):
                mark = "*" if info.id == s.chat_id else " "
                self.say(f"{mark} {info.id:4d}  {info.messages:4d} messages  {info.title}")
        elif name == "open":
            if not rest.isdigit():
                raise GalateaError("usage: /open CHAT_ID (see /chats)")
            if s.store.chat(int(rest)).character_id != s.character_id:
                raise GalateaError(f"chat {rest} belongs to another character; use galatea chat --chat {rest}")
            self._switch(int(rest))
        elif name == "characters":
            for cid, cname in s.store.characters():
                self.say(f"{cid:4d}  {cname}")
        elif name == "prompt":
            prompt = s.last_prompt or s.prompt()
            recalled = ", ".join(f"#{n} ({', '.join(words) or 'matched'})" for n, words in s.recalled(prompt))
            self.say(f"{self.c.dim}--- prompt ({prompt.tokens} tokens{'; recalled ' + recalled if recalled else ''}) "
                     f"---{self.c.reset}\n{prompt.text}\n{self.c.dim}--- end ---{self.c.reset}")
        elif name in ("thought", "think"):
            number = int(rest) if rest.isdigit() else len(s.messages())
            m = self._message(number)
            thought = m.swipes[m.active].extra.get("reasoning", "")
            self.say(f"{self.c.dim}{thought or '(no reasoning stored with #' + str(number) + ')'}{self.c.reset}")
        elif name == "history":
            self.show_history()
        else:
            raise GalateaError(f"unknown command /{name}; /help lists them")
        return None

    def _set(self, rest: str) -> None:
        from galatea.chat.settings import BUILTIN_PRESETS, SAMPLERS, parse

        if not rest:
            self.say("  ".join(f"{k}={v!r}" if isinstance(v, str | list) else f"{k}={v}"
                               for k, v in self.s.settings.items()))
            return
        key, _, value = rest.partition(" ")
        if key == "preset":  # a named set of sampler numbers: a built-in one or one saved from the page
            presets = {**BUILTIN_PRESETS, **self.s.store.presets()}
            match = next((n for n in presets if n.lower() == value.strip().lower()), None)
            if match is None:
                raise GalateaError(f"no preset {value.strip()!r}; one of {', '.join(presets)}")
            chosen = {k: v for k, v in presets[match].items() if k in SAMPLERS or k == "sampler_order"}
            self.s.settings.update(chosen)
            self.s.store.set_settings(self.s.chat_id, {**self.s.store.chat(self.s.chat_id).settings, **chosen})
            self.say(f"{self.c.dim}(preset {match} for this chat){self.c.reset}")
            return
        parsed = parse(key, value)
        self.s.settings[key] = parsed
        saved = {**self.s.store.chat(self.s.chat_id).settings, key: parsed}
        self.s.store.set_settings(self.s.chat_id, saved)  # kept with the chat
        self.say(f"{self.c.dim}({key} = {parsed} for this chat){self.c.reset}")

    def _swipe(self, step: int) -> None:
        msgs = self.s.messages()
        if not msgs or msgs[-1].is_user:
            raise GalateaError("the last message is yours: there is nothing to swipe")
        last = msgs[-1]
        if step > 0 and last.active == len(last.swipes) - 1 and len(msgs) > 1:
            self.run_generation(self.s.char.name, False, self.s.regenerate)  # past the last: a new one
            return
        idx = self.s.store.swipe(last.id, step)
        self.show_message(len(msgs), False, last.name, last.swipes[idx].text,
                          f" {self.c.dim}[{idx + 1}/{len(last.swipes)}]{self.c.reset}")

    def _number_and_text(self, rest: str, need_text: bool = True) -> tuple[int, str]:
        first, _, text = rest.partition(" ")
        if first.isdigit():
            number, text = int(first), text.strip()
        else:
            number, text = len(self.s.messages()), rest
        if need_text and not text:
            raise GalateaError("usage: /edit [N] TEXT")
        if not need_text and not first.isdigit():
            raise GalateaError("usage: /delete N (the number shown as #N)")
        return number, text

    def _message(self, number: int) -> Message:
        msgs = self.s.messages()
        if not 1 <= number <= len(msgs):
            raise GalateaError(f"no message #{number}; the chat has {len(msgs)}")
        return msgs[number - 1]

    def _switch(self, chat_id: int) -> None:
        old = self.s
        self.s = ChatSession(old.store, old.lm, chat_id, old.overrides, max_context=old.model_context,
                             generate=old.generate, context_shift=old.context_shift, speculative=old.speculative)
        self.show_history()
        self._report_ignored()

    def _report_ignored(self) -> None:
        if self.s.ignored:
            self.say(f"{self.c.dim}(stored settings that are not numbers were ignored: "
                     f"{', '.join(self.s.ignored)}; /set them again){self.c.reset}")


def open_chat(store: Store, character: str | None, chat_id: int | None, new: bool, user: str | None) -> int:
    """The chat to open: --chat, else the character's last chat (unless --new), else a new one.
    A character given as a file or bundled name joins the library on first use."""
    from galatea.chat.cards import load_character

    if chat_id is not None:
        store.chat(chat_id)
        return chat_id
    try:
        cid, _ = store.character(character) if character else store.character("Aria")
    except GalateaError:
        char = load_character(character)
        found = [i for i, n in store.characters() if n.lower() == char.name.lower()]
        cid = found[-1] if found else store.add_character(char)
    last = None if new else store.last_chat(cid)
    if last is not None:
        if user:
            store.rename_user(last, user)
        return last
    return store.new_chat(cid, user_name=user or "You")
