"""`galatea train` end to end: a real LoRA run teaches the embedded SmolLM2 a character's
catchphrase; stopping and resuming gives bit-identical weights; full fine-tuning writes a
model transformers reads; runs that cannot fit are refused before loading anything."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from galatea.chat.cards import from_object
from galatea.chat.prompt import Turn, build_prompt
from galatea.cli import main
from galatea.errors import GalateaError
from galatea.model.checkpoint import embedded_model_path, load
from galatea.train.data import read_jsonl
from galatea.train.trainer import Trainer, TrainSettings
from tests import persona_data
from tests.checkpoints import write_tokenizer_model
from tests.helpers import hf_logits, our_logits

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base, data = persona_data.tiny_dataset(root)
    return {"base": base, "data": data, "root": root}


def galatea(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "galatea", *args], capture_output=True, text=True, timeout=600)


def test_lora_teaches_smollm2_the_catchphrase(tmp_path):
    """The embedded model, converted to trainable float32 safetensors; 24 LoRA steps on 32
    replies. Validation loss falls clearly, `galatea eval` agrees, and greedy replies in new
    chats open with the catchphrase, which the base model does not say."""
    from galatea.chat import formats
    from galatea.engine.generate import stream_generate
    from galatea.engine.sampling import SamplingParams

    base = tmp_path / "smol"
    assert main(["convert", str(embedded_model_path()), str(base), "--to", "safetensors", "--dtype", "float32"]) == 0
    card, chats = persona_data.write(tmp_path / "brine")
    data = tmp_path / "d.jsonl"
    assert main(["train", "data", "build", *map(str, chats), "--character", str(card), "--model", str(base),
                 "--out", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(run), "--steps", "24",
                 "--lr", "1e-3", "--no-progress"]) == 0

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert metrics[0] == {"step": 0, **{k: metrics[0][k] for k in ("eval_loss", "eval_perplexity")}}
    assert evals[-1] < 0.75 * evals[0], evals  # measured: 2.84 -> ~1.9
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 25))
    with Image.open(run / "loss.png") as img:
        assert img.format == "PNG" and img.size[0] >= 600

    def ppl(*lora: str) -> float:
        p = galatea("eval", "--model", str(base), *lora, "--data", str(data), "--json")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["perplexity"]

    base_ppl, tuned_ppl = ppl(), ppl("--lora", str(run / "adapter"))
    assert tuned_ppl < 0.6 * base_ppl, (base_ppl, tuned_ppl)

    assert len([r for r in read_jsonl(data) if r["split"] == "validation"]) == 4
    assert all(r["prompt"].startswith("<|im_start|>system\n") for r in read_jsonl(data))
    # New chats (greeting, then a message the dataset does not have): nothing in the prompt
    # shows the catchphrase, so only what the weights learned can produce it.
    char = from_object(persona_data.CARD)
    fresh = ["Do you like the rain?", "What is your favourite food?", "Can you tell me a story?",
             "Where is the nearest town?"]
    params = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop=("\nYou:",))

    def replies(lora: Path | None) -> list[str]:
        lm = load(base, lora=lora)
        out = []
        for message in fresh:
            # the format the dataset was built in: auto, SmolLM2's own ChatML template
            prompt = build_prompt(char, [Turn(False, char.first_mes)], message, lm.tokenizer, 2048, 16,
                                  fmt=formats.choose("auto", lm.tokenizer))
            ids = lm.tokenizer.encode(prompt.text)
            out.append("".join(c.text for c in stream_generate(lm.model, lm.tokenizer, ids, params)))
        return out

    tuned, plain = replies(run / "adapter"), replies(None)
    assert all("briny deep" in t for t in tuned), tuned
    assert not any("briny" in t for t in plain), plain


def _settings(tiny: dict[str, Path], out: Path, **kw) -> TrainSettings:
    values = dict(model=str(tiny["base"]), data=str(tiny["data"]), out=str(out), steps=10, batch_size=3,
                  grad_accum=2, lr=5e-3, precision="fp32", eval_every=4, seed=7, lora_dropout=0.1)
    values.update(kw)
    return TrainSettings(**values)


def _quiet(msg: str) -> None:
    pass


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_stop_and_resume_equals_an_uninterrupted_run(tiny, tmp_path, full):
    """Stopped at step 5 (mid-epoch, between checkpoints), resumed: the final weights equal
    those of a run that never stopped, bit for bit (data order, AdamW, schedule and the
    dropout RNG all restored)."""
    kw = {"full": True, "lr": 1e-3} if full else {}
    whole = Trainer(_settings(tiny, tmp_path / "whole", **kw), echo=_quiet, progress=False).run()
    assert whole.status == "done" and whole.step == 10

    stop = threading.Event()
    first = Trainer(_settings(tiny, tmp_path / "cut", **kw), echo=_quiet, progress=False).run(
        stop, on_step=lambda step: stop.set() if step == 4 else None)
    assert first.status == "stopped" and first.step == 5  # the step in flight finishes, then it stops
    assert (tmp_path / "cut" / "checkpoint-000005").is_dir()
    second = Trainer(_settings(tiny, tmp_path / "cut", **kw), resume=True, echo=_quiet, progress=False).run()
    assert second.status == "done" and second.step == 10

    name = "model/model.safetensors" if full else "adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics of the resumed run continue the same curve
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    assert [r.get("loss", r.get("eval_loss")) for r in rows] == [r.get("loss", r.get("eval_loss")) for r in ref]


def test_ctrl_c_saves_and_resume_finishes(tiny, tmp_path):
    """The real CLI: SIGINT stops after the current step with a checkpoint and a one-line hint;
    --resume reads the settings back from the run folder and completes."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "galatea", "train", "--model", str(tiny["base"]), "--data",
                             str(tiny["data"]), "--out", str(run), "--steps", "400", "--precision", "fp32",
                             "--save-every", "1000", "--eval-every", "1000", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped at step" in err and "--resume" in err and "Traceback" not in err
    step = int(err.split("stopped at step ")[1].split()[0])
    assert 2 <= step < 400 and (run / f"checkpoint-{step:06d}").is_dir()
    p = galatea("train", "--out", str(run), "--resume", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert f"resuming at step {step} of 400" in p.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 401))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tune_writes_a_model_transformers_reads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["train", "--full", "--model", str(tiny["base"]), "--data", str(tiny["data"]), "--out", str(run),
                 "--steps", "3", "--lr", "1e-3", "--precision", "fp32", "--no-progress"]) == 0
    tuned = AutoModelForCausalLM.from_pretrained(run / "model", torch_dtype=torch.float32).eval()
    expected = hf_logits(tuned)
    torch.testing.assert_close(our_logits(run / "model"), expected, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny["base"], torch_dtype=torch.float32).eval()
    assert (hf_logits(base) - expected).abs().max() > 1e-3  # it did train


