"""Training examples from chats, in the exact prompt Galatea sends at inference.

Every character reply that answers the user becomes one example:

    {"prompt": "<the Pygmalion prompt for that reply, ending in '{char}:'>",
     "generation": " <the reply>", "split": "train" | "validation", "source": "...",
     "prompt_tokens": 412, "target_tokens": 37, "messages_dropped": 3, "examples_dropped": 1}

In another prompt format (chat/formats.py: the model's chat template, ChatML, Llama 3...) the
prompt ends with the format's model sequence and the generation is the reply followed by the
format's end of a reply (`<|im_end|>`, `<|eot_id|>`), unless that end is the tokenizer's own
EOS, which closes every example anyway.

`prompt`/`generation` is PygmalionAI's own JSONL format, so these files go both ways. The prompt
is built by `chat.prompt.build_prompt`, the function `galatea chat` and `galatea prompt` use, with
the reply's length as the budget: the history is a sliding window that leaves exactly room for
the reply in the model's context. At training time the tokens are `encode(prompt)` followed by
the reply's tokens and EOS; only those carry loss (`encode_example`).

Sources: Galatea chats (from the SQLite store), SillyTavern chat JSONL and text-generation-webui
history JSON (both with the character's card), and PygmalionAI-style JSONL (`prompt`/`generation`
or `input`/`output`), taken as already rendered.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galatea.chat import formats
from galatea.chat.cards import Character
from galatea.chat.formats import Format
from galatea.chat.prompt import DEFAULT_USER, Turn, build_prompt
from galatea.errors import GalateaError
from galatea.model.tokenizer import Tokenizer

IGNORE = -100  # label of a position without loss (PyTorch's cross-entropy ignore_index)


@dataclass
class Conversation:
    char: Character
    turns: list[Turn]
    source: str  # where it came from, for messages and stats
    optional: bool = False  # one of --all-chats: without a reply yet it is skipped, not an error


@dataclass
class Example:
    prompt: str
    generation: str
    source: str
    prompt_tokens: int
    target_tokens: int  # the reply's tokens plus EOS
    messages_dropped: int = 0
    examples_dropped: int = 0
    split: str = "train"

    def key(self) -> str:
        return hashlib.sha256(f"{self.prompt}\0{self.generation}".encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "generation": self.generation, "split": self.split, "source": self.source,
                "prompt_tokens": self.prompt_tokens, "target_tokens": self.target_tokens,
                "messages_dropped": self.messages_dropped, "examples_dropped": self.examples_dropped}


# ---- tokens and labels -------------------------------------------------------------------------

def encode_example(tok: Tokenizer, prompt: str, generation: str) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens). The prompt is encoded alone, exactly as at inference;
    the reply's tokens are those the joint encoding has after it (so ' Hello' after 'Aria:'
    is one '▁Hello' piece, as the model would generate it, not '▁' + '▁Hello'); then EOS."""
    if tok.eos_id is None:
        raise GalateaError("the model's tokenizer has no EOS token; a reply's end cannot be taught")
    prompt_ids = tok.encode(prompt)
    joint = tok.encode(prompt + generation)
    n = len(prompt_ids)
    if joint[:n] == prompt_ids:
        reply = joint[n:]
    else:  # the boundary merged into one piece: encode the reply alone, without BOS
        reply = tok.encode(generation, add_bos=False)
    return prompt_ids + reply + [tok.eos_id], n


@dataclass
class Sample:
    """One example as the model reads it: token ids and next-token labels (IGNORE off the reply)."""

    ids: list[int]
    labels: list[int]
    line: int  # in the dataset file, for messages


