"""Next-token samplers, with the semantics of the front ends that send them.

Every sampler is a small function on one sequence's float32 logits `[V]`. KoboldAI's
`sampler_order` names them by id: 0 top_k, 1 top_a, 2 top_p (and min_p beside it),
3 tail-free, 4 typical, 5 temperature (dynamic temperature or the smoothing factor with it),
6 repetition penalty (with presence/frequency and DRY). Logit bias and bans come first, always;
XTC comes last. With Mirostat on (KoboldCpp): penalties, temperature, then Mirostat's own
truncation instead of the order's. The newer samplers live in modern_samplers.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from galatea.engine.modern_samplers import Mirostat, dry, dynamic_temperature, smoothing, xtc
from galatea.errors import GalateaError

# KoboldAI's default order: penalties, then truncation, then temperature last.
DEFAULT_ORDER = (6, 0, 1, 3, 4, 2, 5)
# PygmalionAI's recommended settings (temperature 0.5-0.9, top_p 0.9, repetition penalty 1.1-1.2),
# and the reply length the chat budgets for: the defaults of `galatea chat`, `generate`, `prompt`
# and the page.
PYGMALION_PRESET: dict[str, int | float] = {
    "max_new_tokens": 160, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.1, "repetition_penalty_range": 1024,
}
NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # <= 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    tfs: float = 1.0
    top_a: float = 0.0
    repetition_penalty: float = 1.0
    repetition_penalty_range: int = 0  # last N tokens of the context; 0 = all of it
    repetition_penalty_slope: float = 0.0  # KoboldAI: ramps the penalty up towards recent tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_tokens: Sequence[int] = ()
    ban_eos: bool = False
    sampler_order: Sequence[int] = DEFAULT_ORDER
    seed: int | None = None  # None: a fresh random seed per generation
    stop: Sequence[str] = ()
    include_stop: bool = False  # keep the matched stop string in the text (KoboldAI without trim_stop)
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: Sequence[int] = ()  # token ids that end a repeated run
    dry_range: int = 0  # last N tokens of the context; 0 = all of it
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0 = off
    dynatemp_range: float = 0.0  # 0 = plain temperature
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0  # 0 = off
    mirostat: int = 0  # 0 off, 1 or 2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    banned_phrases: Sequence[str] = ()  # never written: generation rewinds and bans their first token
    logprobs: int | None = None  # report each token's log probability and this many alternatives

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0.0 <= self.top_p <= 1.0, "top_p must be between 0 and 1"),
            (0.0 <= self.min_p <= 1.0, "min_p must be between 0 and 1"),
            (0.0 <= self.typical_p <= 1.0, "typical_p must be between 0 and 1"),
            (0.0 <= self.tfs <= 1.0, "tfs must be between 0 and 1"),
            (self.top_a >= 0.0, "top_a must be >= 0"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0 (1 turns it off)"),
            (self.repetition_penalty_range >= 0, "repetition_penalty_range must be >= 0"),
            (all(i in range(7) for i in self.sampler_order), "sampler_order ids must be 0..6"),
            (self.dry_multiplier >= 0 and self.dry_base >= 1.0 and self.dry_allowed_length >= 1
             and self.dry_range >= 0, "DRY needs multiplier >= 0, base >= 1, allowed length >= 1, range >= 0"),
            (0.0 <= self.xtc_threshold <= 1.0 and 0.0 <= self.xtc_probability <= 1.0,
             "xtc_threshold and xtc_probability must be between 0 and 1"),
            (self.dynatemp_range >= 0 and self.dynatemp_exponent > 0, "dynatemp_range must be >= 0, exponent > 0"),
            (self.smoothing_factor >= 0, "smoothing_factor must be >= 0 (0 turns it off)"),
            (self.mirostat in (0, 1, 2), "mirostat must be 0 (off), 1 or 2"),
            (self.mirostat_tau > 0 and self.mirostat_eta > 0, "mirostat_tau and mirostat_eta must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GalateaError(f"sampling: {message}")

    @property
    def greedy(self) -> bool:
        # below 1e-3 a temperature only overflows the logits: it means "the most likely token"
        return self.temperature < 1e-3 or self.top_k == 1


class Sampler:
    """Picks tokens for one generation; owns its random generator so a seed reproduces a run."""

    def __init__(self, params: SamplingParams, vocab_size: int, eos_ids: Sequence[int] = ()) -> None:
        params.validate()
        self.params = params
        self.seed = params.seed if params.seed is not None and params.seed >= 0 else \
            int.from_bytes(os.urandom(4), "little")
        self.rng = torch.Generator().manual_seed(self.seed)
        self.vocab_size = vocab_size
        bias = torch.zeros(vocab_size)
        for tok, b in params.logit_bias.items():
            if 0 <= int(tok) < vocab_size:
                bias[int(tok)] += float(b)
        banned = [t for t in params.banned_tokens if 0 <= t < vocab_size]
        if params.ban_eos:
            banned += [t for t in eos_ids if t is not None and 0 <= t < vocab_size]
        bias[banned] = NEG_INF
        self.bias = bias if bias.any() else None
        self.mirostat = Mirostat(params.mirostat, params.mirostat_tau, params.mirostat_eta) \
            if params.mirostat and not params.greedy else None
        self.dry_breakers = frozenset(params.dry_sequence_breakers)
        self.chain = self._chain()

    def _chain(self) -> list[Callable[[Tensor, Sequence[int]], Tensor]]:
        """The steps of `sampler_order` (KoboldAI ids), built once per generation: 6 penalties,
        0 top-k, 1 top-a, 2 top-p + min-p, 3 tail-free, 4 typical, 5 smoothing + temperature.
        Greedy decoding keeps only the penalties: truncation and temperature cannot change the
        argmax."""
        p = self.params

        def temperature(x: Tensor, _: Sequence[int]) -> Tensor:
            x = smoothing(x, p.smoothing_factor)
            if p.dynatemp_range > 0:
                return dynamic_temperature(x, p.temperature, p.dynatemp_range, p.dynatemp_exponent)
            return x / p.temperature if p.temperature != 1.0 else x

        steps: dict[int, Callable[[Tensor, Sequence[int]], Tensor]] = {
            6: self.penalties,
            0: lambda x, _: top_k(x, p.top_k),
            1: lambda x, _: top_a(x, p.top_a),
            2: lambda x, _: min_p(top_p(x, p.top_p), p.min_p),
            3: lambda x, _: tail_free(x, p.tfs),
            4: lambda x, _: typical(x, p.typical_p),
            5: temperature,
        }
        return [steps[i] for i in p.sampler_order if i in steps and (i == 6 or not p.greedy)]

    def __call__(self, logits: Tensor, context: Sequence[int]) -> int:
        """logits: [V] float32 for the next position; context: every token id so far."""
        processed = self.distribution(logits, context)
        token = self.draw(processed)
        self.observe(processed, token)
        return token

    def observe(self, processed: Tensor, token: int) -> None:
        """`token` was chosen from `processed`: stateful samplers (Mirostat) move on."""
        if self.mirostat is not None:
            self.mirostat.observe(processed, token)

    def distribution(self, logits: Tensor, context: Sequence[int]) -> Tensor:
        """The logits after the whole chain ([V]; -inf where removed): what `draw` samples from,
        and what speculative decoding accepts drafts by."""
        p = self.params
        logits = logits.float()[: self.vocab_size].clone()
        if self.bias is not None:
            logits += self.bias.to(logits.device)
        biased = logits
        if self.mirostat is not None:
            logits = self.penalties(logits, context)
            return self.mirostat.truncate(logits / p.temperature)
        for step in self.chain:
            logits = step(logits, context)
        if not p.greedy:
            logits = xtc(logits, p.xtc_threshold, p.xtc_probability, self.rng)
        return _keep_one(logits, biased)

    def penalties(self, logits: Tensor, context: Sequence[int]) -> Tensor:
        p = self.params
        logits = apply_penalties(logits, context, p)
        return dry(logits, context, p.dry_multiplier, p.dry_base, p.dry_allowed_length, self.dry_breakers,
                   p.dry_range)

    def draw(self, processed: Tensor) -> int:
        if self.params.greedy:
            return int(torch.argmax(processed))
        return draw(torch.softmax(processed, dim=-1), self.rng)


def _keep_one(logits: Tensor, before: Tensor) -> Tensor:
    """Settings that remove every token (top_a 1e30, min_p 1 on a tie...) leave the most likely
    one of those the bans and biases allowed, rather than a distribution of NaNs."""
    if bool(torch.isfinite(logits).any()):
        return logits
    best = int(torch.argmax(torch.nan_to_num(before, nan=NEG_INF)))
    return torch.full_like(logits, NEG_INF).index_fill(0, torch.tensor([best], device=logits.device), 0.0)


def draw(probs: Tensor, rng: torch.Generator) -> int:
    """A token with probability probs[t] (any non-negative weights): the inverse of the
    cumulative distribution at one uniform number. torch.multinomial costs 1.5 ms on a 49k
    vocabulary here, this 0.06 ms; zero-weight tokens are never drawn (their interval is empty)."""
    cdf = probs.float().cpu().cumsum(0)
    u = torch.rand(1, generator=rng) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


def apply_penalties(logits: Tensor, context: Sequence[int], p: SamplingParams) -> Tensor:
    if p.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, context, p.repetition_penalty,
                                    p.repetition_penalty_range, p.repetition_penalty_slope)
    if (p.presence_penalty or p.frequency_penalty) and len(context):
        ids, counts = torch.tensor(list(context), dtype=torch.long).unique(return_counts=True)
        ids, counts = ids.to(logits.device), counts.to(logits.device)
        logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def repetition_penalty(logits: Tensor, context: Sequence[int], penalty: float, rng: int = 0,
                       slope: float = 0.0) -> Tensor:
    """KoboldAI's penalty: divide positive (multiply non-positive) logits of tokens seen in the
    last `rng` tokens. With a slope, each position's penalty ramps from ~1 (oldest) to `penalty`
    (newest) along a curve whose steepness is `slope`, as KoboldAI's warper computes it."""
    window = list(context[-rng:]) if rng > 0 else list(context)
    if not window:
        return logits
    # Each distinct token is penalised once, with the penalty of its most recent position.
    last = {tok: i for i, tok in enumerate(window) if 0 <= tok < logits.numel()}
    idx = torch.tensor(list(last), dtype=torch.long, device=logits.device)
    pen: Tensor | float = penalty
    if rng > 0 and slope != 0:
        ramp = torch.arange(rng, dtype=logits.dtype, device=logits.device) / max(rng - 1, 1) * 2.0 - 1.0
        ramp = (slope * ramp) / (1 + ramp.abs() * (slope - 1))
        per_position = (1 + (ramp + 1) / 2 * (penalty - 1))[-len(window):]
        pen = per_position[torch.tensor(list(last.values()), dtype=torch.long, device=logits.device)]
    score = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(score <= 0, score * pen, score / pen)
    return logits