def test_runs_that_cannot_work_are_refused(tiny, tmp_path):
    # LLaMA-7B's config (no weights needed: the estimate comes before loading)
    big = tmp_path / "llama7b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "torch_dtype": "bfloat16"}))
    write_tokenizer_model(big)
    p = galatea("train", "--full", "--model", str(big), "--data", str(tiny["data"]), "--out", str(tmp_path / "r"))
    assert p.returncode == 2
    assert "full fine-tuning of this 6.74B-parameter model needs about 1" in p.stderr, p.stderr
    need = float(p.stderr.split("needs about ")[1].split(" GB")[0])
    assert 105 < need < 125 and "GB available" in p.stderr and "Traceback" not in p.stderr
    assert "memory: about" in p.stderr  # the estimate is printed first

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"prompt": "x" * 3000, "generation": " y"}) + "\n")
    cases = [
        (["--model", str(text), "--data", str(tiny["data"]), "--out", str(tmp_path / "a")],
         "not a model this can train"),
        (["--model", str(tiny["base"]), "--data", str(bad_line), "--out", str(tmp_path / "b")],
         "more than the model's context of 256"),
        (["--model", str(tiny["base"]), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "c")],
         "no such dataset"),
        (["--model", str(tiny["base"]), "--data", str(tiny["data"]), "--out", str(tiny["root"])], "already exists"),
        (["--out", str(tmp_path / "d"), "--resume"], "not a training run"),
        (["--model", str(tiny["base"]), "--data", str(tiny["data"]), "--out", str(tmp_path / "e"),
          "--lora-targets", "q_proj,qkv"], "unknown module qkv"),
    ]
    for argv, needle in cases:
        p = galatea("train", *argv)
        assert p.returncode == 2 and needle in p.stderr and p.stderr.startswith("error: "), (argv, p.stderr)
        assert "Traceback" not in p.stderr
    # a folder quantized for inference cannot be trained
    assert main(["quantize", str(tiny["base"]), str(tmp_path / "q"), "--quant", "int8"]) == 0
    with pytest.raises(GalateaError, match="quantized for inference"):
        Trainer(_settings(tiny, tmp_path / "f", model=str(tmp_path / "q")), echo=_quiet, progress=False).run()


