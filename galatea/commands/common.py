"""What several commands share: the model flags and loading, the sampling flags, the chat store."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from galatea.engine.sampling import DEFAULT_ORDER, PYGMALION_PRESET
from galatea.errors import GalateaError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """`several`: --model may be given more than once (`galatea serve`)."""
    if several:
        p.add_argument("--model", action="append", help="GGUF file or Hugging Face folder; give it again to serve "
                                                         "several (the first is the default; default: the "
                                                         "embedded SmolLM2-135M)")
    else:
        p.add_argument("--model", help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: bfloat16 where the CPU/GPU has it, else float32)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the physical cores; on a 2-core machine "
                                               "whose other core is kept busy by another program, 1 is faster)")
    p.add_argument("--quant", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="weights in memory; auto keeps the file's precision (GGUF Q4 -> int4, Q5-Q8 -> int8)")
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter folder (PEFT layout, e.g. from `galatea train`), "
                                                 "merged into the weights at load")
    p.add_argument("--kernels", choices=("auto", "avx512", "avx2", "torch"),
                   help="what multiplies quantized weights: the native library's AVX-512 VNNI or AVX2 path, or "
                        "PyTorch's kernels (default: $GALATEA_KERNELS, else auto = the best this CPU has)")
    p.add_argument("--kv-cache", choices=("auto", "float16", "bfloat16", "float32", "q8_0"), default="auto",
                   help="KV cache entries (auto: float16 with the native kernels, else float32 on CPU; q8_0: "
                        "llama.cpp's 8-bit blocks, about half of float16's memory, KoboldCpp's --quantkv 1)")


def models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", metavar="DIR", help="every model in DIR too (GGUF files and Hugging Face folders); "
                                                   "requests choose one by name")


def served_entries(args: argparse.Namespace) -> list[Any]:
    """The models `galatea serve` offers, the default first: each --model, then what --models
    holds (the embedded model when neither is given)."""
    from pathlib import Path

    from galatea.engine.shelf import ModelEntry
    from galatea.model.checkpoint import resolve_model_path

    paths = [resolve_model_path(m) for m in args.model or []]
    entries = [ModelEntry.of(p) for p in paths]
    if args.models:
        given = {p.resolve() for p in paths}
        entries += [e for e in ModelEntry.found_in(Path(args.models).expanduser()) if e.path.resolve() not in given]
        if not entries:
            raise GalateaError(f"{args.models}: no GGUF files or Hugging Face model folders in it")
    return entries or [ModelEntry.of(resolve_model_path(None))]


def engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", metavar="URL",
                   help="let another engine run the model: an OpenAI-compatible completions server (llama.cpp's "
                        "server, llama-cpp-python's, vLLM, aphrodite-engine) at URL; --model then only gives the "
                        "tokenizer and configuration (a vocabulary-only GGUF will do)")


def load_remote_from_args(args: argparse.Namespace) -> Any:
    """The remote engine of --engine, checked (its tokenizer must be --model's)."""
    from galatea.engine.remote import approximations, load_remote
    from galatea.model.checkpoint import resolve_model_path

    if getattr(args, "lora", None):
        raise GalateaError("--lora merges an adapter into Galatea's own weights; with --engine, load the adapter "
                           "in that engine instead")
    engine = load_remote(args.engine, resolve_model_path(args.model), getattr(args, "max_context", None))
    print(f"galatea: the {engine.dialect.name} at {engine.url} runs {engine.name} (context {engine.context}); "
          "prompts are built here", file=sys.stderr)
    for note in approximations(engine.dialect):
        print(f"galatea: {note}", file=sys.stderr)
    return engine


def format_arg(p: argparse.ArgumentParser, what: str) -> None:
    from galatea.chat.formats import names

    p.add_argument("--format", metavar="NAME", type=str.lower,
                   help=f"prompt format {what}: auto (the model's metadata says: its chat template, Metharme's "
                        f"tokens, else Pygmalion), template (the model's own), {', '.join(names())}")


def checked_format(name: str | None) -> str | None:
    """--format's value, refused in one line when it names no format."""
    from galatea.chat.formats import AUTO, TEMPLATE, names

    if name is not None and name not in (AUTO, TEMPLATE, *names()):
        raise GalateaError(f"--format {name}: not a prompt format; use one of {', '.join([AUTO, TEMPLATE, *names()])}")
    return name


def speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-speculative", action="store_true",
                   help="do not draft tokens from the text so far and verify them in the same step "
                        "(speculative decoding: the same replies, sooner when the chat repeats itself)")


