"""What a training run leaves besides checkpoints: the loss curve, and a fully fine-tuned model
as an HF folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def plot_losses(metrics: Path, png: Path) -> None:
    """The loss curve: training loss per step, validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per reply token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def save_full_model(model: nn.Module, lm: Any, base: Path, folder: Path, dtype: torch.dtype) -> None:
    """A fully fine-tuned model as an HF folder: safetensors, config and tokenizer files."""
    from galatea.files import atomic_write
    from galatea.model import hf_folder
    from galatea.model.gguf_file import GGUFFile
    from galatea.weights.convert import DEFAULT_SHARD, SIDE_FILES, TensorPlan, write_gguf_side_files, write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    tied = lm.config.tie_word_embeddings
    state = [(n, p.detach()) for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")]
    plan = [TensorPlan(n, tuple(t.shape), dtype) for n, t in state]
    write_safetensors(folder, plan, iter(state), DEFAULT_SHARD)
    if base.is_dir():
        for side in SIDE_FILES:
            if (base / side).is_file():
                atomic_write(folder / side, lambda f, side=side: f.write((base / side).read_bytes()))
        config = hf_folder.read_json(base / "config.json")
    else:
        config = write_gguf_side_files(base, GGUFFile(base).metadata, lm.config, tied, folder, dtype)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(folder / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
