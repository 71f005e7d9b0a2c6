"""`galatea bench --train`: LoRA training throughput, Galatea next to transformers + peft.

Both sides train the same adapter (every projection, r=8, AdamW) on the same batches of
persona-length sequences whose last tokens carry the loss, in the same precision (bf16 autocast
where the hardware has it). The reference runs when `transformers` and `peft` are importable
(they are test dependencies); a GGUF model is dequantized to a temporary HF folder for it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from galatea.model.adapter import LoraSettings
from galatea.train.data import IGNORE
from galatea.train.lora import add_lora
from galatea.train.trainer import nll_sum


def _batches(vocab: int, steps: int, batch: int, seq: int, target: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -target - 1 : -1] = ids[:, -target:]  # position i predicts token i + 1
        out.append((ids, labels))
    return out


def _timed_steps(step: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    times = []
    for ids, labels in batches:
        t = time.perf_counter()
        step(ids, labels)
        times.append(time.perf_counter() - t)
    return times[1:]  # the first step pays for allocation and kernel selection


def bench_train(model: str | Path | None, steps: int = 6, batch: int = 4, seq: int = 128, target: int = 24,
                reference: bool = True) -> dict[str, Any]:
    from galatea.model.checkpoint import default_device, default_dtype, load, resolve_model_path

    path = resolve_model_path(model)
    dev = default_device()
    bf16 = default_dtype(dev) == torch.bfloat16
    lm = load(path, dtype=torch.bfloat16 if bf16 else torch.float32, device=dev, quant="none", fuse=False)
    settings = LoraSettings()
    batches = _batches(lm.config.vocab_size, steps + 1, batch, seq, target)
    tokens = batch * seq

    t_ours = _ours(lm.model, batches, settings, dev, bf16)
    del lm  # before the reference loads its own copy
    result: dict[str, Any] = {
        "model": path.name, "device": dev.type, "precision": "bf16" if bf16 else "fp32",
        "lora": {"r": settings.r, "targets": list(settings.targets)}, "batch": batch, "seq": seq,
        "reply_tokens": target, "galatea_tok_s": round(tokens / t_ours, 1), "galatea_step_s": round(t_ours, 3),
    }
    if reference:
        result.update(_reference(path, batches, settings, dev, bf16, tokens))
    return result


def _ours(m: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], settings: LoraSettings, dev: torch.device,
          bf16: bool) -> float:
    add_lora(m, settings)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        ids, labels = ids.to(dev), labels.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nll_sum(m, ids, labels, checkpointing=False) / int((labels != IGNORE).sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return statistics.median(_timed_steps(step, batches))


def _reference(path: Path, batches: list[tuple[torch.Tensor, torch.Tensor]], settings: LoraSettings,
               dev: torch.device, bf16: bool, tokens: int) -> dict[str, Any]:
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError:
        return {"reference": "transformers + peft are not installed (pip install -e '.[test]')"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = path
        if not path.is_dir():
            from galatea.weights.convert import gguf_to_hf

            folder = Path(tmp) / "hf"
            gguf_to_hf(path, folder, torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16 if bf16 else torch.float32)
    pm = get_peft_model(hf, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0,
                                       target_modules=list(settings.targets))).to(dev)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def theirs(ids: torch.Tensor, labels: torch.Tensor) -> None:
        ids = ids.to(dev)
        hf_labels = torch.full_like(ids, IGNORE)  # transformers shifts the labels itself
        hf_labels[:, 1:] = labels[:, :-1].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = pm(input_ids=ids, labels=hf_labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = statistics.median(_timed_steps(theirs, batches))
    import peft
    import transformers

    return {"reference": f"transformers {transformers.__version__} + peft {peft.__version__}",
            "reference_tok_s": round(tokens / t, 1), "reference_step_s": round(t, 3)}
