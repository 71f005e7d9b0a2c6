"""LoRA adapters in PEFT's layout, checked against peft + transformers (the reference):
Galatea's adapters load in peft with the same logits as `--lora`; adapters peft made load in
Galatea; a merged folder gives base + adapter logits in transformers; the training forward and
its gradients equal peft's; and `galatea eval` equals the reply-token loss computed with peft."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from galatea.cli import main
from galatea.model.adapter import LoraSettings
from galatea.model.checkpoint import load
from galatea.train.data import encode_example, read_jsonl, tokenize_rows
from galatea.train.lora import add_lora
from galatea.train.trainer import collate, nll_sum
from tests import persona_data
from tests.checkpoints import hf_model, write_gguf, write_safetensors
from tests.helpers import TOKENS, hf_logits, our_logits

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, a dataset and a LoRA run of a few steps (B is no longer zero)."""
    root = tmp_path_factory.mktemp("lora")
    base, data = persona_data.tiny_dataset(root)
    run = root / "run"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(run), "--steps", "6",
                 "--lr", "1e-2", "--precision", "fp32", "--no-progress", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    return {"base": base, "data": data, "adapter": run / "adapter", "root": root}


def peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def test_adapter_layout_and_peft_logits_equal_lora_flag(trained):
    adapter = trained["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").abs().max() > 0
    assert len(keys) == 2 * 7 * 2  # A and B for 7 projections in 2 layers

    ref = peft_model(trained["base"], adapter)
    expected = hf_logits(ref)
    with ref.disable_adapter():
        base_logits = hf_logits(ref)
    assert (expected - base_logits).abs().max() > 0.05  # the adapter matters
    ours = our_logits_lora(trained["base"], adapter)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def our_logits_lora(path: Path, adapter: Path, quant: str = "none") -> torch.Tensor:
    lm = load(path, dtype=torch.float32, quant=quant, lora=adapter)
    cache = lm.model.make_cache(1, 64)
    return lm.model(torch.tensor([TOKENS]), 0, cache, all_logits=True)[0]


