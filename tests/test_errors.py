"""Every loading failure ends as one clear line (`error: ...`, exit status 2), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import pytest
import torch

from galatea.cli import main
from tests.checkpoints import ROOT, hf_model, shared_vocab, write_bin_shards, write_gguf, write_safetensors


@pytest.fixture(scope="module")
def model():
    return hf_model("gqa")


@pytest.fixture(scope="module")
def kmodel():
    return hf_model("kquant")


def fails(capsys, *argv: str) -> str:
    rc = main(["generate", "-n", "2", *argv, "Hello"] if argv[0] == "--model" else list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    last = err[-1]
    assert last.startswith("error: ") and "Traceback" not in "\n".join(err)
    return last


def test_missing_path(capsys, tmp_path):
    assert "no such file or folder" in fails(capsys, "--model", str(tmp_path / "nope"))


def test_folder_without_config(capsys, tmp_path):
    assert "config.json is missing" in fails(capsys, "--model", str(tmp_path))


def test_missing_shard(capsys, tmp_path, model):
    folder = write_bin_shards(model, tmp_path / "m")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    msg = fails(capsys, "--model", str(folder))
    assert "pytorch_model-00002-of-00002.bin" in msg and "missing" in msg


def test_no_weights(capsys, tmp_path, model):
    folder = write_safetensors(model, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    assert "no weights found" in fails(capsys, "--model", str(folder))


def test_unknown_hf_architecture(capsys, tmp_path, model):
    folder = write_safetensors(model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "'GPT2LMHeadModel' is not supported" in fails(capsys, "--model", str(folder))


def test_unknown_gguf_architecture(capsys, tmp_path, model):
    path = write_gguf(model, tmp_path / "m.gguf", arch="gpt2")
    assert "GGUF architecture 'gpt2' is not supported" in fails(capsys, "--model", str(path))


def test_unsupported_tensor_type(capsys, tmp_path, kmodel):
    path = write_gguf(kmodel, tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.TQ2_0)  # ternary (BitNet)
    msg = fails(capsys, "--model", str(path))
    assert "type TQ2_0" in msg and "cannot load" in msg


def test_truncated_safetensors(capsys, tmp_path, model):
    folder = write_safetensors(model, tmp_path / "m")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "corrupt or truncated safetensors" in fails(capsys, "--model", str(folder))


def test_truncated_bin(capsys, tmp_path, model):
    folder = write_bin_shards(model, tmp_path / "m")
    f = folder / "pytorch_model-00001-of-00002.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "corrupt or truncated pytorch file" in fails(capsys, "--model", str(folder))


def test_truncated_gguf(capsys, tmp_path, model):
    path = write_gguf(model, tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated GGUF file" in fails(capsys, "--model", str(path))


def test_corrupt_gguf_header(capsys, tmp_path, model):
    path = write_gguf(model, tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[24:40] = b"\xff" * 16  # the first key's length becomes absurd
    path.write_bytes(bytes(data))
    assert "corrupt or truncated GGUF header" in fails(capsys, "--model", str(path))


def test_not_a_gguf(capsys, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, I am a text file")
    assert "not a GGUF file" in fails(capsys, "--model", str(path))


def test_shape_mismatch(capsys, tmp_path, model):
    folder = write_safetensors(model, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = fails(capsys, "--model", str(folder))
    assert "has shape" in msg and "config implies" in msg


def test_missing_tensor(capsys, tmp_path, model):
    from safetensors.torch import load_file, save_file

    folder = write_safetensors(model, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert "missing tensors model.layers.1.mlp.down_proj.weight" in fails(capsys, "--model", str(folder))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(capsys, tmp_path, model):
    folder = write_bin_shards(model, tmp_path / "m")
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["evil"] = exploit
    torch.save(state, shard)
    msg = fails(capsys, "--model", str(folder))
    assert "refuses to execute" in msg and "weights_only=False" not in msg and len(msg.splitlines()) == 1
    assert not marker.exists()


def test_a_lora_pickle_that_runs_code_is_refused_in_one_line(tmp_path):
    """The adapter's .bin and the legacy (unmapped) path give the same one line, never torch's
    advice to load with weights_only=False."""
    from galatea.errors import GalateaError
    from galatea.model.adapter import Adapter
    from galatea.model.hf_folder import _torch_load_unmapped

    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    (tmp_path / "adapter").mkdir()
    torch.save({"x": exploit}, tmp_path / "adapter" / "adapter_model.bin")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}')
    for load in (lambda: Adapter(tmp_path / "adapter"), lambda: _torch_load_unmapped(tmp_path / "adapter" /
                                                                                          "adapter_model.bin")):
        with pytest.raises(GalateaError) as e:
            load()
        msg = str(e.value)
        assert "refuses to execute" in msg and "weights_only" not in msg and "\n" not in msg
    assert not marker.exists()


def test_vocab_only_gguf_cannot_generate(capsys):
    assert "only a vocabulary" in fails(capsys, "--model", str(shared_vocab()))


def test_bad_sampling_flag(capsys):
    assert "--logit-bias" in fails(capsys, "generate", "--logit-bias", "abc", "Hi")


def test_no_traceback_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "galatea", "generate", "--model", str(tmp_path / "x"), "Hi"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
