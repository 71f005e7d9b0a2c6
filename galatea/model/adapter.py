"""LoRA adapters in PEFT's layout: their settings, and reading one to merge into a model's weights.

A LoRA update of a linear layer is `(alpha / r) * B A`, with `A` [r, in] and `B` [out, r]. PEFT's
files are the interchange format everyone reads:

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
                               base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]

Galatea's module names are HF's, so the keys need no renaming. For inference an adapter is merged
into the weights as they load (`Adapter.merge`): no extra work per token, and the merged matrix
can then be fused or quantized like any other. Training adapters is `galatea.train.lora`'s.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from galatea.errors import GalateaError
from galatea.model.hf_folder import torch_load_error

PREFIX = "base_model.model."
# The projections of a LLaMA block, the only modules LoRA is applied to here.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = LINEAR_NAMES


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.r < 1:
            raise GalateaError(f"--lora-r {self.r}: the rank must be at least 1")
        if not 0 <= self.dropout < 1:
            raise GalateaError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in LINEAR_NAMES]
        if unknown or not self.targets:
            raise GalateaError(f"--lora-targets: unknown module {', '.join(unknown) or '(none)'}; "
                               f"choose from {', '.join(LINEAR_NAMES)}")

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The rank and alpha of one module (PEFT's per-module patterns win over the defaults)."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return int(r), float(alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def peft_config(self, base: str) -> dict[str, Any]:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": sorted(self.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": self.use_rslora, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
            "layers_to_transform": None, "layers_pattern": None, "revision": None,
        }


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT matches a pattern key as a regex against the end of the module's full name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class Adapter:
    """A PEFT LoRA adapter folder, read for merging into a base model's weights."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        cfg_path = self.folder / "adapter_config.json"
        if not self.folder.is_dir() or not cfg_path.is_file():
            raise GalateaError(f"{self.folder}: not a LoRA adapter folder (it needs adapter_config.json and "
                               "adapter_model.safetensors, as PEFT and `galatea train` write them)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GalateaError(f"{cfg_path}: not valid JSON ({e})") from None
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise GalateaError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LoRA; only LoRA adapters load")
        for key, why in (("use_dora", "DoRA adapters"), ("fan_in_fan_out", "fan_in_fan_out (GPT-2 style) adapters"),
                         ("modules_to_save", "adapters with modules_to_save")):
            if cfg.get(key):
                raise GalateaError(f"{cfg_path}: {why} are not supported; merge it with PEFT first")
        if cfg.get("bias", "none") != "none":
            raise GalateaError(f"{cfg_path}: bias {cfg['bias']!r} is not supported (only 'none')")
        self.settings = LoraSettings(
            r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), dropout=0.0,
            targets=tuple(cfg.get("target_modules") or ()) if isinstance(cfg.get("target_modules"), list) else (),
            use_rslora=bool(cfg.get("use_rslora")), rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}))
        self.base = str(cfg.get("base_model_name_or_path") or "")
        self.pairs = self._read_pairs()

    def _read_pairs(self) -> dict[str, tuple[Tensor, Tensor]]:
        st, bin_ = self.folder / "adapter_model.safetensors", self.folder / "adapter_model.bin"
        if st.is_file():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(st)
            except (SafetensorError, OSError) as e:
                raise GalateaError(f"{st}: cannot be read ({e}); the file is damaged") from None
        elif bin_.is_file():
            try:
                tensors = torch.load(bin_, map_location="cpu", weights_only=True)
            except Exception as e:
                raise torch_load_error(bin_, e) from None
        else:
            raise GalateaError(f"{self.folder}: adapter_model.safetensors is missing")
        a, b = {}, {}
        for key, t in tensors.items():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
            if m is None:
                raise GalateaError(f"{self.folder}: unexpected tensor {key!r}; only LoRA A/B matrices are supported")
            (a if m[2] == "A" else b)[m[1]] = t
        if not a or set(a) != set(b):
            raise GalateaError(f"{self.folder}: the adapter's lora_A and lora_B tensors do not pair up")
        return {name: (a[name], b[name]) for name in a}

    def delta(self, module: str) -> Tensor | None:
        """The float32 update [out, in] of one module (by its HF name), or None."""
        pair = self.pairs.get(module)
        if pair is None:
            return None
        a, b = pair
        r = a.shape[0]
        _, alpha = self.settings.rank_alpha(module)
        return (b.float() @ a.float()) * self.settings.scale(r, alpha)

    def merge(self, name: str, tensor: Tensor) -> Tensor:
        """`tensor` (a checkpoint tensor named `name`) with this adapter's update added."""
        if not name.endswith(".weight"):
            return tensor
        d = self.delta(name.removesuffix(".weight"))
        if d is None:
            return tensor
        if tuple(d.shape) != tuple(tensor.shape):
            raise GalateaError(f"{self.folder}: the update of {name} is {list(d.shape)} but the model's weight is "
                               f"{list(tensor.shape)}; this adapter was trained on another model")
        return (tensor.float() + d).to(tensor.dtype)

    def check_names(self, names: set[str]) -> None:
        """Every adapted module must exist in the base model."""
        missing = sorted(m for m in self.pairs if f"{m}.weight" not in names)
        if missing:
            raise GalateaError(f"{self.folder}: adapts {missing[0]}, which the model does not have; "
                               "this adapter was trained on another model")
