"""A chat in progress: the store, the model and the prompt builder working together.

Replies stream as text deltas; the stored text is cleaned (stop text, surrounding whitespace,
a repeated `{char}:` and leaked `<USER>`/`<BOT>` removed). The user's message is saved before the
model starts, and the reply when it ends, so a crash loses at most the reply in progress. A reply
that ends while the chat store is unreachable (a PostgreSQL outage) is kept and saved when the
store returns (within STORE_PATIENCE_S), the wait told through `notice`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from galatea.chat import formats
from galatea.chat.formats import Format
from galatea.chat.lorebooks import with_lorebooks
from galatea.chat.prompt import Prompt, Turn, build_prompt, substitute
from galatea.chat.reasoning import ThinkSplitter
from galatea.chat.recall import asked, matched, memories, query_terms
from galatea.chat.settings import SAMPLERS, resolve
from galatea.chat.store import Message, Store
from galatea.engine.generate import Chunk, stream_generate
from galatea.engine.modern_samplers import dry_breaker_ids
from galatea.engine.prompt_cache import PromptCache
from galatea.engine.sampling import SamplingParams
from galatea.errors import GalateaError, StoreUnavailable
from galatea.model.checkpoint import LoadedModel


def reply_stops(char: str, user: str) -> list[str]:
    """Where a reply ends: the user's next line, a new persona block, or EOS written as text."""
    stops = ["\nYou:", f"\n{user}:", "<START>", f"\n{char}'s Persona:", "</s>"]
    return list(dict.fromkeys(stops))


def impersonate_stops(char: str, user: str) -> list[str]:
    return list(dict.fromkeys([f"\n{char}:", f"\n{user}:", "\nYou:", "<START>", "</s>"]))


def clean_reply(text: str, speaker: str, char: str, user: str) -> str:
    """The reply as stored: no leading `{speaker}:` echo, placeholders filled, trimmed."""
    text = text.strip()
    text = re.sub(rf"^{re.escape(speaker)}:\s*", "", text)
    return substitute(text, char, user).strip()


@dataclass
class Turnout:
    """What a finished generation produced, for the status line."""

    text: str
    prompt_tokens: int
    reply_tokens: int
    decode_tok_s: float
    prefill_tok_s: float
    finish_reason: str | None
    seed: int | None = None
    message_id: int | None = None
    cached_tokens: int = 0
    shifted_tokens: int = 0
    error: str | None = None  # a remote engine's failure (finish_reason "error")
    reasoning: str = ""  # what a reasoning model thought before its reply (`<think>`), kept apart


def _stopped_empty(out: Turnout, text: str) -> bool:
    """Stopped (or failed) before it wrote anything: nothing to keep (an empty message would only
    be in the way, and a blank swipe would hide the reply the user had)."""
    return out.finish_reason in ("cancelled", "error") and not text


def _extra(out: Turnout) -> dict[str, Any]:
    """What is stored beside a reply's text: the reasoning a thinking model wrote before it."""
    return {"reasoning": out.reasoning} if out.reasoning else {}


def _raise_failure(out: Turnout) -> None:
    """A remote engine that failed mid-reply: what was written is stored; now say what went wrong."""
    if out.error:
        raise GalateaError(out.error)


STORE_PATIENCE_S = 600.0  # how long a finished reply waits for an unreachable store
STORE_RETRY_S = 1.0
T = TypeVar("T")
Progress = Callable[[int, int], None]  # (prompt tokens read, prompt tokens), while a prompt is read
Generate = Callable[[list[int], SamplingParams, threading.Event | None, Progress | None], Iterator[Chunk]]


