"""`galatea train`: fine-tune on your chats (LoRA or full); `train data build|stats`, `train merge`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from galatea.commands.common import checked_format, data_dir_arg, format_arg, open_store
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    """`galatea train` and its `data build|stats` and `merge` (long: one line per flag)."""
    p = sub.add_parser("train", help="fine-tune a model on your chats (LoRA or full); `train data`, `train merge`",
                       description="Fine-tune: galatea train --model BASE --data data.jsonl --out RUN_DIR. "
                                   "Datasets: galatea train data build|stats. Merge an adapter: galatea train merge.")
    p.add_argument("--model", help="base model: HF folder or GGUF (default: the embedded SmolLM2-135M)")
    p.add_argument("--data", help="dataset JSONL from `galatea train data build` (or PygmalionAI prompt/generation)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, loss.png, and the adapter or model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8, help="rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scale numerator: update * alpha / r (default 16)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input (default 0)")
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names (default: every projection)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 LoRA, 1e-5 full)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, help="linear warmup before the cosine decay (default 5%% of steps)")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="recompute activations in the backward pass: less memory, ~30%% slower "
                        "(auto: only when the run would not fit without it)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast where the CPU/GPU computes bf16 natively, else fp32")
    g.add_argument("--quant", choices=("none", "int8", "int4"), default="none",
                   help="hold the frozen base in 8 or 4 bits (LoRA only, CPU; QLoRA-style: a Q4 GGUF loads its "
                        "blocks as they are). int4 trains LLaMA-7B in about 6 GB instead of 16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, help="steps between validation passes (default: 5 per run)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default: at each validation)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    tsub = p.add_subparsers(dest="train_command", metavar="{data,merge}")

    d = tsub.add_parser("data", help="datasets: build from chats, print statistics")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="chats -> training examples in the model's prompt format (JSONL)")
    b.add_argument("sources", nargs="*", help="SillyTavern .jsonl, text-generation-webui .json, PygmalionAI .jsonl")
    b.add_argument("--out", required=True, help="the dataset file to write (JSONL)")
    b.add_argument("--character", help="the card of the SillyTavern / text-generation-webui chats "
                                       "(file, or a bundled name)")
    b.add_argument("--chat", type=int, action="append", default=[], help="a Galatea chat id (repeatable)")
    b.add_argument("--all-chats", action="store_true", help="every saved Galatea chat")
    b.add_argument("--model", help="whose tokenizer and context size the window uses (default: the embedded model)")
    b.add_argument("--context", type=int, help="context size (default: the model's)")
    format_arg(b, "of the examples (default: auto, what the model's metadata says)")
    b.add_argument("--user", default="You", help="the user's name in the prompts (Pygmalion was trained on 'You')")
    b.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)")
    b.add_argument("--seed", type=int, default=0, help="seeds the train/validation split")
    b.add_argument("--skip-long", action="store_true", help="leave out replies that cannot fit the context")
    b.add_argument("--force", action="store_true", help="overwrite --out")
    data_dir_arg(b)
    b.set_defaults(func=data_build)
    st = dsub.add_parser("stats", help="counts, token lengths and how much history the window dropped")
    st.add_argument("dataset")
    st.add_argument("--model", help="count tokens with this model's tokenizer (default: the counts stored at build)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=data_stats)

    m = tsub.add_parser("merge", help="base + LoRA adapter -> one HF safetensors folder")
    m.add_argument("base", help="the base model the adapter was trained on (HF folder or GGUF)")
    m.add_argument("adapter", help="the adapter folder (PEFT layout)")
    m.add_argument("out", help="the merged HF folder to write")
    m.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="stored dtype (default: the base's; float16 for a quantized GGUF)")
    m.add_argument("--force", action="store_true", help="overwrite a non-empty destination")
    m.set_defaults(func=merge)


def run(args: argparse.Namespace) -> int:
    import torch

    from galatea.train.trainer import Trainer, TrainSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.out:
        raise GalateaError("--out RUN_DIR is required (where checkpoints and the result go)")
    if args.resume:
        run = Path(args.out).expanduser() / "run.json"
        if not run.is_file():
            raise GalateaError(f"{run.parent}: not a training run (no run.json); start it without --resume")
        # the folder may have moved since: it is where the user says it is now
        settings = TrainSettings(**{**json.loads(run.read_text())["settings"], "out": args.out})
    else:
        if not args.data:
            raise GalateaError("--data is required: a dataset from `galatea train data build`")
        names = {f.name for f in fields(TrainSettings)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        settings = TrainSettings(**values)
    trainer = Trainer(settings, resume=args.resume, echo=lambda m: print(m, file=sys.stderr),
                      progress=not args.no_progress)
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after this step (Ctrl-C again to abort without saving)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = trainer.run(stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.status == "stopped":
        print(f"stopped at step {result.step} of {result.total_steps}, checkpoint saved; continue with: "
              f"galatea train --out {args.out} --resume", file=sys.stderr)
        return 130
    return 0


def data_build(args: argparse.Namespace) -> int:
    from galatea.chat import formats
    from galatea.chat.cards import load_character
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path
    from galatea.model.inspect import read_config
    from galatea.train import data

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise GalateaError(f"{out}: already exists; pass --force to overwrite it or choose another --out")
    if not args.sources and not args.chat and not args.all_chats:
        raise GalateaError("nothing to build from: pass chat files, --chat ID or --all-chats")
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    context = args.context or read_config(path).max_position_embeddings
    char = load_character(args.character) if args.character else None
    conversations: list[data.Conversation] = []
    rendered: list[dict[str, Any]] = []
    for src in args.sources:
        convs, rows = data.file_conversations(Path(src).expanduser(), char)
        conversations += convs
        rendered += rows
    if args.chat or args.all_chats:
        store = open_store(args)
        ids = [c.id for c in store.chats()] if args.all_chats else args.chat
        if not ids:
            raise GalateaError("there are no saved Galatea chats; chat first, or pass chat files")
        conversations += list(data.store_conversations(store, ids, optional=args.all_chats))
    fmt = formats.choose(checked_format(args.format), tok)
    report = data.build(conversations, rendered, tok, context, args.val_fraction, args.seed, args.user, args.skip_long,
                        fmt)
    data.write_jsonl(out, report.examples)
    n_val = sum(e.split == "validation" for e in report.examples)
    print(f"wrote {len(report.examples)} examples to {out} ({len(report.examples) - n_val} train, {n_val} validation) "
          f"from {report.conversations} chats and {len(rendered)} PygmalionAI lines; "
          f"{report.duplicates} duplicates removed, {report.skipped} too long skipped"
          + (f", {report.empty} chats without a reply yet skipped" if report.empty else "")
          + f"; prompt format {fmt.name}", file=sys.stderr)
    return 0


def data_stats(args: argparse.Namespace) -> int:
    from galatea.model.checkpoint import load_tokenizer, resolve_model_path
    from galatea.train import data

    tok = load_tokenizer(resolve_model_path(args.model)) if args.model else None
    rows = data.read_jsonl(Path(args.dataset).expanduser())
    if tok is None and any("prompt_tokens" not in r for r in rows):
        tok = load_tokenizer(resolve_model_path(None))
    info = data.stats(rows, tok)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    splits = ", ".join(f"{v} {k}" for k, v in sorted(info["splits"].items()))
    print(f"examples        {info['examples']} ({splits}) from {info['sources']} sources")
    print(f"{'tokens':<16}{'min':>7}{'mean':>9}{'median':>9}{'p95':>7}{'max':>7}{'total':>10}")
    for key, label in (("prompt_tokens", "prompt"), ("target_tokens", "reply + EOS"), ("total_tokens", "example")):
        v = info[key]
        print(f"  {label:<14}{v['min']:>7}{v['mean']:>9}{v['median']:>9}{v['p95']:>7}{v['max']:>7}{v['total']:>10}")
    h = info["history"]
    print(f"history dropped {h['messages_dropped']} messages in {h['examples_with_dropped_messages']} examples "
          f"({100 * h['examples_with_dropped_messages'] / info['examples']:.0f}%), "
          f"{h['example_blocks_dropped']} example dialogues")
    return 0


def merge(args: argparse.Namespace) -> int:
    import torch

    from galatea.model.adapter import Adapter
    from galatea.model.checkpoint import resolve_model_path
    from galatea.model.config import ModelConfig
    from galatea.model.inspect import read_config
    from galatea.model.llama import Llama
    from galatea.weights.convert import gguf_to_hf, hf_to_safetensors

    base = resolve_model_path(args.base)
    adapter = Adapter(args.adapter)
    cfg: ModelConfig = read_config(base)
    with torch.device("meta"):
        adapter.check_names({n for n, _ in Llama(cfg).named_parameters()})
    dst = Path(args.out).expanduser()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if base.is_dir():
        hf_to_safetensors(base, dst, dtype, force=args.force, transform=adapter.merge)
    else:
        gguf_to_hf(base, dst, dtype, force=args.force, transform=adapter.merge)
    print(f"wrote {dst}: {base.name} with the adapter {Path(args.adapter).name} merged ({len(adapter.pairs)} "
          "matrices); next: galatea convert --to gguf, or galatea xor create", file=sys.stderr)
    return 0