def tokenize_rows(tok: Tokenizer, rows: list[dict[str, Any]], context: int, where: str, model: Path) -> list[Sample]:
    """The rows of a dataset (`read_jsonl`) as samples; one longer than `context` is an error
    naming its line (`where` is the dataset file, `model` the checkpoint it is read for)."""
    out = []
    for r in rows:
        ids, n_prompt = encode_example(tok, r["prompt"], r["generation"])
        if len(ids) > context:
            raise GalateaError(
                f"{where}:{r['line']}: {len(ids)} tokens, more than the model's context of {context}; rebuild the "
                f"dataset for this model (`galatea train data build --model {model}`, which windows the history "
                "to fit) or remove the line")
        out.append(Sample(ids, labels_for(ids, n_prompt), r["line"]))
    return out


def labels_for(ids: Sequence[int], n_prompt: int) -> list[int]:
    """Next-token labels aligned with `ids`: labels[i] is the target of position i, that is
    ids[i + 1] when that token belongs to the reply (or EOS), else IGNORE."""
    return [ids[i + 1] if i + 1 >= n_prompt else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


# ---- sources -----------------------------------------------------------------------------------

def store_conversations(store: Any, chat_ids: Iterable[int], optional: bool = False) -> Iterator[Conversation]:
    """Galatea chats; `optional` (every chat, --all-chats): one without a reply yet is skipped."""
    for chat_id in chat_ids:
        info = store.chat(chat_id)
        _, char = store.character(info.character_id)
        turns = [Turn(m.is_user, m.text) for m in store.messages(chat_id)]
        yield Conversation(char, turns, f"galatea chat {chat_id}", optional)


def file_conversations(path: Path, char: Character | None) -> tuple[list[Conversation], list[dict[str, Any]]]:
    """A chat file: (conversations, pre-rendered PygmalionAI examples). Kind by content."""
    from galatea.chat import chatfiles
    from galatea.chat.store import Store

    if not path.is_file():
        raise GalateaError(f"{path}: no such file; pass chat files (SillyTavern .jsonl, text-generation-webui "
                           ".json, PygmalionAI .jsonl) or use --chat / --all-chats for Galatea chats")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GalateaError(f"{path}: not UTF-8 text; expected a JSON or JSONL chat file") from None
    if not text.strip():
        raise GalateaError(f"{path}: the file is empty; there are no chats in it to learn from")
    rows = chatfiles.json_lines(text)
    if rows and any(_pyg_pair(r) for r in rows):
        out = []
        for i, r in enumerate(rows, 1):
            pair = _pyg_pair(r)
            if pair is None:
                raise GalateaError(f"{path}:{i}: expected 'prompt'/'generation' (or 'input'/'output') strings")
            out.append({"prompt": pair[0], "generation": pair[1], "source": f"{path.name}:{i}"})
        return [], out
    if char is None:
        raise GalateaError(f"{path}: a chat file needs the character's card; pass --character CARD")
    memory = Store(":memory:")  # the importers of `galatea chats import`, into a throwaway store
    try:
        cid = memory.add_character(char)
        chat_id = chatfiles.import_chat(memory, text, cid, where=str(path))
        turns = [Turn(m.is_user, m.text) for m in memory.messages(chat_id)]
    finally:
        memory.close()
    return [Conversation(char, turns, path.name)], []


def _pyg_pair(row: dict[str, Any]) -> tuple[str, str] | None:
    for p, g in (("prompt", "generation"), ("input", "output")):
        if isinstance(row.get(p), str) and isinstance(row.get(g), str):
            return row[p], row[g]
    return None


# ---- building ----------------------------------------------------------------------------------

def reply_end(fmt: Format, tok: Tokenizer) -> str:
    """The text that closes a model's reply in `fmt` ("" where EOS alone does: Pygmalion, or an
    end that is the tokenizer's EOS token, as `<|im_end|>` is SmolLM2's)."""
    end = "" if fmt.kind == "pygmalion" else fmt.output_suffix.strip() if fmt.kind == "instruct" \
        else (fmt.stops[0] if fmt.stops else "")
    return "" if end == tok.piece(tok.eos_id) else end


def conversation_examples(conv: Conversation, tok: Tokenizer, context: int, user: str = DEFAULT_USER,
                          skip_long: bool = False, fmt: Format | None = None) -> tuple[list[Example], int]:
    """One example per character reply that follows a user message; (examples, skipped). `fmt`:
    the prompt format (default Pygmalion's)."""
    fmt = fmt or formats.named("pygmalion")
    end = reply_end(fmt, tok)
    out, skipped = [], 0
    for i, turn in enumerate(conv.turns):
        if turn.is_user or not turn.text.strip() or not any(t.is_user for t in conv.turns[:i]):
            continue  # greetings are the card's, not replies to anything
        # Pygmalion's reply follows "{char}:" after a space; the others' their model sequence
        generation = " " + turn.text.strip() if fmt.kind == "pygmalion" else turn.text.strip() + end
        target = len(tok.encode(generation, add_bos=False)) + 1  # + EOS (a budget; exact count below)
        where = f"{conv.source}, message {i + 1}"
        if target >= context:
            if skip_long:
                skipped += 1
                continue
            raise GalateaError(f"{where}: the reply alone is {target} tokens, more than the context of {context}; "
                               "pass --skip-long to leave such replies out, or a larger --context")
        try:
            p = build_prompt(conv.char, conv.turns[:i], None, tok, context, target, user=user, fmt=fmt)
            ids, n_prompt = encode_example(tok, p.text, generation)
            if len(ids) - n_prompt != target:
                # The reply after "{char}:" can take a piece fewer than alone (no leading '▁'):
                # window again with the exact count, so the prompt is the one `galatea prompt
                # -n <reply tokens>` sends.
                target = len(ids) - n_prompt
                p = build_prompt(conv.char, conv.turns[:i], None, tok, context, target, user=user, fmt=fmt)
                ids, n_prompt = encode_example(tok, p.text, generation)
        except GalateaError as e:
            if skip_long:
                skipped += 1
                continue
            raise GalateaError(f"{where}: {e}; or pass --skip-long to leave such replies out") from None
        if len(ids) > context:  # the joint encoding can differ from the budget by a piece
            if skip_long:
                skipped += 1
                continue
            raise GalateaError(f"{where}: {len(ids)} tokens with the reply, more than the context of {context}; "
                               "pass --skip-long or a larger --context")
        out.append(Example(p.text, generation, conv.source, n_prompt, len(ids) - n_prompt,
                           p.messages_dropped, p.examples_dropped))
    return out, skipped


def rendered_examples(rows: list[dict[str, Any]], tok: Tokenizer, context: int,
                      skip_long: bool = False) -> tuple[list[Example], int]:
    out, skipped = [], 0
    for r in rows:
        ids, n_prompt = encode_example(tok, r["prompt"], r["generation"])
        if len(ids) > context:
            if skip_long:
                skipped += 1
                continue
            raise GalateaError(f"{r['source']}: {len(ids)} tokens, more than the context of {context}; PygmalionAI-"
                               "style examples are used as written, so shorten it, pass --skip-long or a larger "
                               "--context")
        if n_prompt == len(ids) - 1 and not r["generation"].strip():
            continue  # an empty reply teaches only EOS
        out.append(Example(r["prompt"], r["generation"], r["source"], n_prompt, len(ids) - n_prompt))
    return out, skipped


@dataclass
class BuildReport:
    examples: list[Example]
    duplicates: int
    skipped: int
    conversations: int
    empty: int = 0  # optional conversations without a reply to learn from (skipped)


def build(conversations: Iterable[Conversation], rendered: list[dict[str, Any]], tok: Tokenizer, context: int,
          val_fraction: float = 0.1, seed: int = 0, user: str = DEFAULT_USER, skip_long: bool = False,
          fmt: Format | None = None) -> BuildReport:
    """All examples, deduplicated, with a deterministic train/validation split."""
    examples: list[Example] = []
    skipped = n_conv = empty = 0
    for conv in conversations:
        n_conv += 1
        got, s = conversation_examples(conv, tok, context, user, skip_long, fmt)
        if not got and not s and conv.optional:
            empty += 1
            continue
        if not got and not s:
            raise GalateaError(f"{conv.source}: has no character reply to a user message; nothing to learn from it")
        examples += got
        skipped += s
    got, s = rendered_examples(rendered, tok, context, skip_long)
    examples += got
    skipped += s
    unique: dict[str, Example] = {}
    for e in examples:
        unique.setdefault(e.key(), e)
    kept = list(unique.values())
    if not kept:
        raise GalateaError("no examples: the sources hold no character replies to user messages")
    if not 0 <= val_fraction < 1:
        raise GalateaError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    n_val = max(1, round(len(kept) * val_fraction)) if val_fraction > 0 and len(kept) >= 2 else 0
    # The split is a hash order (seeded): stable when sources are re-read or reordered.
    ranked = sorted(kept, key=lambda e: hashlib.sha256(f"{seed}\0{e.key()}".encode()).hexdigest())
    for e in ranked[:n_val]:
        e.split = "validation"
    return BuildReport(kept, len(examples) - len(kept), skipped, n_conv - empty, empty)


def write_jsonl(path: Path, examples: Sequence[Example]) -> None:
    from galatea.files import atomic_write

    body = "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples).encode()
    atomic_write(path, lambda f: f.write(body))


# ---- reading a dataset -------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The examples of a dataset file (ours, or any PygmalionAI-style JSONL: no `split` means train)."""
    if not path.is_file():
        raise GalateaError(f"{path}: no such dataset; build one with `galatea train data build`")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GalateaError(f"{path}: not UTF-8 text; expected JSONL") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GalateaError(f"{path}:{i}: not JSON ({e.msg})") from None
        pair = _pyg_pair(row) if isinstance(row, dict) else None
        if pair is None:
            raise GalateaError(f"{path}:{i}: expected an object with 'prompt' and 'generation' strings")
        split = row.get("split", "train")
        if split not in ("train", "validation"):
            raise GalateaError(f"{path}:{i}: split {split!r} is neither 'train' nor 'validation'")
        out.append({**row, "prompt": pair[0], "generation": pair[1], "split": split, "line": i})
    if not out:
        raise GalateaError(f"{path}: the dataset is empty; build one with `galatea train data build`")
    return out


def stats(rows: list[dict[str, Any]], tok: Tokenizer | None = None) -> dict[str, Any]:
    """Counts, token lengths and how much history the window dropped."""
    def lengths(r: dict[str, Any]) -> tuple[int, int]:
        if tok is not None or "prompt_tokens" not in r:
            if tok is None:
                raise GalateaError("this dataset has no token counts; pass --model to count them")
            ids, n = encode_example(tok, r["prompt"], r["generation"])
            return n, len(ids) - n
        return int(r["prompt_tokens"]), int(r["target_tokens"])

    sizes = [lengths(r) for r in rows]

    def summary(values: list[int]) -> dict[str, float]:
        v = sorted(values)
        return {"min": v[0], "mean": round(statistics.fmean(v), 1), "median": statistics.median(v),
                "p95": v[min(len(v) - 1, int(0.95 * len(v)))], "max": v[-1], "total": sum(v)}

    dropped = [int(r.get("messages_dropped", 0)) for r in rows]
    return {
        "examples": len(rows),
        "splits": dict(Counter(r["split"] for r in rows)),
        "sources": len({str(r.get("source", "")).split(":")[0] for r in rows}),
        "prompt_tokens": summary([p for p, _ in sizes]),
        "target_tokens": summary([t for _, t in sizes]),
        "total_tokens": summary([p + t for p, t in sizes]),
        "history": {"examples_with_dropped_messages": sum(1 for d in dropped if d),
                    "messages_dropped": sum(dropped),
                    "example_blocks_dropped": sum(int(r.get("examples_dropped", 0)) for r in rows)},
    }
