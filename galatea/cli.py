"""The `galatea` command. Each subcommand is a small function; user mistakes end as one line
`error: ...` on stderr with exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

from galatea import __version__
from galatea.errors import GalateaError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GalateaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galatea",
                                     description="Self-hosted persona chat for LLaMA-architecture models.")
    parser.add_argument("--version", action="version", version=f"galatea {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", help="print the token ids of a text as JSON")
    p.add_argument("--model", help="GGUF file (a vocabulary-only one works) or HF folder")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("inspect", help="describe a checkpoint without loading its weights")
    p.add_argument("path", nargs="?", help="GGUF file or HF folder (default: the embedded model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prompt", help="print the exact Pygmalion prompt a message would send")
    p.add_argument("--model", help="GGUF file or HF folder: its tokenizer and context size are used")
    p.add_argument("--character", help="card file (JSON, PNG, YAML) or bundled name (default: aria)")
    p.add_argument("--message", help="the user's new message (default: none, the reply to the greeting)")
    p.add_argument("--user", default="You", help="the user's display name (Pygmalion was trained on 'You')")
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="reply budget kept free in the context")
    p.add_argument("--max-context", type=int, help="context size (default: the model's)")
    p.add_argument("--json", action="store_true", help="also print token counts and what was dropped")
    p.set_defaults(func=cmd_prompt)

    p = sub.add_parser("bench", help="measure prefill and decode speed, as JSON")
    _model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.set_defaults(func=cmd_bench)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: bfloat16 where the CPU/GPU has it, else float32)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice, the physical cores)")
    p.add_argument("--quant", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="weights in memory; auto keeps the file's precision (GGUF Q4 -> int4, Q5-Q8 -> int8)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: PygmalionAI's recommended settings)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--typical-p", type=float, default=1.0)
    g.add_argument("--tfs", type=float, default=1.0)
    g.add_argument("--top-a", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--repetition-penalty-range", type=int, default=1024)
    g.add_argument("--repetition-penalty-slope", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS")
    g.add_argument("--ban-token", action="append", type=int, default=[], metavar="ID")
    g.add_argument("--ban-eos", action="store_true", help="never stop on EOS")
    g.add_argument("--sampler-order", default="6,0,1,3,4,2,5",
                   help="KoboldAI ids: 0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen")
    g.add_argument("--seed", type=int, help="makes a run reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace) -> Any:
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


def _load(args: argparse.Namespace) -> Any:
    import torch

    from galatea.model.checkpoint import load

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GalateaError("--device cuda: no CUDA device is available; use --device cpu")
    return load(args.model, dtype=dtype, device=args.device, quant=args.quant)


def cmd_generate(args: argparse.Namespace) -> int:
    from galatea.engine.generate import stream_generate

    params = _sampling_params(args)
    params.validate()
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    lm = _load(args)
    ids = lm.tokenizer.encode(prompt, add_bos=False if args.no_bos else None)
    cancel = threading.Event()
    parts: list[str] = []
    last = None
    try:
        for chunk in stream_generate(lm.model, lm.tokenizer, ids, params, cancel):
            parts.append(chunk.text)
            if not args.json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            last = chunk
    except KeyboardInterrupt:
        cancel.set()
        raise
    assert last is not None
    if args.json:
        print(json.dumps({
            "text": "".join(parts), "tokens": last.generated_tokens, "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens, "prefill_tok_s": round(last.prefill_tok_s, 1),
            "decode_tok_s": round(last.decode_tok_s, 1), "seed": last.seed,
        }, ensure_ascii=False))
    else:
        print()
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(args.model))
    print(json.dumps({"ids": tok.encode(args.text, add_bos=False if args.no_bos else None)}))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from galatea.model.checkpoint import resolve_model_path
    from galatea.model.inspect import describe

    info = describe(resolve_model_path(args.path))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} x{v}" for k, v in value.items())
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from galatea.chat.cards import load_character
    from galatea.chat.prompt import Turn, build_prompt
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path
    from galatea.model.inspect import describe

    char = load_character(args.character)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    context = args.max_context or int(describe(path)["context_length"])
    history = [Turn(False, char.first_mes)] if char.first_mes.strip() else []
    result = build_prompt(char, history, args.message, tok, context, args.max_new_tokens, user=args.user)
    if args.json:
        print(json.dumps({"prompt": result.text, **{k: v for k, v in asdict(result).items() if k != "text"},
                          "context": context, "max_new_tokens": args.max_new_tokens}, ensure_ascii=False))
    else:
        print(result.text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from galatea.engine.bench import bench

    if args.prompt_tokens < 16 or args.gen_tokens < 1:
        raise GalateaError("bench: --prompt-tokens must be >= 16 and --gen-tokens >= 1")
    lm = _load(args)
    print(json.dumps(bench(lm, args.prompt_tokens, args.gen_tokens)))
    return 0
