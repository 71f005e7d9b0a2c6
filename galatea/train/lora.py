"""LoRA training: low-rank adapters on the linear layers, saved in PEFT's layout.

A LoRA layer computes `W x + (alpha / r) * B A dropout(x)` with the base `W` [out, in] frozen and
only `A` [r, in] and `B` [out, r] trained (B starts at zero, so training starts from the base
model exactly). The format, and reading an adapter for inference, are `galatea.model.adapter`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from galatea.errors import GalateaError
from galatea.files import atomic_write
from galatea.model.adapter import PREFIX, LoraSettings
from galatea.model.quant import Int4Linear, Int8Linear


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update. The children are named as PEFT
    names them (`base_layer`, `lora_A`, `lora_B`) so state-dict keys map one to one."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, scale: float) -> None:
        """`base`: an nn.Linear, or an Int8Linear / Int4Linear (a quantized frozen base, as in QLoRA)."""
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scale = r, alpha, scale
        held = [*base.parameters(), *base.buffers()]  # a quantized layer holds buffers only
        dev = held[0].device if held else torch.device("cpu")
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev, dtype=torch.float32)
        # PEFT's default init: A like nn.Linear (Kaiming-uniform), B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # else autocast picks the matmul dtype
            x = x.to(self.lora_A.weight.dtype)  # the adapter's float32
        update = self.lora_B(self.lora_A(x))
        return out + (update * self.scale).to(out.dtype)


def add_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze `model` and wrap each target linear layer in a LoRALinear. Returns the wrapped
    module names. The model must be unfused (HF's separate q/k/v and gate/up modules). A mixture
    of experts' experts are left as they are (LoRA adapts its attention)."""
    settings.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in settings.targets:
                if ".experts." in f"{name}.":  # a mixture of experts: LoRA adapts its attention only
                    continue
                if not isinstance(child, (nn.Linear, Int8Linear, Int4Linear)):
                    raise GalateaError(f"{name}.{child_name} is {type(child).__name__}, not a linear layer; "
                                       "LoRA training needs the model loaded unfused")
                full = f"{name}.{child_name}"
                r, alpha = settings.rank_alpha(full)
                setattr(module, child_name, LoRALinear(child, r, alpha, settings.dropout, settings.scale(r, alpha)))
                wrapped.append(full)
    if not wrapped and any(".experts." in n for n, _ in model.named_modules()):
        raise GalateaError("LoRA on the experts of a mixture-of-experts model is not supported; target its attention "
                           "(--lora-targets q_proj,k_proj,v_proj,o_proj)")
    if not wrapped:
        raise GalateaError(f"no module named {', '.join(settings.targets)} in the model; nothing to adapt")
    return wrapped


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors under PEFT's keys."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().float().contiguous()
            out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().float().contiguous()
    return out


def save_adapter(model: nn.Module, settings: LoraSettings, base: str, folder: Path) -> None:
    """Write the PEFT layout: adapter_config.json and adapter_model.safetensors."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    blob = save(lora_state(model), metadata={"format": "pt"})
    atomic_write(folder / "adapter_model.safetensors", lambda f: f.write(blob))
    config = json.dumps(settings.peft_config(base), indent=2).encode()
    atomic_write(folder / "adapter_config.json", lambda f: f.write(config))
