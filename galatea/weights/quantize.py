"""`galatea quantize SRC DST`: a pre-quantized folder that loads by memory map (see
galatea/model/prequantized.py for the format). The source is loaded with `--quant` exactly as
`galatea chat` would load it (GGUF Q4 blocks go straight to int4), and what the kernels then
hold is written out, tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from galatea import progress
from galatea.errors import GalateaError
from galatea.model import prequantized
from galatea.weights import convert as cv


def quantize(src: Path, dst: Path, mode: str = "auto", force: bool = False, progress_factory: Any = None) -> dict:
    from galatea.model.checkpoint import load
    from galatea.model.gguf_file import GGUFFile

    kind = cv.open_source(src)
    lm = load(src, quant=mode if mode != "auto" or kind == "gguf" else "int4", device="cpu")
    if lm.quant == "none":
        raise GalateaError(f"{src}: nothing to quantize (the weights are float); pass --quant int4 or int8")
    tensors, modules = prequantized.state(lm.model)
    plan = [cv.TensorPlan(name, tuple(t.shape), t.dtype) for name, t in tensors]
    total = sum(cv._nbytes(p) for p in plan)
    cv._prepare_dst(dst, True, total, force)
    with progress.bar(progress_factory, "write", total) as bar:
        cv.write_safetensors(dst, plan, iter(tensors), cv.DEFAULT_SHARD, bar)
    dtype = lm.model.model.norm.weight.dtype
    if kind == "gguf":
        config = cv.write_gguf_side_files(src, GGUFFile(src).metadata, lm.config, lm.config.tie_word_embeddings,
                                          dst, dtype)
    else:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        for side in cv.SIDE_FILES:
            if (src / side).is_file():
                cv.atomic_write(dst / side, lambda f, side=side: f.write((src / side).read_bytes()))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = prequantized.config(lm.model, lm.quant, modules)
    cv.atomic_write(dst / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return {"mode": lm.quant, "modules": len(modules), "bytes": total,
            "source_bytes": sum(p.stat().st_size for p in ([src] if src.is_file() else src.iterdir()) if p.is_file()),
            "free": shutil.disk_usage(dst).free}
