"""The samplers of today's KoboldCpp and text-generation-webui, beside KoboldAI's classic set.

- **DRY** ("don't repeat yourself", p-e-w): a token that would extend a sequence already seen in
  the context is penalised by multiplier * base^(length - allowed_length), where length is how
  many tokens before it repeat an earlier occurrence; sequence breakers (newline, `:`, quotes,
  `*`) end a match, so names and formatting are never penalised.
- **XTC** ("exclude top choices"): with probability `probability`, every token at least
  `threshold` likely is removed except the least likely of them, which pushes the story off its
  most predictable path while keeping it coherent.
- **Dynamic temperature** (entropy-based): temperature between T - range and T + range, higher
  where the model is unsure (high entropy), lower where it is sure.
- **Smoothing factor** (quadratic sampling): logits l become max - factor * (l - max)^2 before the
  temperature, flattening the top and cutting the tail.
- **Mirostat** v1 and v2: a target surprise `tau`; each step truncates to the tokens whose
  surprise stays under mu (v2) or to the top-k that Zipf's law estimates (v1), then moves mu
  towards tau by eta times the surprise observed. State: mu, one per generation.

Each works on one sequence's float32 logits [V] (-inf where removed).
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any

import torch
from torch import Tensor

NEG_INF = float("-inf")
DRY_BREAKERS = ("\n", ":", "\"", "*")  # SillyTavern's and KoboldCpp's default sequence breakers


def dry_breaker_ids(tokenizer: Any, breakers: Sequence[str] = DRY_BREAKERS) -> tuple[int, ...]:
    """Each breaker as the token the model writes for it after a letter (as text-generation-webui
    maps them), so `\n` or `:` glued to a word still counts."""
    return tuple(sorted({tokenizer.encode("a" + b, add_bos=False)[-1] for b in breakers if b}))


def dry(logits: Tensor, context: Sequence[int], multiplier: float, base: float, allowed_length: int,
        breakers: Container[int], last_n: int = 0) -> Tensor:
    """For each earlier occurrence of the context's last token, the length of the run of tokens
    ending there that equals the run ending the context (not crossing a breaker); the token that
    followed that occurrence gets the penalty for the longest such run."""
    if multiplier <= 0 or len(context) < 2:
        return logits
    ids = list(context[-last_n:]) if last_n > 0 else list(context)
    last = ids[-1]
    if last in breakers:
        return logits
    longest: dict[int, int] = {}
    n = len(ids)
    for idx in range(n - 1):
        if ids[idx] != last:
            continue
        following = ids[idx + 1]
        if following in breakers:
            continue
        length = 1
        while idx - length >= 0 and ids[idx - length] == ids[n - 1 - length] and ids[idx - length] not in breakers:
            length += 1
        if length > longest.get(following, 0):
            longest[following] = length
    penalised = {t: multiplier * base ** (length - allowed_length)
                 for t, length in longest.items() if length >= allowed_length and 0 <= t < logits.numel()}
    if not penalised:
        return logits
    logits = logits.clone()
    idx_t = torch.tensor(list(penalised), dtype=torch.long, device=logits.device)
    logits[idx_t] -= torch.tensor(list(penalised.values()), dtype=logits.dtype, device=logits.device)
    return logits


def xtc(logits: Tensor, threshold: float, probability: float, rng: torch.Generator) -> Tensor:
    """With `probability`, remove every token at least `threshold` likely but the least likely of
    them (nothing when fewer than two reach it)."""
    if probability <= 0 or threshold > 0.5:  # above 0.5 two tokens cannot both reach it
        return logits
    if torch.rand(1, generator=rng).item() >= probability:
        return logits
    probs = logits.softmax(-1)
    above = probs >= threshold
    if int(above.sum()) < 2:
        return logits
    keep = torch.where(above, probs, torch.full_like(probs, 2.0)).argmin()  # the least likely above
    removed = above.clone()
    removed[keep] = False
    return logits.masked_fill(removed, NEG_INF)


def dynamic_temperature(logits: Tensor, temperature: float, spread: float, exponent: float = 1.0) -> Tensor:
    """Temperature min + (max - min) * (entropy / max entropy)^exponent over the candidates left,
    min = max(0, T - spread), max = T + spread."""
    finite = torch.isfinite(logits)
    n = int(finite.sum())
    if n <= 1:
        return logits
    low, high = max(0.0, temperature - spread), temperature + spread
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = float(-(probs[finite] * logp[finite]).sum())
    t = low + (high - low) * (entropy / math.log(n)) ** exponent
    return logits / max(t, 1e-4)


def smoothing(logits: Tensor, factor: float) -> Tensor:
    """Quadratic sampling: l -> max - factor * (l - max)^2."""
    if factor <= 0:
        return logits
    top = logits.max()
    return torch.where(torch.isfinite(logits), top - factor * (logits - top) ** 2, logits)


class Mirostat:
    """Mirostat's state for one generation: mu starts at 2 tau and follows the surprise observed."""

    M = 100  # v1: how many top probabilities estimate Zipf's exponent

    def __init__(self, version: int, tau: float, eta: float) -> None:
        self.version, self.tau, self.eta = version, tau, eta
        self.mu = 2 * tau

    def truncate(self, logits: Tensor) -> Tensor:
        """The candidates this step may draw from (the rest -inf)."""
        probs = logits.softmax(-1)
        if self.version == 2:
            surprise = -torch.log2(probs)
            removed = surprise > self.mu
            if bool(removed.all()):
                removed[probs.argmax()] = False
            return logits.masked_fill(removed, NEG_INF)
        n = logits.numel()
        top = torch.topk(probs, min(self.M, n)).values.double()
        i = torch.arange(top.numel() - 1, dtype=torch.float64)
        t = torch.log((i + 2) / (i + 1))
        b = torch.log(top[:-1] / top[1:])
        valid = torch.isfinite(b)
        s_hat = float((t[valid] * b[valid]).sum() / (t[valid] ** 2).sum()) if bool(valid.any()) else 1.0
        eps = s_hat - 1
        try:
            k_float = ((eps * 2 ** self.mu) / (1 - n ** -eps)) ** (1 / s_hat)
        except (ZeroDivisionError, OverflowError):
            k_float = float(n)
        k = n if isinstance(k_float, complex) or not math.isfinite(k_float) else max(1, min(int(k_float), n))
        kth = torch.topk(logits, k).values[-1]
        return logits.masked_fill(logits < kth, NEG_INF)

    def observe(self, processed: Tensor, token: int) -> None:
        """Move mu after `token` was drawn from the truncated logits `processed`."""
        p = float(processed.softmax(-1)[token])
        surprise = -math.log2(max(p, 1e-30))
        self.mu -= self.eta * (surprise - self.tau)
