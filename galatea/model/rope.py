"""RoPE's frequencies as the checkpoint says: the scaling schemes long-context models ship with.

A rotary embedding turns the pair (x_i, x_{i+D/2}) of a query or key at position p by the angle
p * inv_freq[i], inv_freq[i] = theta^(-2i/D). The schemes change inv_freq (and for YaRN scale
cos and sin by an attention factor), exactly as transformers' `modeling_rope_utils` defines them:

- `linear`: every frequency divided by `factor` (position interpolation).
- `dynamic`: NTK-aware: theta grows with the context the model runs at, once that exceeds the
  trained one: theta * ((factor * n / trained) - (factor - 1)) ^ (D / (D - 2)). transformers
  takes n from the sequence in front of it; here n is the context of the cache (what a server
  runs with), so every position of a chat turns by one set of frequencies.
- `yarn`: low frequencies interpolated, high ones kept, a linear ramp between the dimensions
  that turn `beta_fast` and `beta_slow` times over the original context; cos and sin scaled by
  0.1 ln(factor) + 1 (or the `attention_factor` given).
- `llama3` (Llama 3.1 and later): wavelengths longer than original / low_freq_factor divided by
  `factor`, shorter than original / high_freq_factor kept, smoothly mixed in between.
- GGUF files keep `linear` and `yarn` as `rope.scaling.*` keys, and Llama 3's scheme as the
  tensor `rope_freqs.weight` (llama.cpp's converter): one divisor per frequency.

Anything else (`longrope`, partial rotary dimensions, ...) is refused by name: a setting that
changes the arithmetic is never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from galatea.errors import GalateaError

KINDS = ("default", "linear", "dynamic", "yarn", "llama3", "factors")


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "default"
    factor: float = 1.0
    original_context: int = 0  # the context the model was first trained for (yarn, llama3)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn: cos and sin scaled by it (None: 0.1 ln factor + 1)
    freq_factors: tuple[float, ...] = ()  # "factors": GGUF rope_freqs.weight, a divisor per frequency

    def describe(self) -> str:
        """One line for `galatea inspect`."""
        if self.kind == "default":
            return "none"
        if self.kind == "factors":
            return f"per-frequency divisors from the file ({len(self.freq_factors)}, llama3 style)"
        extra = f", original context {self.original_context}" if self.original_context else ""
        return f"{self.kind} x{self.factor:g}{extra}"

    # ---- reading the checkpoint's settings ----------------------------------------------------------

    @classmethod
    def from_hf(cls, rope: dict[str, Any] | None, trained: int) -> RopeScaling:
        """`rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) of config.json."""
        if not rope:
            return cls()
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise GalateaError(f"config.json: partial_rotary_factor {rope['partial_rotary_factor']} (RoPE on part of "
                               "each head) is not supported")
        try:
            if kind == "default":
                return cls()
            if kind == "linear":
                return cls("linear", float(rope["factor"]))
            if kind == "dynamic":
                return cls("dynamic", float(rope["factor"]))
            if kind == "llama3":
                return cls("llama3", float(rope["factor"]), int(rope["original_max_position_embeddings"]),
                           float(rope["low_freq_factor"]), float(rope["high_freq_factor"]))
            if kind == "yarn":
                original = int(rope.get("original_max_position_embeddings") or trained)
                factor = rope.get("factor") or trained / original
                if rope.get("mscale") or rope.get("mscale_all_dim"):
                    raise GalateaError("config.json: YaRN with mscale/mscale_all_dim (DeepSeek's) is not supported")
                attention = rope.get("attention_factor")
                return cls("yarn", float(factor), original, beta_fast=float(rope.get("beta_fast") or 32),
                           beta_slow=float(rope.get("beta_slow") or 1),
                           attention_factor=None if attention is None else float(attention))
        except KeyError as e:
            raise GalateaError(f"config.json: RoPE scaling {kind!r} is missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise GalateaError(f"config.json: RoPE scaling {kind!r} has a value of the wrong type ({e})") from None
        raise GalateaError(f"config.json: RoPE scaling {kind!r} is not supported (Galatea knows "
                           "linear, dynamic, yarn and llama3)")

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], arch: str, freq_factors: tuple[float, ...] = ()) -> RopeScaling:
        """llama.cpp's keys: `{arch}.rope.scaling.type` (none, linear, yarn), `.factor`,
        `.original_context_length`, `.yarn_*`; Llama 3's scheme arrives as `freq_factors`
        (the file's rope_freqs.weight)."""
        kind = meta.get(f"{arch}.rope.scaling.type") or "none"
        factor = float(meta.get(f"{arch}.rope.scaling.factor") or 1.0)
        if freq_factors:
            if kind not in ("none", "linear") or (kind == "linear" and factor != 1.0):
                raise GalateaError(f"GGUF: rope_freqs.weight together with rope scaling {kind!r} is not supported")
            return cls("factors", freq_factors=freq_factors)
        if kind == "none" or (kind == "linear" and factor == 1.0):
            return cls()
        if kind == "linear":
            return cls("linear", factor)
        if kind == "yarn":
            ext = meta.get(f"{arch}.rope.scaling.yarn_ext_factor")
            if ext is not None and float(ext) != 1.0:
                raise GalateaError(f"GGUF: yarn_ext_factor {ext} is not supported (only 1)")
            for unknown in ("yarn_log_multiplier",):
                if meta.get(f"{arch}.rope.scaling.{unknown}") not in (None, 0, 0.0):
                    raise GalateaError(f"GGUF: rope.scaling.{unknown} is not supported")
            # llama.cpp scales cos/sin by attn_factor * (0.1 ln factor + 1)
            attention = float(meta.get(f"{arch}.rope.scaling.yarn_attn_factor") or 1.0)
            return cls("yarn", factor, int(meta.get(f"{arch}.rope.scaling.original_context_length") or 0),
                       beta_fast=float(meta.get(f"{arch}.rope.scaling.yarn_beta_fast") or 32),
                       beta_slow=float(meta.get(f"{arch}.rope.scaling.yarn_beta_slow") or 1),
                       attention_factor=attention * _yarn_mscale(factor))
        raise GalateaError(f"GGUF rope scaling {kind!r} is not supported (Galatea knows linear and yarn, and "
                           "Llama 3's rope_freqs)")

    # ---- the arithmetic -----------------------------------------------------------------------------

    def frequencies(self, head_dim: int, theta: float, trained: int, length: int) -> tuple[Tensor, float]:
        """(inv_freq [D/2] float64, the factor cos and sin are scaled by) for a model run at a
        context of `length` positions. The base frequencies are float32, as transformers and
        llama.cpp compute them, so the angles match theirs."""
        d = head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        if self.kind == "dynamic":
            n = max(length, trained)
            theta = theta * ((self.factor * n / trained) - (self.factor - 1)) ** (d / (d - 2))
        inv = (1.0 / (torch.tensor(theta, dtype=torch.float32) ** exponents)).double()  # in float32, as theirs
        if self.kind == "linear":
            return inv / self.factor, 1.0
        if self.kind == "factors":
            if len(self.freq_factors) != d // 2:
                raise GalateaError(f"GGUF: rope_freqs.weight has {len(self.freq_factors)} values, but the heads need "
                                   f"{d // 2}; the file is inconsistent")
            return inv / torch.tensor(self.freq_factors, dtype=torch.float32).double(), 1.0
        if self.kind == "llama3":
            return self._llama3(inv), 1.0
        if self.kind == "yarn":
            return self._yarn(inv, d, theta), self.attention_factor or _yarn_mscale(self.factor)
        return inv, 1.0

    def _llama3(self, inv: Tensor) -> Tensor:
        low_wavelen = self.original_context / self.low_freq_factor
        high_wavelen = self.original_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (self.high_freq_factor -
                                                                             self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self, inv: Tensor, d: int, theta: float) -> Tensor:
        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
            return d * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_of(self.beta_fast)), 0)
        high = min(math.ceil(dim_of(self.beta_slow)), d - 1)
        if low == high:
            high += 0.001  # no division by zero
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).double()
        keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: interpolated
        return inv / self.factor * (1 - keep) + inv * keep


def llama3_divisors(scaling: RopeScaling, head_dim: int, theta: float) -> list[float]:
    """Llama 3's scaling as llama.cpp's converter writes it: rope_freqs.weight, each original
    frequency's divisor."""
    base = RopeScaling().frequencies(head_dim, theta, 0, 0)[0]
    return (base / scaling._llama3(base)).tolist()


def llama3_from_divisors(divisors: tuple[float, ...], head_dim: int, theta: float) -> RopeScaling | None:
    """The Llama 3 settings a rope_freqs.weight was written from, among the ones Meta ships
    (Llama 3.1/3.3: x8, 3.2: x32; low 1, high 4, original 8192); None if it is none of them."""
    for factor in (8.0, 16.0, 32.0):
        candidate = RopeScaling("llama3", factor, 8192, 1.0, 4.0)
        if all(abs(a - b) <= 1e-5 * b for a, b in zip(llama3_divisors(candidate, head_dim, theta), divisors,
                                                       strict=True)):
            return candidate
    return None


def _yarn_mscale(factor: float) -> float:
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
