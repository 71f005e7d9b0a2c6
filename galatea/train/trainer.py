"""`galatea train`: LoRA (default) or full fine-tuning on a dataset of persona replies.

The loop is nanoGPT's, spelled out: AdamW, linear warmup then cosine decay, gradient
accumulation, gradient clipping, bf16 autocast where the hardware computes bf16, gradient
checkpointing, evaluation on the validation split. Only reply tokens carry loss, and the loss is
the mean over the reply tokens of a whole optimizer step (so accumulating micro-batches equals one
big batch).

Everything that decides the run's numbers is reproducible from the seed: the data order of epoch e
is a permutation drawn from a generator seeded with (seed, e), never from the global RNG, and a
checkpoint holds the trainable weights, the optimizer and scheduler states and the RNG state
(dropout). Resuming from a checkpoint therefore continues bit for bit where the run stopped.

The run folder:

    run.json            the settings (a resumed run reads them back)
    metrics.jsonl       one line per step (loss, lr, tokens/s) and per evaluation
    loss.png            the loss curve
    checkpoint-000040/  trainable.safetensors + state.pt, the last few kept
    adapter/            the result, PEFT layout (LoRA) -- or model/, an HF folder (--full)
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from galatea.errors import GalateaError
from galatea.model.adapter import DEFAULT_TARGETS, LoraSettings
from galatea.progress import step_bar
from galatea.train import memory
from galatea.train.data import IGNORE, Sample, read_jsonl, tokenize_rows
from galatea.train.export import plot_losses, save_full_model
from galatea.train.lora import add_lora, save_adapter

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainSettings:
    model: str
    data: str
    out: str
    full: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # as mlx-lm; dropout's RNG costs a fifth of a CPU step
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # default 2e-4 for LoRA, 1e-5 for full fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # default: 5% of the steps
    max_grad_norm: float = 1.0
    gradient_checkpointing: str = "auto"  # auto: only when the run would not fit without it
    precision: str = "auto"
    quant: str = "none"  # the frozen base's linear layers: none, int8 or int4 (QLoRA-style, LoRA only)
    seed: int = 0
    eval_every: int | None = None  # default: five evaluations per run
    save_every: int | None = None  # default: with every evaluation
    keep_checkpoints: int = 2
    device: str | None = None

    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise GalateaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise GalateaError("--steps must be at least 1")
        if self.epochs <= 0:
            raise GalateaError("--epochs must be positive")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise GalateaError(f"--gradient-checkpointing {self.gradient_checkpointing!r}: use auto, on or off")
        if self.quant not in ("none", "int8", "int4"):
            raise GalateaError(f"--quant {self.quant!r}: use none, int8 or int4")
        if self.full and self.quant != "none":
            raise GalateaError("--full trains every weight, which needs them in float; drop --quant, or train a LoRA")
        if self.precision not in PRECISIONS:
            raise GalateaError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.lr is not None and self.lr <= 0:
            raise GalateaError("--lr must be positive")
        if not self.full:
            self.lora().validate()


@dataclass
class Result:
    status: str  # "done" or "stopped"
    step: int
    total_steps: int
    output: Path | None  # the adapter or model folder, when done
    final_eval_loss: float | None


@dataclass
class Run:
    """A prepared run: what the loop needs (Trainer.prepare builds it)."""

    path: Path  # the base model
    lm: Any
    model: nn.Module
    params: list[Tensor]  # the trainable ones
    opt: torch.optim.Optimizer
    sched: Any
    train: list[Sample]
    val: list[Sample]
    dev: torch.device
    bf16: bool
    checkpointing: bool
    pad: int
    start: int  # the step to start from (a resumed run's checkpoint)
    total: int
    mb_per_epoch: int
    eval_every: int
    save_every: int
    orders: dict[int, list[list[int]]] = field(default_factory=dict)  # epoch -> its micro-batches


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The share of the peak learning rate at `step`: linear warmup over `warmup` steps, then
    cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, settings: TrainSettings, resume: bool = False, echo: Callable[[str], None] = print,
                 progress: bool = True) -> None:
        self.s, self.echo, self.show_progress = settings, echo, progress
        self.out = Path(settings.out).expanduser()
        self.resume = resume
        settings.validate()

    # ---- setup -----------------------------------------------------------------------------------

    def _prepare_folder(self) -> int:
        """The step to start from (that of the latest checkpoint when resuming)."""
        if self.resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                raise GalateaError(f"{self.out}: no checkpoint to resume from; start the run without --resume")
            return int(ckpt.name.split("-")[1])
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise GalateaError(f"{self.out}: already exists; pass --resume to continue that run, "
                               "or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        return 0

    def _device_and_precision(self) -> tuple[torch.device, bool]:
        from galatea.model.checkpoint import default_device, default_dtype

        if self.s.device == "cuda" and not torch.cuda.is_available():
            raise GalateaError("--device cuda: no CUDA device is available; use --device cpu")
        dev = torch.device(self.s.device) if self.s.device else default_device()
        if self.s.precision == "auto":
            bf16 = default_dtype(dev) == torch.bfloat16
        else:
            bf16 = self.s.precision == "bf16"
        return dev, bf16

    def _check_base(self, path: Path) -> None:
        from galatea.model import hf_folder

        if path.is_dir() and (path / "config.json").is_file():
            if "quantization_config" in hf_folder.read_json(path / "config.json"):
                raise GalateaError(f"{path}: this folder is quantized for inference (`galatea quantize`); train from "
                                   "the original weights (an HF folder or a GGUF)")
        elif path.is_file():
            with path.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise GalateaError(f"{path}: not a model this can train; pass a Hugging Face folder (safetensors "
                                       "or .bin shards with config.json) or a GGUF file")

    def _check_memory(self, cfg: Any, samples: list[Sample], dev: torch.device, bf16: bool) -> bool:
        """Print the estimate; refuse with advice when the run cannot fit. Returns whether to
        use gradient checkpointing (with "auto": only when the run does not fit without it)."""
        s = self.s
        longest = max(len(x.ids) for x in samples)
        most_targets = sum(sorted((sum(1 for v in x.labels if v != IGNORE) for x in samples), reverse=True)
                           [: s.batch_size])
        act = 2 if bf16 else 4
        base = 2 if bf16 else 4

        def need(full: bool, checkpointing: bool = True, quant: str = s.quant) -> memory.Estimate:
            return memory.estimate(cfg, full, base, act, s.batch_size, longest, most_targets,
                                   checkpointing, s.lora_r, tuple(s.lora_targets), "none" if full else quant)

        have = memory.available(dev)
        # A quantized base is dequantized layer by layer: without recomputation autograd would keep
        # every layer's float weights for the backward pass, the very memory quantizing saves.
        checkpointing = s.gradient_checkpointing == "on" or s.quant != "none" or (
            s.gradient_checkpointing == "auto" and need(s.full, False).total > 0.9 * have)
        est = need(s.full, checkpointing)
        where = "GPU" if dev.type == "cuda" else "this machine"
        self.echo(f"memory: about {memory.gb(est.total)} needed (weights {memory.gb(est.weights)}, trainable state "
                  f"{memory.gb(est.trainable_state)}, activations {memory.gb(est.activations)}); {where} has "
                  f"{memory.gb(have)} available{'; gradient checkpointing on' if checkpointing else ''}")
        if est.total > have:
            advice = []
            if s.full and need(False).total <= have:
                advice.append(f"use LoRA (drop --full), which needs about {memory.gb(need(False).total)}")
            if not s.full and s.quant != "int4":
                q4 = need(False, quant="int4").total
                if q4 <= have:
                    advice.append(f"hold the base in 4 bits with --quant int4, which needs about {memory.gb(q4)}")
            if not checkpointing:
                advice.append("use --gradient-checkpointing on")
            if s.batch_size > 1:
                advice.append("lower --batch-size and raise --grad-accum")
            if not bf16:
                advice.append("use --precision bf16")
            raise GalateaError(
                f"{'full fine-tuning' if s.full else 'LoRA training'} of this {est.parameters / 1e9:.2f}B-parameter "
                f"model needs about {memory.gb(est.total)} but {where} has {memory.gb(have)} available; "
                + ("; or ".join(advice) if advice else "use a smaller model or a machine with more memory"))
        return checkpointing

    # ---- the run ---------------------------------------------------------------------------------

    def prepare(self) -> Run:
        """Everything before the first step: the folder, the data, the memory check, the model
        with its trainable parameters, the optimizer and schedule, a checkpoint when resuming."""
        from galatea.model.checkpoint import load, load_tokenizer, resolve_model_path
        from galatea.model.inspect import read_config

        s = self.s
        start = self._prepare_folder()
        path = resolve_model_path(s.model)
        self._check_base(path)
        rows = read_jsonl(Path(s.data).expanduser())
        train_rows = [r for r in rows if r["split"] == "train"]
        val_rows = [r for r in rows if r["split"] == "validation"]
        if not train_rows:
            raise GalateaError(f"{s.data}: no training examples (all {len(rows)} are in the validation split)")
        cfg = read_config(path)
        tok = load_tokenizer(path)
        train = tokenize_rows(tok, train_rows, cfg.max_position_embeddings, s.data, path)
        val = tokenize_rows(tok, val_rows, cfg.max_position_embeddings, s.data, path)
        dev, bf16 = self._device_and_precision()
        checkpointing = self._check_memory(cfg, train + val, dev, bf16)

        mb_per_epoch = math.ceil(len(train) / s.batch_size)
        steps_per_epoch = math.ceil(mb_per_epoch / s.grad_accum)
        total = s.steps or max(1, math.ceil(s.epochs * steps_per_epoch))
        warmup = s.warmup_steps if s.warmup_steps is not None else max(1, round(0.05 * total))
        peak = s.lr or (1e-5 if s.full else 2e-4)
        eval_every = s.eval_every or max(1, math.ceil(total / 5))
        self.echo(f"{'full fine-tuning' if s.full else 'LoRA'} on {len(train)} examples ({len(val)} for validation), "
                  f"{total} steps of {s.batch_size}x{s.grad_accum}, lr {peak:g}, "
                  f"{'bf16' if bf16 else 'fp32'} on {dev.type}" + (f", base in {s.quant}" if s.quant != "none" else ""))

        torch.manual_seed(s.seed)
        base_dtype = torch.float32 if (s.full or not bf16) else torch.bfloat16
        # torch's kernels: the frozen quantized base needs a backward pass, which the native ones lack
        lm = load(path, dtype=base_dtype, device=dev, quant=s.quant, fuse=False, kernels="torch")
        model = lm.model
        if s.full:
            if lm.config.architecture not in ("llama", "mistral", "qwen2", "qwen3"):
                raise GalateaError(f"--full on a {lm.config.architecture} model is not supported (its weights would "
                                   "be saved under Galatea's own names); train a LoRA instead")
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            add_lora(model, s.lora())
        model.train()
        if not self.resume:  # written once the model loaded: a run that never started leaves no trace
            info = {"settings": asdict(s), "total_steps": total, "warmup_steps": warmup, "lr": peak,
                    "train_examples": len(train), "validation_examples": len(val), "base": str(path)}
            (self.out / "run.json").write_text(json.dumps(info, indent=2))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=peak, betas=(0.9, 0.999), foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda st: lr_factor(st, total, warmup))
        if start:
            self._load_checkpoint(self.out / f"checkpoint-{start:06d}", model, opt, sched, dev)
            self.echo(f"resuming at step {start} of {total}")
            _truncate_metrics(self.out / "metrics.jsonl", start)
        return Run(path, lm, model, params, opt, sched, train, val, dev, bf16, checkpointing,
                   pad=tok.eos_id if tok.eos_id is not None else 0, start=start, total=total,
                   mb_per_epoch=mb_per_epoch, eval_every=eval_every, save_every=s.save_every or eval_every)

    def run(self, stop: threading.Event | None = None, on_step: Callable[[int], None] | None = None) -> Result:
        """Train until done or until `stop` is set (then a checkpoint is written at the step
        boundary and the result says "stopped"). `on_step(step)` runs after each step."""
        r = self.prepare()
        bar = step_bar(self.show_progress, r.total, r.start)
        metrics = (self.out / "metrics.jsonl").open("a")

        def validate(step: int) -> float:
            loss = evaluate(r.model, r.val, r.pad, r.dev, self.s.batch_size, r.bf16)
            ppl = math.exp(min(loss, 50))
            _log(metrics, {"step": step, "eval_loss": round(loss, 6), "eval_perplexity": round(ppl, 4)})
            bar.write(f"step {step}/{r.total}: validation loss {loss:.4f} (perplexity {ppl:.2f})")
            return loss

        t0, last_eval, status, step = time.perf_counter(), None, "done", r.start
        try:
            if r.val and step == 0:  # the base model's score: what the curve starts from
                last_eval = validate(0)
            while step < r.total:
                row = self._step(r, step)
                step += 1
                _log(metrics, {"step": step, **row, "elapsed_s": round(time.perf_counter() - t0, 2)})
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if r.val and (step % r.eval_every == 0 or step == r.total):
                    last_eval = validate(step)
                stopping = stop is not None and stop.is_set()
                if step % r.save_every == 0 or step == r.total or stopping:
                    self._save_checkpoint(step, r.model, r.opt, r.sched, r.dev)
                    plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
                if on_step is not None:
                    on_step(step)
                if stopping and step < r.total:
                    status = "stopped"
                    break
        finally:
            bar.close()
            metrics.close()
        output = self._save_result(r.model, r.lm, r.path, r.bf16) if status == "done" else None
        return Result(status, step, r.total, output, last_eval)

    def _step(self, r: Run, step: int) -> dict[str, Any]:
        """One optimizer step (its `grad_accum` micro-batches); returns its metrics row. The loss
        is the mean over the reply tokens of the whole step."""
        s = self.s
        batches = [self._micro_batch(r, step * s.grad_accum + k) for k in range(s.grad_accum)]
        n_target = sum(v != IGNORE for b in batches for x in b for v in x.labels)
        n_tokens = sum(len(x.ids) for b in batches for x in b)
        r.opt.zero_grad(set_to_none=True)
        loss_sum, tic = 0.0, time.perf_counter()
        for b in batches:
            ids, labels = collate(b, r.pad, r.dev)
            with torch.autocast(r.dev.type, dtype=torch.bfloat16, enabled=r.bf16):
                nll = nll_sum(r.model, ids, labels, r.checkpointing)
            (nll / n_target).backward()
            loss_sum += float(nll.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(r.params, s.max_grad_norm))
        lr = r.opt.param_groups[0]["lr"]
        r.opt.step()
        r.sched.step()
        dt = time.perf_counter() - tic
        return {"epoch": round((step + 1) * s.grad_accum / r.mb_per_epoch, 4), "loss": round(loss_sum / n_target, 6),
                "lr": lr, "grad_norm": round(grad_norm, 6), "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / dt, 1)}

    def _micro_batch(self, r: Run, m: int) -> list[Sample]:
        """Micro-batch `m` of the run: epoch e's order is a pure function of (seed, e)."""
        epoch, j = divmod(m, r.mb_per_epoch)
        if epoch not in r.orders:
            r.orders[epoch] = epoch_batches([len(x.ids) for x in r.train], self.s.batch_size, self.s.seed, epoch)
        return [r.train[i] for i in r.orders[epoch][j]]

    # ---- checkpoints -----------------------------------------------------------------------------

    def _save_checkpoint(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                         dev: torch.device) -> None:
        from safetensors.torch import save_file

        final = self.out / f"checkpoint-{step:06d}"
        if final.exists():
            return
        tmp = self.out / f".checkpoint-{step:06d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        trainable = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        torch.save(state, tmp / "state.pt")
        tmp.rename(final)  # a checkpoint folder either is complete or does not exist
        for old in sorted(self.out.glob("checkpoint-*"))[: -self.s.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, folder: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                         dev: torch.device) -> None:
        from safetensors.torch import load_file

        tensors = load_file(folder / "trainable.safetensors")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(tensors) != set(params):
            raise GalateaError(f"{folder}: the checkpoint does not match this run's model and settings")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        state = torch.load(folder / "state.pt", map_location=dev, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), dev)

    def _save_result(self, model: nn.Module, lm: Any, base: Path, bf16: bool) -> Path:
        if not self.s.full:
            folder = self.out / "adapter"
            save_adapter(model, self.s.lora(), str(base), folder)
            self.echo(f"done: the adapter is in {folder}\n  chat with it: galatea chat --model {base} --lora {folder}"
                      f"\n  merge it:     galatea train merge {base} {folder} MERGED_DIR")
            return folder
        folder = self.out / "model"
        save_full_model(model, lm, base, folder, torch.bfloat16 if bf16 else torch.float32)
        self.echo(f"done: the fine-tuned model is in {folder}\n  chat with it: galatea chat --model {folder}")
        return folder