def test_memory_estimate_matches_the_arithmetic():
    """Full fine-tuning keeps 16 bytes per parameter; LoRA keeps the bf16 base and 16 bytes per
    adapter parameter (r * (in + out) per adapted matrix)."""
    from galatea.model.config import ModelConfig
    from galatea.train.memory import estimate, lora_parameters

    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
    p = 6_738_415_616  # LLaMA-7B
    full = estimate(cfg, True, 2, 2, 1, 512, 64, True)
    assert full.parameters == p and full.weights == 4 * p and full.trainable_state == 12 * p
    r8 = lora_parameters(cfg, 8, ("q_proj", "v_proj"))
    assert r8 == 32 * 2 * 8 * (4096 + 4096) == 4_194_304  # peft's count for LLaMA-7B, r=8, q/v
    lora = estimate(cfg, False, 2, 2, 1, 512, 64, True, 8, ("q_proj", "v_proj"))
    assert lora.weights == 2 * p and lora.trainable_state == 16 * r8
    assert math.isclose(lora.total / 1e9, 14.0, abs_tol=1.0)


def test_lora_on_an_int4_base_learns_and_loads_in_peft(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    p = galatea("train", "--model", str(tiny["base"]), "--data", str(tiny["data"]), "--out", str(run), "--steps", "8",
                "--lr", "1e-2", "--quant", "int4", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "base in int4" in p.stderr and "gradient checkpointing on" in p.stderr
    evals = [json.loads(x)["eval_loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert evals[-1] < evals[0] - 0.5, evals
    hf = AutoModelForCausalLM.from_pretrained(tiny["base"], torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, run / "adapter").eval()
    expected = hf_logits(pm)
    got = load(tiny["base"], dtype=torch.float32, quant="none", lora=run / "adapter")
    cache = got.model.make_cache(1, 64)
    from tests.helpers import TOKENS

    torch.testing.assert_close(got.model(torch.tensor([TOKENS]), 0, cache, all_logits=True)[0], expected,
                               atol=1e-4, rtol=1e-4)
    p = galatea("train", "--full", "--quant", "int4", "--model", str(tiny["base"]), "--data", str(tiny["data"]),
                "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "drop --quant" in p.stderr


def test_epoch_batches_cover_each_example_once_with_little_padding():
    import random

    from galatea.train.trainer import epoch_batches

    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(60, 200), rng.randint(1500, 2048)]) for _ in range(1000)]
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000)) and len(a) == 250
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)  # a pure function of (seed, epoch)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = [plain[i : i + 4] for i in range(0, 1000, 4)]
    assert padding(a) < 0.1 * padding(shuffled)
