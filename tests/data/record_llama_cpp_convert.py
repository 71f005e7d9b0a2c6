"""Record what llama.cpp does with GGUF files written by `galatea convert`, as a golden file.

llama.cpp is the reference GGUF reader: if it loads our files and its greedy continuation of a
prompt equals Galatea's on the same file, the names, q/k permutation, metadata and tokenizer keys
we write mean to llama.cpp what they mean to us. The embedded SmolLM2 GGUF is converted to an HF
folder and back to GGUF F16 and Q8_0. Regenerate (llama-cpp-python installed in another venv,
benchmark-only, never a Galatea dependency):

    python tests/data/record_llama_cpp_convert.py .venv/bin/galatea > tests/data/llama_cpp_convert.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "Aria's Persona: A cheerful bard who loves her lute.\n<START>\nYou: Hello! Who are you?\nAria:"
TOKENS = 24


def main() -> None:
    from llama_cpp import Llama, __version__

    galatea = sys.argv[1]
    embedded = subprocess.run([str(Path(galatea).parent / "python"), "-c",
                               "from galatea.model.checkpoint import embedded_model_path as e; print(e())"],
                              check=True, capture_output=True, text=True).stdout.strip()
    out = {"llama_cpp_python": __version__, "prompt": PROMPT, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        subprocess.run([galatea, "convert", "-q", embedded, str(hf), "--to", "safetensors"], check=True,
                       stdout=subprocess.DEVNULL)
        for kind in ("f16", "q8_0"):
            path = Path(tmp) / f"smol-{kind}.gguf"
            subprocess.run([galatea, "convert", "-q", str(hf), str(path), "--to", "gguf", "--type", kind], check=True,
                           stdout=subprocess.DEVNULL)
            llm = Llama(str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=False)
            prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
            ids = []
            for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                ids.append(int(tok))
                if len(ids) == TOKENS:
                    break
            out["results"][kind] = {"prompt_ids": prompt_ids, "greedy_ids": ids,
                                    "text": llm.detokenize(ids).decode("utf-8", "replace")}
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
