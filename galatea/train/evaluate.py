"""`galatea eval`: perplexity on the character replies of a dataset, so a fine-tune can be
compared with its base on the same examples (prompt tokens carry no loss, as in training)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from galatea.errors import GalateaError
from galatea.train.data import IGNORE, read_jsonl, tokenize_rows


def perplexity(lm: Any, data: Path, split: str = "auto", batch_size: int = 4) -> dict[str, Any]:
    """Mean negative log-likelihood per reply token (and its exp) over `split` of `data`:
    "validation", "train", "all", or "auto" (validation when there is one, else all)."""
    from galatea.train.trainer import evaluate

    rows = read_jsonl(data)
    if split == "auto":
        split = "validation" if any(r["split"] == "validation" for r in rows) else "all"
    chosen = rows if split == "all" else [r for r in rows if r["split"] == split]
    if not chosen:
        raise GalateaError(f"{data}: no examples in the {split} split; pass --split all")
    samples = tokenize_rows(lm.tokenizer, chosen, lm.config.max_position_embeddings, str(data), lm.path)
    pad = lm.tokenizer.eos_id or 0
    with torch.inference_mode():
        loss = evaluate(lm.model, samples, pad, lm.model.device, batch_size, bf16=False)
    tokens = sum(len(s.labels) - s.labels.count(IGNORE) for s in samples)
    return {"examples": len(samples), "split": split, "reply_tokens": tokens, "loss": round(loss, 6),
            "perplexity": round(math.exp(min(loss, 50)), 4)}
