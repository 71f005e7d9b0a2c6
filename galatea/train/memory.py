"""How much memory a fine-tuning run needs, estimated from the config before anything loads.

Full fine-tuning keeps float32 weights, their gradients and AdamW's two moments: 16 bytes per
parameter (108 GB for LLaMA-7B). LoRA keeps the frozen base in the compute dtype (2 bytes in
bf16) and those 16 bytes only for the adapter's few million parameters. Activations are what
backpropagation keeps per token; gradient checkpointing keeps one [T, C] tensor per layer and
recomputes the rest, plus one layer's full set while it is recomputed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from galatea.model.config import ModelConfig
from galatea.model.inspect import parameter_count

# torch, the tokenizer, the dataset and allocator slack: measured peaks were 1.79 GB for SmolLM2
# (estimate 1.5 GB with 0.6 GB here) and 15.1 GB for LLaMA-7B LoRA (estimate 15.5 GB).
RUNTIME = 10**9


@dataclass
class Estimate:
    weights: int
    trainable_state: int  # trainable weights' gradients and AdamW moments (and fp32 masters)
    activations: int
    parameters: int
    trainable: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations + RUNTIME


def lora_parameters(cfg: ModelConfig, r: int, targets: tuple[str, ...]) -> int:
    c, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"q_proj": (c, q), "k_proj": (c, kv), "v_proj": (c, kv), "o_proj": (q, c),
              "gate_proj": (c, i), "up_proj": (c, i), "down_proj": (i, c)}
    return cfg.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


# Bytes per weight of a quantized frozen base: int8 with a bf16 scale per row; int4 in groups
# of 32 with a bf16 scale and zero per group (4.5 bits).
QUANT_BYTES = {"int8": 1.0, "int4": 0.5 + 4 / 32}


def estimate(cfg: ModelConfig, full: bool, base_bytes: int, act_bytes: int, batch: int, seq_len: int,
             target_tokens: int, checkpointing: bool, lora_r: int = 8,
             lora_targets: tuple[str, ...] = (), quant: str = "none") -> Estimate:
    """Bytes needed by a run: `seq_len` the longest example, `target_tokens` the most tokens with
    loss in one micro-batch (the logits are only computed there). `quant`: how the frozen base's
    linear layers are held (LoRA only; the output matrix is int8 for both modes)."""
    p = parameter_count(cfg)
    trainable = p if full else lora_parameters(cfg, lora_r, lora_targets)
    weights = 4 * p if full else base_bytes * p
    if not full and quant in QUANT_BYTES:
        c, d = cfg.hidden_size, cfg.head_dim
        attn = 2 * c * cfg.num_attention_heads * d + 2 * c * cfg.num_key_value_heads * d  # q, o, k, v
        linear = cfg.num_hidden_layers * (attn + 3 * c * cfg.intermediate_size)
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * c
        weights = int(linear * QUANT_BYTES[quant] + head * 1.0 + (p - linear - head) * base_bytes)
    state = trainable * (12 if full else 16)  # grad + 2 moments (+ the fp32 adapter itself)
    tokens = batch * seq_len
    c, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = tokens * (12 * c + 4 * i) * act_bytes  # attention in/out, norms, q/k/v, MLP gate/up/act
    layers = cfg.num_hidden_layers
    acts = layers * tokens * c * act_bytes + per_layer if checkpointing else layers * per_layer
    acts += target_tokens * cfg.vocab_size * 4 * 3  # float32 logits, softmax and their gradient
    return Estimate(weights, state, acts, p, trainable)


def available(device: torch.device) -> int:
    """Bytes free for the run: free GPU memory, or the system's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
