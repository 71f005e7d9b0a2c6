"""Loading never holds a second full copy of the model: peak memory stays within the final
model size plus one large tensor's worth of temporaries, in every format and mode."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import gguf
import pytest

from tests.checkpoints import ROOT, write_gguf, write_safetensors

pytestmark = pytest.mark.slow

Q = gguf.GGMLQuantizationType

MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from galatea.model.checkpoint import load

    def status(key):  # VmHWM: this process's own peak (ru_maxrss is inherited across fork)
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.ones(1)  # allocator and thread pools up before the baseline
    start = status("VmRSS")
    lm = load(sys.argv[1], dtype=getattr(torch, sys.argv[2]), quant=sys.argv[3])
    seen, size = set(), 0
    for t in [*lm.model.parameters(), *lm.model.buffers()]:
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            size += t.untyped_storage().nbytes()
    peak = status("VmHWM")
    print(json.dumps({"model": size, "peak": peak - start}))
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("mem")
    return {
        "safetensors": write_safetensors(model, d / "st"),
        "f16.gguf": write_gguf(model, d / "f16.gguf", qtype=Q.F16),
        "q8.gguf": write_gguf(model, d / "q8.gguf", qtype=Q.Q8_0),
    }


@pytest.mark.parametrize("fmt,dtype,quant", [
    ("safetensors", "float32", "none"),   # same dtype: used in place from the map
    ("safetensors", "bfloat16", "none"),  # converted tensor by tensor
    ("safetensors", "bfloat16", "int4"),  # quantized layer by layer
    ("f16.gguf", "bfloat16", "none"),
    ("q8.gguf", "bfloat16", "auto"),      # -> int8
])
def test_peak_memory_near_final_size(files, fmt, dtype, quant):
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(files[fmt]), dtype, quant],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    largest_fp32 = 32000 * 1024 * 4  # the embedding, as float32 during conversion
    assert m["peak"] <= m["model"] + largest_fp32 + (64 << 20), \
        f"{fmt} {dtype} {quant}: peak {m['peak'] / 1e6:.0f} MB for a {m['model'] / 1e6:.0f} MB model"