def test_adapter_made_by_peft_loads_in_galatea(tmp_path):
    """Independent direction: peft writes an adapter (non-zero B, rsLoRA scaling, a per-module
    rank and alpha, only some targets); Galatea's --lora reproduces peft's logits."""
    from peft import LoraConfig, get_peft_model

    base = write_safetensors(hf_model("mha", seed=3), tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights=False,
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(pm)
    torch.testing.assert_close(our_logits_lora(base, tmp_path / "adapter"), expected, atol=1e-4, rtol=1e-4)
    # the CLI applies it too: greedy text equals transformers' greedy decoding with the adapter
    with torch.no_grad():
        ref_ids = pm.generate(torch.tensor([TOKENS[:6]]), max_new_tokens=8, do_sample=False)[0, 6:].tolist()
    lm = load(base, dtype=torch.float32, quant="none", lora=tmp_path / "adapter")
    from galatea.engine.generate import stream_generate
    from galatea.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0, ban_eos=True)
    got = [c.token for c in stream_generate(lm.model, lm.tokenizer, TOKENS[:6], params) if c.token is not None]
    assert got == ref_ids
    # and through the command line
    prompt = "Hello world, how are"
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        full = pm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
    ref_text = lm.tokenizer.decode(full)[len(lm.tokenizer.decode(ids)):]
    p = subprocess.run([sys.executable, "-m", "galatea", "generate", "--model", str(base), "--lora",
                        str(tmp_path / "adapter"), "--temperature", "0", "--repetition-penalty", "1", "-n", "8",
                        "--ban-eos", "--dtype", "float32", "--quant", "none", "--json", prompt],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["text"] == ref_text


def test_merge_equals_base_plus_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    assert main(["train", "merge", str(trained["base"]), str(trained["adapter"]), str(merged)]) == 0
    expected = hf_logits(peft_model(trained["base"], trained["adapter"]))
    got = hf_logits(AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(our_logits(merged), expected, atol=1e-4, rtol=1e-4)
    assert (merged / "tokenizer.model").is_file()
    # ready for `galatea convert --to gguf`
    assert main(["convert", str(merged), str(tmp_path / "merged.gguf"), "--to", "gguf", "--type", "f32"]) == 0
    torch.testing.assert_close(our_logits(tmp_path / "merged.gguf"), expected, atol=1e-4, rtol=1e-4)


def test_adapter_on_a_gguf_base(trained, tmp_path):
    """The same base as GGUF (llama.cpp's permuted q/k rows): --lora and merge still apply the
    update to the right rows."""
    from transformers import AutoModelForCausalLM

    gguf = write_gguf(AutoModelForCausalLM.from_pretrained(trained["base"], torch_dtype=torch.float32),
                      tmp_path / "base.gguf")
    expected = hf_logits(peft_model(trained["base"], trained["adapter"]))
    torch.testing.assert_close(our_logits_lora(gguf, trained["adapter"]), expected, atol=1e-4, rtol=1e-4)
    assert main(["train", "merge", str(gguf), str(trained["adapter"]), str(tmp_path / "m"), "--dtype", "float32"]) == 0
    torch.testing.assert_close(our_logits(tmp_path / "m"), expected, atol=1e-4, rtol=1e-4)


def _galatea_step(lm, data: Path, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
    """One batch through Galatea's training forward and backward, the adapter set to random
    non-zero values (so A's gradient is non-zero too). Returns ids, labels, loss, adapter params."""
    samples = tokenize_rows(lm.tokenizer, read_jsonl(data)[:rows], 256, str(data), lm.path)
    ids, labels = collate(samples, 2, torch.device("cpu"))
    torch.manual_seed(seed)
    ours = {n: p for n, p in lm.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in ours.values():
            p.normal_(0, 0.05)
    loss = nll_sum(lm.model, ids, labels, checkpointing=True) / int((labels != -100).sum())
    loss.backward()
    return ids, labels, float(loss), ours


def _peft_step(hf, ours: dict, ids: torch.Tensor, labels: torch.Tensor,
               targets: tuple[str, ...] = LoraSettings().targets) -> tuple[float, dict]:
    """The same batch through peft + transformers with the same adapter values: (loss, our
    parameter name -> peft's gradient)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    names = {n: n.replace("base_model.model.", "").replace(".default", "") for n, _ in pm.named_parameters()
             if "lora_" in n}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n in names:
                p.copy_(ours[names[n]])
    # transformers shifts labels itself: its labels are the input ids with -100 off the reply
    hf_labels = torch.full_like(ids, -100)
    hf_labels[:, 1:] = torch.where(labels[:, :-1] != -100, ids[:, 1:], -100)
    ref = pm(input_ids=ids, labels=hf_labels).loss
    ref.backward()
    return float(ref), {names[n]: p.grad for n, p in pm.named_parameters() if n in names}


def test_training_loss_and_gradients_equal_peft(trained):
    """One batch through Galatea's training forward (no KV cache, only reply rows projected)
    and through peft + transformers: the same loss and the same adapter gradients."""
    from transformers import AutoModelForCausalLM

    lm = load(trained["base"], dtype=torch.float32, quant="none", fuse=False)
    add_lora(lm.model, LoraSettings(r=4, alpha=8))
    ids, labels, loss, ours = _galatea_step(lm, trained["data"], 3, seed=0)
    ref, grads = _peft_step(AutoModelForCausalLM.from_pretrained(trained["base"], torch_dtype=torch.float32),
                            ours, ids, labels)
    assert math.isclose(loss, ref, rel_tol=1e-5)
    assert grads.keys() == ours.keys()
    for n, g in grads.items():
        torch.testing.assert_close(ours[n].grad, g, atol=1e-5, rtol=1e-4)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "qwen3moe"])
def test_lora_training_on_todays_families_equals_peft(trained, family, tmp_path):
    """Qwen3's q/k norms, Gemma's norms, GeGLU and soft caps, and a mixture of experts (whose LoRA
    adapts the attention; the experts are left as they are) train as peft + transformers do."""
    from tests.test_families import build

    reference = build(family, tmp_path / family)
    lm = load(tmp_path / family, dtype=torch.float32, quant="none", fuse=False)
    wrapped = add_lora(lm.model, LoraSettings(r=4, alpha=8))  # the default targets, MLP's included
    targets = ATTENTION if family == "qwen3moe" else LoraSettings().targets
    assert {w.rsplit(".", 1)[1] for w in wrapped} == set(targets)
    ids, labels, loss, ours = _galatea_step(lm, trained["data"], 3, seed=0)
    ref, grads = _peft_step(reference, ours, ids, labels, targets)
    assert math.isclose(loss, ref, rel_tol=1e-5), (loss, ref)
    assert grads.keys() == ours.keys()
    for n, g in grads.items():
        torch.testing.assert_close(ours[n].grad, g, atol=1e-5, rtol=1e-4)


def test_eval_is_the_reply_token_loss(trained, capsys):
    ref = peft_model(trained["base"], trained["adapter"])
    rows = [r for r in read_jsonl(trained["data"]) if r["split"] == "validation"]
    lm = load(trained["base"], dtype=torch.float32, quant="none")
    total, count = 0.0, 0
    for r in rows:
        ids, n = encode_example(lm.tokenizer, r["prompt"], r["generation"])
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        total -= sum(float(lp[i - 1, ids[i]]) for i in range(n, len(ids)))
        count += len(ids) - n
    capsys.readouterr()
    assert main(["eval", "--model", str(trained["base"]), "--lora", str(trained["adapter"]), "--data",
                 str(trained["data"]), "--dtype", "float32", "--quant", "none", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["split"] == "validation" and got["reply_tokens"] == count
    assert math.isclose(got["loss"], total / count, rel_tol=1e-4)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-3)


def test_adapter_errors(trained, tmp_path):
    from galatea.errors import GalateaError

    other = write_safetensors(hf_model("kquant"), tmp_path / "other")  # hidden 256: shapes differ
    with pytest.raises(GalateaError, match="trained on another model"):
        load(other, dtype=torch.float32, quant="none", lora=trained["adapter"])
    with pytest.raises(GalateaError, match="not a LoRA adapter folder"):
        load(trained["base"], lora=tmp_path)
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(GalateaError, match="DoRA"):
        load(trained["base"], lora=dora)
    assert main(["quantize", str(trained["base"]), str(tmp_path / "q"), "--quant", "int8"]) == 0
    with pytest.raises(GalateaError, match="cannot take --lora"):
        load(tmp_path / "q", lora=trained["adapter"])


def test_serve_with_lora_answers_like_peft(trained, tmp_path):
    """A real `galatea serve --lora` on 127.0.0.1: the KoboldAI API's greedy text equals
    transformers + peft's greedy continuation."""
    import httpx

    from tests.helpers import Server

    prompt = "Captain Brine's Persona: a sea captain.\n<START>\nYou: Hello!\nCaptain Brine:"
    lm = load(trained["base"], dtype=torch.float32, quant="none")
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        full = peft_model(trained["base"], trained["adapter"]).generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()
    expected = lm.tokenizer.decode(full)[len(lm.tokenizer.decode(ids)):]
    assert len(full) - len(ids) >= 5 and expected.strip()
    server = Server(tmp_path, "--model", str(trained["base"]), "--lora", str(trained["adapter"]),
                    "--dtype", "float32", "--quant", "none", "--cache-slots", "1")
    try:
        r = httpx.post(f"{server.url}/api/v1/generate", timeout=120, json={
            "prompt": prompt, "max_length": 10, "temperature": 0.01, "top_k": 1, "rep_pen": 1.0,
            "stop_sequence": []})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["text"] == expected
        info = httpx.get(f"{server.url}/v1/internal/model/info", timeout=10).json()
        assert info["lora_names"] == ["run"] and info["model_name"] == "base+run"
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_lora_on_a_quantized_base_matches_peft_on_its_dequantized_weights(trained, quant):
    """QLoRA-style: the frozen base held in int8/int4, the adapter in float32. The loss and the
    adapter's gradients equal peft + transformers on a float model holding exactly the
    dequantized weights (to bf16 rounding: the quantized layers compute in bf16)."""
    from transformers import AutoModelForCausalLM

    from galatea.model.quant import Int4Linear, Int8Linear

    lm = load(trained["base"], dtype=torch.float32, quant=quant, fuse=False, kernels="torch")  # as the trainer does
    quantized = {n: m for n, m in lm.model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert len(quantized) == 2 * 7 + 1  # every projection, and the output matrix (int8)
    add_lora(lm.model, LoraSettings(r=4, alpha=8))
    ids, labels, loss, ours = _galatea_step(lm, trained["data"], 2, seed=1)

    hf = AutoModelForCausalLM.from_pretrained(trained["base"], torch_dtype=torch.float32)
    with torch.no_grad():  # the float reference holds what the quantized layers compute with
        for n, m in quantized.items():
            w = m.dequantize_t().t() if isinstance(m, Int4Linear) else m.weight.float() * m.scales.float()[:, None]
            hf.get_parameter(f"{n}.weight").copy_(w.float())
    ref, grads = _peft_step(hf, ours, ids, labels)
    assert math.isclose(loss, ref, rel_tol=2e-2)
    for n, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(ours[n].grad.flatten(), g.flatten(), dim=0)
        assert cos > 0.98, (n, float(cos))