GROUP_BATCHES = 16  # batches per length group


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch, as example indices; a pure function of (seed, epoch).

    Shuffled, then grouped by length: each run of 16 batches' worth of examples is sorted by
    length before it is cut into batches, and the batches are shuffled again. Examples of a
    batch are then of similar length, so little of a step is spent on padding (a windowed chat
    gives short early replies and full-context late ones), while the data order stays random."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    span = batch_size * GROUP_BATCHES
    batches = []
    for k in range(0, len(order), span):
        group = sorted(order[k : k + span], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    return found[-1] if found else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint a resumed run restarts from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _log(f: Any, row: dict[str, Any]) -> None:
    f.write(json.dumps(row) + "\n")
    f.flush()


def collate(batch: list[Sample], pad: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded [B, T] ids and labels. Causal attention means padding at the end cannot
    change the real positions, so no attention mask is needed; pads carry no loss."""
    width = max(len(x.ids) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x.ids)] = torch.tensor(x.ids)
        labels[i, : len(x.labels)] = torch.tensor(x.labels)
    return ids.to(dev), labels.to(dev)


def nll_sum(model: nn.Module, ids: Tensor, labels: Tensor, checkpointing: bool) -> Tensor:
    """Summed cross-entropy over the labelled positions. The [C, V] output projection runs only
    on those rows: most of a persona prompt carries no loss."""
    h = model.hidden_states(ids, checkpoint=checkpointing)  # [B, T, C]
    mask = labels != IGNORE
    logits = model.logits(h[mask])  # [N, V], N = reply tokens in the batch
    return F.cross_entropy(logits, labels[mask], reduction="sum")


def evaluate(model: nn.Module, samples: list[Sample], pad: int, dev: torch.device, batch_size: int,
             bf16: bool) -> float:
    """Mean cross-entropy per reply token (no dropout, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(samples), batch_size):
            ids, labels = collate(samples[i : i + batch_size], pad, dev)
            total += float(nll_sum(model, ids, labels, False))
            count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(1, count)
