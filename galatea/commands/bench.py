"""`galatea bench [SCENARIO]`: measure speed, as JSON on stdout (tables on stderr).

Scenarios: `decode` (the default: prefill and decode of one stream), `suite` (all of them,
llama.cpp side by side), `chat-turn`, `concurrent`, `replay`, `train`, `xor`, `engine` (Galatea in
front of a remote engine). The older spelling
as flags (`galatea bench --suite`, `--replay SESSION`, ...) still works."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from galatea.commands.common import load_from_args, model_args, speculative_arg
from galatea.errors import GalateaError

SCENARIOS = {
    "decode": "prefill and decode tokens/s of one stream (the default)",
    "suite": "every scenario (load, prefill/decode, new chat turn, 1/4/8 streams) as JSON and a table, next to "
             "llama.cpp when llama-cpp-python is available",
    "chat-turn": "time to first token of a new chat turn at full context: recompute vs prefix reuse vs context shift",
    "concurrent": "aggregate tokens/s of 1, 4 and 8 simultaneous requests (batched)",
    "replay": "replay a recorded front-end session (e.g. tests/data/sillytavern-session/seraphina.jsonl) through "
              "the Kobold API, with and without speculative decoding",
    "train": "LoRA training tokens/s (batches of 4x128), next to transformers + peft when they are installed",
    "xor": "XOR apply throughput vs the original codec's algorithm, on random files",
    "engine": "aggregate tokens/s of --streams clients straight to a remote engine (--engine URL) and through "
              "Galatea in front of it",
}


def _flags(p: argparse.ArgumentParser, legacy: bool = False) -> None:
    """The flags every scenario reads (each ignores those of the others)."""
    model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=2048, help="chat-turn, suite: the context size (default 2048)")
    p.add_argument("--llama-cpp-python", metavar="PYTHON",
                   help="suite: an interpreter that has llama_cpp (default: this one, if it does)")
    p.add_argument("--out", help="suite: also write the JSON to this file")
    p.add_argument("--llama-bench", metavar="PATH",
                   help="decode: llama.cpp's own llama-bench binary, run on the same model and threads right after "
                        "(its pp/tg figures and Galatea's ratio to them)")
    p.add_argument("--replay-max-length", type=int, metavar="N",
                   help="replay: reply length instead of the recorded one")
    p.add_argument("--replay-temperature", type=float, metavar="T",
                   help="replay: this temperature instead of the recorded one (0: greedy)")
    p.add_argument("--size-mb", type=int, default=1024, help="xor: size of the file pair in MiB")
    p.add_argument("--dir", help="xor: where to write the temporary files (default: the system's temp)")
    p.add_argument("--engine", metavar="URL", help="engine: the remote engine's base URL")
    p.add_argument("--streams", type=int, default=4, help="engine: clients at once (default 4)")
    speculative_arg(p)
    if legacy:  # `galatea bench --suite` and friends, as documented before scenarios were words
        g = p.add_argument_group("scenarios as flags (the same as `galatea bench SCENARIO`)")
        for flag in ("suite", "chat-turn", "concurrent", "train", "xor"):
            g.add_argument(f"--{flag}", action="store_true", help=f"= galatea bench {flag}")
        g.add_argument("--replay", metavar="SESSION.jsonl", help="= galatea bench replay SESSION.jsonl")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure speed, as JSON (scenarios: " + ", ".join(SCENARIOS) + ")",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _flags(p, legacy=True)
    p.set_defaults(func=run, scenario=None)
    scenarios = p.add_subparsers(dest="scenario", metavar="SCENARIO")
    for name, text in SCENARIOS.items():
        s = scenarios.add_parser(name, help=text, description=text)
        if name == "replay":
            s.add_argument("session", metavar="SESSION.jsonl", help="the recorded session")
        _flags(s)
        s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    scenario = args.scenario or next((name for name in ("suite", "chat_turn", "concurrent", "train", "xor")
                                      if getattr(args, name, False)), None) \
        or ("replay" if getattr(args, "replay", None) else "decode")
    if scenario == "replay" and not getattr(args, "session", None):
        args.session = args.replay
    return RUNNERS[scenario.replace("-", "_")](args)


def _json(result: Any) -> int:
    print(json.dumps(result))
    return 0


def _loaded(args: argparse.Namespace) -> tuple[Any, float]:
    if args.prompt_tokens < 16 or args.gen_tokens < 1:
        raise GalateaError("bench: --prompt-tokens must be >= 16 and --gen-tokens >= 1")
    t = time.perf_counter()
    lm = load_from_args(args)
    return lm, time.perf_counter() - t


def decode(args: argparse.Namespace) -> int:
    from galatea.bench.generation import bench, llama_bench

    lm, _ = _loaded(args)
    result = bench(lm, args.prompt_tokens, args.gen_tokens)
    if args.llama_bench:
        theirs = llama_bench(args.llama_bench, lm.path, args.prompt_tokens, args.gen_tokens, result["threads"])
        result["llama_bench"] = theirs
        result["prefill_ratio"] = round(result["prefill_tok_s"] / theirs["prefill_tok_s"], 2)
        result["decode_ratio"] = round(result["decode_tok_s"] / theirs["decode_tok_s"], 2)
        print(f"prefill {result['prefill_tok_s']} vs {theirs['prefill_tok_s']} tok/s ({result['prefill_ratio']}x), "
              f"decode {result['decode_tok_s']} vs {theirs['decode_tok_s']} tok/s ({result['decode_ratio']}x)",
              file=sys.stderr)
    return _json(result)


def suite(args: argparse.Namespace) -> int:
    from galatea.bench.suite import format_table, run_suite

    lm, load_s = _loaded(args)
    result = run_suite(lm, load_s, args.context, args.prompt_tokens, args.gen_tokens, args.llama_cpp_python)
    print(format_table(result), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return _json(result)


def chat_turn(args: argparse.Namespace) -> int:
    from galatea.bench.generation import bench_chat_turn

    lm, _ = _loaded(args)
    if not 256 <= args.context <= lm.config.max_position_embeddings:
        raise GalateaError(f"bench: --context must be between 256 and the model's {lm.config.max_position_embeddings}")
    return _json(bench_chat_turn(lm, args.context))


def concurrent(args: argparse.Namespace) -> int:
    from galatea.bench.generation import bench_concurrent

    lm, _ = _loaded(args)
    tokens = args.gen_tokens if args.gen_tokens != 128 else 64
    # plain decoding always; with speculation too unless --no-speculative: on repetitive text it
    # inflates the one-stream figure, so the N-vs-1 ratio means most without it
    plain = bench_concurrent(lm, gen_tokens=tokens, speculative=False)
    if args.no_speculative:
        return _json(plain)
    return _json({"plain": plain, "speculative": bench_concurrent(lm, gen_tokens=tokens, speculative=True)})


def replay(args: argparse.Namespace) -> int:
    from galatea.bench.replay import format_table, read_session
    from galatea.bench.replay import replay as run_replay

    turns = read_session(Path(args.session))
    if args.replay_temperature is not None:
        if not 0 <= args.replay_temperature <= 100:
            raise GalateaError("bench: --replay-temperature must be between 0 and 100")
        turns = [{**t, "body": {**t["body"], "temperature": args.replay_temperature}} for t in turns]
    lm, _ = _loaded(args)
    on = run_replay(lm, turns, speculative=True, max_length=args.replay_max_length)
    off = run_replay(lm, turns, speculative=False, max_length=args.replay_max_length)
    print(format_table(on, off), file=sys.stderr)
    return _json({"speculative": on, "plain": off})


def train(args: argparse.Namespace) -> int:
    from galatea.bench.training import bench_train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return _json(bench_train(args.model))


def xor(args: argparse.Namespace) -> int:
    from galatea.bench.xor import bench_xor

    if args.size_mb < 1:
        raise GalateaError("bench: --size-mb must be >= 1")
    return _json(bench_xor(args.size_mb, args.dir))


def engine(args: argparse.Namespace) -> int:
    from galatea.bench.remote import bench_engine
    from galatea.model.checkpoint import resolve_model_path

    if not args.engine:
        raise GalateaError("bench engine: pass --engine URL (e.g. llama.cpp's llama-server started with -np 4)")
    if args.streams < 1:
        raise GalateaError("bench: --streams must be >= 1")
    result = bench_engine(args.engine, resolve_model_path(args.model), args.streams, args.gen_tokens)
    print(f"{result['streams']} streams: {result['direct_tok_s']} tok/s straight to the {result['engine']}, "
          f"{result['through_galatea_tok_s']} through Galatea ({result['ratio']}x)", file=sys.stderr)
    return _json(result)


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "decode": decode, "suite": suite, "chat_turn": chat_turn, "concurrent": concurrent, "replay": replay,
    "train": train, "xor": xor, "engine": engine,
}
