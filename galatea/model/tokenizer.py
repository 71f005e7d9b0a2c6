"""Tokenizers that give exactly the reference token ids.

- LLaMA / Pygmalion vocabulary: SentencePiece itself, from `tokenizer.model`, or from a
  `ModelProto` built from a GGUF file's pieces, scores and types. (Converting it to a `tokenizers`
  BPE, as transformers does for GGUF, differs from SentencePiece on leading and repeated spaces.)
- GPT-2 style byte-level BPE (SmolLM2): Hugging Face `tokenizers`, from `tokenizer.json` or built
  from a GGUF file's tokens and merges with the pre-tokenizer its `tokenizer.ggml.pre` names.

Special tokens: SentencePiece treats `<s>`/`</s>` typed by a user as plain text (so does
llama.cpp); `tokenizers` matches its added tokens, as transformers does.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Protocol

from galatea.errors import GalateaError


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def piece(self, token_id: int) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def piece_id(self, piece: str) -> int | None: ...


class Tokenizer:
    """Text <-> token ids, with the BOS policy of the checkpoint."""

    def __init__(self, backend: _Backend, kind: str, vocab_size: int, bos_id: int | None,
                 eos_id: int | None, add_bos: bool, chat_template: str | None = None) -> None:
        self._backend = backend
        self.kind = kind  # "sentencepiece" or "bpe"
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template or None  # the model's Jinja chat template, if it has one

    def piece(self, token_id: int | None) -> str:
        """A token's text as the vocabulary spells it (`<s>`, `<|im_end|>`); "" for None."""
        return "" if token_id is None else self._backend.piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (OpenAI's logprobs `bytes`): a token holding part of a
        character has only those bytes, which its text cannot show. Control tokens: none."""
        return self._backend.token_bytes(token_id)

    def has_piece(self, piece: str) -> bool:
        """Whether the vocabulary holds `piece` as one token (Metharme's `<|model|>`...)."""
        return self._backend.piece_id(piece) is not None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's spelling, in characters (a byte-level token spells a byte as one)."""
        return max(1, max((len(self._backend.piece(i)) for i in range(self.vocab_size)), default=1))

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, without tokenizing it: no token covers more
        characters than the longest one spells (halved again for normalizers that drop some).
        What cannot fit a context is refused or cut by this, before seconds of tokenizing."""
        return len(text) // (2 * self.max_token_chars)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(list(ids))


class _SentencePiece:
    def __init__(self, proto: bytes) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise GalateaError(f"tokenizer.model: not a SentencePiece model ({e}); the file is corrupt") from None

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)

    def piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.sp.IdToPiece(token_id)
        if self.sp.IsByte(token_id):  # byte fallback: "<0xE2>"
            return bytes([int(piece[3:5], 16)])
        if self.sp.IsControl(token_id) or self.sp.IsUnknown(token_id):
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return i if i != self.sp.unk_id() or piece == self.sp.IdToPiece(i) else None


class _HFTokenizers:
    def __init__(self, tk: Any) -> None:
        self.tk = tk
        # byte-level BPE spells each byte as one character (GPT-2's table); others spell text
        self.byte_of = _gpt2_bytes() if type(tk.decoder).__name__ == "ByteLevel" else None
        self.added = set(tk.get_added_tokens_decoder())

    def encode(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not): a long prompt being
        # tokenized on a worker thread then does not stop the server's event loop
        return self.tk.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id) or ""

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.piece(token_id)
        if token_id in self.added:
            return piece.encode("utf-8")
        if self.byte_of is not None and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # Metaspace: "▁" is a space

    def piece_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)


def _gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others for 256 + their rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


# ---- Hugging Face folders ---------------------------------------------------------------------

def from_hf_folder(folder: Path, config: dict[str, Any]) -> Tokenizer:
    tok_cfg = _read_optional_json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.model").exists():
        backend = _SentencePiece((folder / "tokenizer.model").read_bytes())
        sp = backend.sp
        add_bos = tok_cfg.get("add_bos_token", True)
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = sp.eos_id() if sp.eos_id() >= 0 else None
        return Tokenizer(backend, "sentencepiece", sp.GetPieceSize(), bos, eos, bool(add_bos),
                         hf_chat_template(folder, tok_cfg))
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTok

        try:
            tk = HFTok.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exception on bad files
            raise GalateaError(f"{folder / 'tokenizer.json'}: cannot be read ({e}); the file is corrupt") from None
        bos = _special_id(tk, tok_cfg.get("bos_token"), config.get("bos_token_id"))
        eos = _special_id(tk, tok_cfg.get("eos_token"), config.get("eos_token_id"))
        if "add_bos_token" in tok_cfg:
            add_bos = bool(tok_cfg["add_bos_token"])
        else:  # no explicit flag: does the file's own post-processor add BOS?
            probe = tk.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and bos is not None and probe[0] == bos
        return Tokenizer(_HFTokenizers(tk), "bpe", tk.get_vocab_size(with_added_tokens=True), bos, eos, add_bos,
                         hf_chat_template(folder, tok_cfg))
    raise GalateaError(f"{folder}: no tokenizer found (expected tokenizer.model or tokenizer.json)")


def hf_chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The folder's chat template: `chat_template.jinja` (transformers >= 4.43 writes it apart),
    else `tokenizer_config.json`'s, which may also be a list of named templates ("default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    value = tok_cfg.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value.strip() else None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GalateaError(f"{path}: not valid JSON ({e}); the file is corrupt") from None


def _special_id(tk: Any, token: Any, fallback: Any) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and tk.token_to_id(token) is not None:
        return tk.token_to_id(token)
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return None if fallback is None else int(fallback)


# ---- GGUF vocabularies -------------------------------------------------------------------------

def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GalateaError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template") if isinstance(meta.get("tokenizer.chat_template"), str) else None
    if model == "llama":
        backend = _SentencePiece(spm_proto_from_gguf(meta))
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        return Tokenizer(backend, "sentencepiece", len(tokens), bos, eos, bool(add_bos), template)
    if model == "gpt2":
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        return Tokenizer(_HFTokenizers(bpe_from_gguf(meta)), "bpe", len(tokens), bos, eos, bool(add_bos), template)
    raise GalateaError(f"GGUF tokenizer {model!r} is not supported (only 'llama' SentencePiece and 'gpt2' BPE)")


def spm_proto_from_gguf(meta: dict[str, Any]) -> bytes:
    """A SentencePiece BPE `ModelProto` equivalent to LLaMA's tokenizer.model.

    GGUF token types use SentencePiece's own numbering (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte), so they copy across unchanged."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    n = len(tokens)
    scores = [0.0] * n if scores is None or len(scores) == 0 else [float(s) for s in scores]
    types = [1] * n if types is None or len(types) == 0 else [int(t) for t in types]
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        sp = proto.pieces.add()
        sp.piece, sp.score, sp.type = piece, score, kind
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = 6 in types
    ts.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    for field, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        setattr(ts, field, -1 if value is None else int(value))
    ts.pad_id = -1
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


# llama.cpp's `tokenizer.ggml.pre` names -> how HF tokenizers pre-splits text for that vocabulary.
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "phi-2", "jais", "refact", "poro-chat"}
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "falcon"}
# Vocabularies whose merges were learned on another split (the patterns of their tokenizer.json):
# Llama 3 groups digits by three, Qwen2 keeps each digit alone, Mistral's Tekken splits on case.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
           "deepseek-r1-qwen": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT}


def bpe_from_gguf(meta: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = meta.get("tokenizer.ggml.merges") or []
    types = meta.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None or len(types) == 0 else [int(t) for t in types]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTok(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLITS:
        from tokenizers import Regex

        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_PRE:
            print(f"galatea: GGUF pre-tokenizer {pre!r} is not known; splitting text as GPT-2 does, "
                  "token ids may differ from the model's own tokenizer", file=sys.stderr)
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    return tk