class ChatSession:
    """`generate` runs the model (default: directly, in this thread); the server passes its
    engine queue instead, so chat sessions and API requests never race on the model."""

    def __init__(self, store: Store, lm: LoadedModel, chat_id: int, settings: dict[str, Any] | None = None,
                 max_context: int | None = None, generate: Generate | None = None,
                 context_shift: bool = True, speculative: bool = True, default_format: str = "auto") -> None:
        self.store, self.lm, self.chat_id = store, lm, chat_id
        # what the command line set, kept when the terminal opens another chat (/new, /open)
        self.overrides, self.context_shift, self.speculative = dict(settings or {}), context_shift, speculative
        # each turn re-reads only what changed since the last, even once old turns drop out
        self.prompt_cache = PromptCache(context_shift)
        self.generate = generate  # kept for the terminal's /new, /open, /branch (a remote engine's)
        self._run = generate or (lambda ids, params, cancel, progress: stream_generate(
            lm.model, lm.tokenizer, ids, params, cancel, self.context, self.prompt_cache, speculative))
        self.info = store.chat(chat_id)
        self.character_id, self.char = store.character(self.info.character_id)
        # a card may name its format (extensions.galatea.format): above the default, below the chat's
        own = (self.char.extensions.get("galatea") or {}) if isinstance(self.char.extensions, dict) else {}
        card = {"format": own["format"]} if isinstance(own, dict) and own.get("format") else {}
        layers = (store.default_settings(), card, self.info.settings, settings or {})
        self.settings, self.ignored = resolve(*layers)
        # "auto" is no choice: a chat left at auto follows its card's format, then the model's
        chosen = [s["format"] for s in layers if s.get("format") in (formats.TEMPLATE, *formats.names())]
        if chosen:
            self.settings["format"] = chosen[-1]
        self._formats: dict[str, Format] = {}
        self.default_format = default_format  # what "auto" means here (`serve --format`), "auto": the model's
        self.model_context = max_context or lm.config.max_position_embeddings  # the model's, or the server's
        self.last_prompt: Prompt | None = None
        self.last: Turnout | None = None
        self.progress: Progress | None = None  # told how far a long prompt is read (the page's)
        self.notice: Callable[[str], None] | None = None  # told why a finished reply is not saved yet
        self.thinking: Callable[[str], None] | None = None  # told a reasoning model's thoughts as they stream
        self.recall_terms: list[str] = []  # the words the last prompt searched the chat for

    @property
    def context(self) -> int:
        """The chat's context size (its `max_context` setting), within the model's."""
        own = int(self.settings["max_context"])
        return min(self.model_context, own) if own > 0 else self.model_context

    @property
    def format(self) -> Format:
        """The chat's prompt format (its `format` setting; "auto" follows the model)."""
        name = str(self.settings["format"])
        name = self.default_format if name == formats.AUTO else name
        if name not in self._formats:
            self._formats[name] = formats.choose(name, self.lm.tokenizer)
        # a reasoning model's template thinks only when the chat asks it to (enable_thinking)
        return replace(self._formats[name], thinking=bool(self.settings.get("thinking")))

    @property
    def user(self) -> str:
        return self.store.chat(self.chat_id).user_name

    def messages(self) -> list[Message]:
        return self.store.messages(self.chat_id)

    def prompt(self, new_message: str | None = None, end: str = "char", upto: int | None = None) -> Prompt:
        msgs = self.messages()[:upto]
        history = [Turn(m.is_user, m.text) for m in msgs]
        # the card's own lorebook, then the books attached to this character or chat
        char = with_lorebooks(self.char, [book for _, book in self.store.chat_lorebooks(self.chat_id)])
        # recall: the chat's messages that match the newest user message, best first
        self.recall_terms = query_terms(asked(msgs, new_message))
        budget = int(self.settings["recall_tokens"])
        found = memories(self.store, self.chat_id, msgs, self.recall_terms) if budget > 0 else []
        return build_prompt(char, history, new_message, self.lm.tokenizer, self.context,
                            int(self.settings["max_new_tokens"]), user=self.user, end=end,
                            system=self.settings["system_prompt"] or None, persona=self.settings["persona"],
                            fmt=self.format, memories=found, memory_tokens=budget)

    def recalled(self, prompt: Prompt) -> list[tuple[int, list[str]]]:
        """(message number, the searched words it matched) of each message `prompt` recalled."""
        msgs = self.messages()
        return [(i + 1, matched(self.recall_terms, msgs[i].text)) for i in prompt.recalled if i < len(msgs)]

    def stops(self, base: list[str]) -> list[str]:
        """Where a reply ends: the format's stops and the chat's own."""
        return list(dict.fromkeys([*base, *self.settings["stop"]]))

    # ---- operations ----------------------------------------------------------------------------

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Save the user's message, then stream the character's reply (saved when it ends)."""
        if not text.strip():
            raise GalateaError("the message is empty")
        self.store.add_message(self.chat_id, True, self.user, text.strip())
        yield from self._reply(cancel)

    def reply(self, cancel: threading.Event | None = None) -> Iterator[str]:
        """A new character message answering the history as it stands."""
        yield from self._reply(cancel)

    def regenerate(self, cancel: threading.Event | None = None) -> Iterator[str]:
        """A new alternative (swipe) for the last character message, with a fresh seed."""
        msgs = self.messages()
        if not msgs or msgs[-1].is_user:
            yield from self._reply(cancel)
            return
        target = msgs[-1]
        prompt = self.prompt(upto=len(msgs) - 1)
        started = time.time()
        # A fresh seed per swipe: a fixed chat seed would give the same reply again.
        seed = None if self.settings.get("seed") is None else int(self.settings["seed"]) + len(target.swipes)
        user = self.user  # read before the reply: after it, the store may be unreachable for a while
        out = yield from self._generate(prompt, self.stops(reply_stops(self.char.name, user)), cancel, seed)
        text = clean_reply(out.text, self.char.name, self.char.name, user)
        if not _stopped_empty(out, text):
            self._save(lambda: self.store.add_swipe(target.id, text, out.seed, started, time.time(), _extra(out)))
            out.message_id = target.id
        _raise_failure(out)

    def continue_last(self, cancel: threading.Event | None = None) -> Iterator[str]:
        """Carry on writing the last character message."""
        msgs = self.messages()
        if not msgs or msgs[-1].is_user:
            raise GalateaError("there is no character message to continue; send a message first")
        prompt = self.prompt(end="continue")
        user = self.user
        out = yield from self._generate(prompt, self.stops(reply_stops(self.char.name, user)), cancel)
        addition = substitute(out.text.rstrip(), self.char.name, user)
        self._save(lambda: self.store.append_to_message(msgs[-1].id, addition))
        out.message_id = msgs[-1].id
        _raise_failure(out)

    def impersonate(self, cancel: threading.Event | None = None) -> Iterator[str]:
        """The model writes the user's next line (not saved: the user may send or edit it)."""
        prompt = self.prompt(end="user")
        user = self.user
        out = yield from self._generate(prompt, self.stops(impersonate_stops(self.char.name, user)), cancel)
        out.text = clean_reply(out.text, user, self.char.name, user)

    def _reply(self, cancel: threading.Event | None) -> Iterator[str]:
        prompt = self.prompt()
        started = time.time()
        user = self.user
        out = yield from self._generate(prompt, self.stops(reply_stops(self.char.name, user)), cancel)
        text = clean_reply(out.text, self.char.name, self.char.name, user)
        if not _stopped_empty(out, text):
            finished = time.time()
            out.message_id = self._save(lambda: self.store.add_message(self.chat_id, False, self.char.name, text,
                                                                       out.seed, started, finished, _extra(out)))
        _raise_failure(out)

    def _save(self, write: Callable[[], T]) -> T:
        """A finished reply's write: while the store is unreachable the text is kept here and the
        write tried again each second, so an outage loses nothing written (up to the patience)."""
        deadline, told = time.monotonic() + STORE_PATIENCE_S, False
        while True:
            try:
                return write()
            except StoreUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                if self.notice is not None and not told:
                    self.notice(f"{e} - the reply is kept and saved when it returns")
                    told = True
                time.sleep(STORE_RETRY_S)

    def _generate(self, prompt: Prompt, stops: list[str], cancel: threading.Event | None,
                  seed: int | None = None) -> Iterator[str]:
        self.last_prompt = prompt
        s = self.settings
        # every sampler by its SamplingParams name; JSON may hold 40.0 where a count belongs
        samplers = {k: type(default)(s[k]) for k, default in SAMPLERS.items()}
        params = SamplingParams(
            max_new_tokens=int(s["max_new_tokens"]), **samplers, sampler_order=tuple(s["sampler_order"]),
            stop=list(dict.fromkeys([*stops, *prompt.stops])), seed=seed if seed is not None else s.get("seed"),
            dry_sequence_breakers=dry_breaker_ids(self.lm.tokenizer))
        params.validate()
        ids = self.lm.tokenizer.encode(prompt.text)
        parts: list[str] = []
        last: Chunk | None = None
        split = ThinkSplitter.for_prompt(prompt.text)  # a <think> block is reasoning, apart from the reply
        for chunk in self._run(ids, params, cancel, self.progress):
            if chunk.finish_reason is not None:
                more, thought = split.flush()
                text = chunk.text + more
            else:
                text, thought = split.feed(chunk.text)
            if thought and self.thinking is not None:
                self.thinking(thought)
            if text:
                parts.append(text)
                yield text
            last = chunk
        assert last is not None
        self.last = Turnout("".join(parts), last.prompt_tokens, last.generated_tokens, last.decode_tok_s,
                            last.prefill_tok_s, last.finish_reason, last.seed, cached_tokens=last.cached_tokens,
                            shifted_tokens=last.shifted_tokens, error=last.error, reasoning=split.reasoning.strip())
        return self.last