def shift_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-context-shift", action="store_true",
                   help="when old turns drop out of the window, recompute the prompt exactly instead of "
                        "moving the cached turns (slower, no drift)")


def confirmed(yes: bool, question: str, refusal: str) -> bool:
    """Whether a deletion may go ahead: --yes, else the user's answer at a terminal; without a
    terminal (a script), `refusal` as the one-line error asking for --yes."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise GalateaError(f"{refusal}; pass --yes to confirm")
    if input(f"{question} [y/N] ").strip().lower() in ("y", "yes"):
        return True
    print("nothing deleted")
    return False


def data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where chats are kept (default: $GALATEA_DATA_DIR or the platform's "
                                      "user data folder)")
    p.add_argument("--store", default=os.environ.get("GALATEA_STORE") or None,
                   help="the chats in PostgreSQL instead: postgresql://USER[:PASSWORD]@HOST[:PORT]/DB "
                        "(default: $GALATEA_STORE; without one, galatea.db in --data-dir)")


def open_store(args: argparse.Namespace) -> Any:
    from galatea.chat.store import Store

    return Store.open_default(args.data_dir, getattr(args, "store", None))


def sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: PygmalionAI's recommended settings)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=PYGMALION_PRESET["max_new_tokens"])
    g.add_argument("--temperature", type=float, default=PYGMALION_PRESET["temperature"], help="0 = greedy")
    g.add_argument("--top-k", type=int, default=PYGMALION_PRESET["top_k"])
    g.add_argument("--top-p", type=float, default=PYGMALION_PRESET["top_p"])
    g.add_argument("--min-p", type=float, default=PYGMALION_PRESET["min_p"])
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--tfs", type=float, default=1.0)
    g.add_argument("--top-a", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=PYGMALION_PRESET["repetition_penalty"])
    g.add_argument("--repetition-penalty-range", type=int, default=PYGMALION_PRESET["repetition_penalty_range"])
    g.add_argument("--repetition-penalty-slope", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS")
    g.add_argument("--ban-token", action="append", type=int, default=[], metavar="ID")
    g.add_argument("--ban-eos", action="store_true", help="never stop on EOS")
    g.add_argument("--sampler-order", default=",".join(map(str, DEFAULT_ORDER)),
                   help="KoboldAI ids: 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen")
    g.add_argument("--seed", type=int, help="makes a run reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> Any:
    from galatea.engine.sampling import SamplingParams

    bias = {}
    for item in args.logit_bias:
        tok, sep, value = item.partition("=")
        try:
            bias[int(tok)] = float(value)
        except ValueError:
            raise GalateaError(f"--logit-bias {item!r}: expected ID=BIAS, e.g. 2=-100") from None
        if not sep:
            raise GalateaError(f"--logit-bias {item!r}: expected ID=BIAS, e.g. 2=-100")
    try:
        order = tuple(int(x) for x in args.sampler_order.split(",") if x.strip())
    except ValueError:
        raise GalateaError(f"--sampler-order {args.sampler_order!r}: expected ids like 6,0,1,3,4,2,5") from None
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, typical_p=args.typical_p, tfs=args.tfs, top_a=args.top_a,
        repetition_penalty=args.repetition_penalty, repetition_penalty_range=args.repetition_penalty_range,
        repetition_penalty_slope=args.repetition_penalty_slope, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=bias, banned_tokens=tuple(args.ban_token),
        ban_eos=args.ban_eos, sampler_order=order, seed=args.seed, stop=tuple(s.encode().decode("unicode_escape")
                                                                           for s in args.stop),
    )


def load_from_args(args: argparse.Namespace) -> Any:
    import torch

    from galatea.model.checkpoint import load

    if args.threads is not None:
        if args.threads < 1:
            raise GalateaError(f"--threads {args.threads}: give at least 1")
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GalateaError("--device cuda: no CUDA device is available; use --device cpu")
    lm = load(args.model, dtype=dtype, device=args.device, quant=args.quant, lora=getattr(args, "lora", None),
              kernels=args.kernels, kv_cache=args.kv_cache)
    print(f"galatea: {lm.kernels_note}", file=sys.stderr)
    return lm