def top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p. Only the head of
    the sorted distribution is needed: topk of a growing k (a full sort of a 49k vocabulary
    costs 4 ms here, topk of 256 0.2 ms)."""
    if p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    for k in (256, 2048, probs.numel()):  # a flat distribution ends in one full sort, as before
        k = min(k, probs.numel())
        head, order = torch.topk(probs, k) if k < probs.numel() else torch.sort(probs, descending=True)
        mass = head.cumsum(-1)
        if mass[-1] >= p:
            break
    keep = int((mass - head <= p).sum().clamp(min=1))  # the mass before a kept token has not reached p
    removed = torch.ones_like(logits, dtype=torch.bool)
    removed[order[:keep]] = False
    return logits.masked_fill(removed, NEG_INF)


def min_p(logits: Tensor, p: float) -> Tensor:
    """Drop tokens less likely than p times the most likely one."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < p * probs.max(), NEG_INF)


def top_a(logits: Tensor, a: float) -> Tensor:
    """Drop tokens with probability below a * (max probability)^2."""
    if a <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < a * probs.max() ** 2, NEG_INF)


def tail_free(logits: Tensor, z: float) -> Tensor:
    """Tail-free sampling: cut where the normalised second derivative of the sorted
    probabilities accumulates to z (KoboldAI's formulation)."""
    if z >= 1.0 or logits.numel() < 3:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    d2 = probs.diff().diff().abs()
    total = d2.sum()
    if total <= 0:
        return logits
    cdf = (d2 / total).cumsum(-1)
    remove = torch.cat([torch.zeros(1, dtype=torch.bool, device=logits.device), cdf > z,
                        torch.ones(1, dtype=torch.bool, device=logits.device)])
    return logits.masked_fill(remove.scatter(0, order, remove), NEG_INF)


def typical(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy,
    until their probability reaches `mass`."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp).nansum()
    deviation = (entropy + logp).abs()
    _, order = torch.sort(deviation)
    sorted_probs = probs[order]
    remove = sorted_probs.cumsum(-1) >= mass
    remove = remove.roll(1)
    remove[0] = False
    return logits.masked_fill(remove.scatter(0, order, remove), NEG_INF)
