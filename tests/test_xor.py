"""`galatea xor`: byte-compatibility with the original codec, verification, failure handling.

`reference_codec` below is an independent re-implementation of the original `xor_codec.py`
(OpenAssistant's, as PygmalionAI used it), written from its description in pygmalion.md:
4096-byte blocks, the payload drives the length, the base is zero-padded or truncated, optional
gzip, and (PygmalionAI's later variant) `.json` files copied as they are."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from galatea.cli import main
from galatea.errors import GalateaError
from galatea.weights import xor
from galatea.weights.manifest import load_manifest
from tests.checkpoints import hf_model, write_bin_shards
from tests.helpers import hf_logits, our_logits


def _xor_file(dst: Path, src: Path, base: Path, compress_out: bool, gzip_in: bool) -> None:
    fp_in = gzip.open(src, "rb") if gzip_in else open(src, "rb")
    fp_out = gzip.open(dst, "wb") if compress_out else open(dst, "wb")
    with fp_in, fp_out, open(base, "rb") as fp_base:
        while True:
            buf1 = fp_in.read(4096)
            if not buf1:
                break
            buf2 = fp_base.read(4096)
            buf2 = (buf2 + bytes(max(0, len(buf1) - len(buf2))))[: len(buf1)]  # zero-pad or truncate
            x = int.from_bytes(buf1, "little") ^ int.from_bytes(buf2, "little")
            fp_out.write(x.to_bytes(len(buf1), "little"))


def reference_codec(dst: Path, src: Path, base: Path, *, encode: bool, compress: bool = False,
                    copy_json: bool = True) -> None:
    """encode: src is the fine-tune, dst the payload; decode: src is the payload, dst the model."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        if copy_json and f.suffix == ".json":
            shutil.copyfile(f, dst / f.name)
        else:
            _xor_file(dst / f.name, f, base / f.name, compress_out=compress and encode, gzip_in=compress and not encode)


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def release(tmp_path):
    """A fine-tune and its base with files of unequal lengths (both ways) and JSON files."""
    fine, base = tmp_path / "fine", tmp_path / "base"
    fine.mkdir()
    base.mkdir()
    (fine / "pytorch_model-00001-of-00002.bin").write_bytes(random_bytes(3 * (16 << 20) + 12345, 1))  # > CHUNK
    (base / "pytorch_model-00001-of-00002.bin").write_bytes(random_bytes(3 * (16 << 20) + 999, 2))  # shorter
    (fine / "pytorch_model-00002-of-00002.bin").write_bytes(random_bytes(10_000, 3))
    (base / "pytorch_model-00002-of-00002.bin").write_bytes(random_bytes(50_000, 4))  # longer
    (fine / "tokenizer.model").write_bytes(random_bytes(4096 * 3, 5))  # a whole number of blocks
    (base / "tokenizer.model").write_bytes(random_bytes(4096 * 3, 6))
    (fine / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "x": 1}))
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "x": 0}))
    (fine / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (base / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "legacy": False}))
    return fine, base


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    assert names == sorted(p.name for p in b.iterdir() if p.is_file() and p.name != "xor-manifest.json")
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.parametrize("compress", [False, True])
def test_apply_decodes_reference_payloads(release, tmp_path, compress):
    fine, base = release
    payload = tmp_path / "payload"
    reference_codec(payload, fine, base, encode=True, compress=compress)
    assert json.loads((payload / "config.json").read_text())["x"] == 1  # JSON copied as-is
    assert main(["xor", "apply", "-q", str(payload), str(base), str(tmp_path / "out")]) == 0
    assert same_files(fine, tmp_path / "out")


def test_apply_xors_json_of_the_original_openassistant_variant(release, tmp_path):
    fine, base = release
    payload = tmp_path / "payload"
    reference_codec(payload, fine, base, encode=True, copy_json=False)  # every file XORed
    with pytest.raises(json.JSONDecodeError):
        json.loads((payload / "config.json").read_bytes().decode("latin-1"))
    assert main(["xor", "apply", "-q", str(payload), str(base), str(tmp_path / "out")]) == 0
    assert same_files(fine, tmp_path / "out")


@pytest.mark.parametrize("compress", [False, True])
def test_created_payloads_decode_with_the_reference(release, tmp_path, compress, capsys):
    fine, base = release
    args = ["xor", "create", "-q", str(fine), str(base), str(tmp_path / "payload")]
    assert main([*args, "--compress"] if compress else args) == 0
    payload = tmp_path / "payload"
    if compress:
        assert (payload / "tokenizer.model").read_bytes()[:2] == b"\x1f\x8b"
    reference_codec(tmp_path / "decoded", payload, base, encode=False, compress=compress)
    (tmp_path / "decoded" / "xor-manifest.json").unlink(missing_ok=True)
    assert same_files(fine, tmp_path / "decoded")

    manifest = load_manifest(str(payload / "xor-manifest.json"))  # its checksums are the real ones
    import hashlib
    for name, want in manifest.output.items():
        assert hashlib.sha256((fine / name).read_bytes()).hexdigest() == want["sha256"]
    assert set(manifest.base) == {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                  "tokenizer.model"}
    capsys.readouterr()
    assert main(["xor", "apply", "-q", str(payload), str(base), str(tmp_path / "out")]) == 0  # uses the manifest
    out = capsys.readouterr().out
    assert "5 of 5 files pass" in out and "3 of 3 files pass" in out


def test_tiny_model_rebuilt_from_xor_gives_the_finetunes_logits(tmp_path):
    fine_model, base_model = hf_model("gqa", seed=1), hf_model("gqa", seed=2)
    fine = write_bin_shards(fine_model, tmp_path / "fine")
    base = write_bin_shards(base_model, tmp_path / "base")
    reference_codec(tmp_path / "payload", fine, base, encode=True)
    assert main(["xor", "apply", "-q", str(tmp_path / "payload"), str(base), str(tmp_path / "out")]) == 0
    got = our_logits(tmp_path / "out")
    torch.testing.assert_close(got, hf_logits(fine_model), atol=2e-4, rtol=1e-4)
    assert (got - hf_logits(base_model)).abs().max() > 0.1


def test_changed_base_byte_is_named_and_nothing_written(release, tmp_path, capsys):
    fine, base = release
    assert main(["xor", "create", "-q", str(fine), str(base), str(tmp_path / "payload")]) == 0
    shard = base / "pytorch_model-00002-of-00002.bin"
    data = bytearray(shard.read_bytes())
    data[777] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["xor", "apply", "-q", str(tmp_path / "payload"), str(base), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if "00002-of-00002" in line)
    assert "FAIL" in row and "differ" in row
    assert "pytorch_model-00001-of-00002.bin  PASS" in captured.out
    assert "nothing was written" in captured.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_crlf_json_in_base_is_diagnosed(release, tmp_path, capsys):
    fine, base = release
    cfg = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}
    (base / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (fine / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    manifest = tmp_path / "m.json"
    assert main(["xor", "create", "-q", str(fine), str(base), str(tmp_path / "payload")]) == 0
    doc = json.loads((tmp_path / "payload" / "xor-manifest.json").read_text())
    doc["base"]["files"]["tokenizer_config.json"] = {"md5": __import__("hashlib").md5(
        (base / "tokenizer_config.json").read_bytes()).hexdigest()}
    manifest.write_text(json.dumps(doc))
    crlf = (base / "tokenizer_config.json").read_bytes().replace(b"\n", b"\r\n")
    (base / "tokenizer_config.json").write_bytes(crlf)
    capsys.readouterr()
    assert main(["xor", "verify", "--base", "-q", "--manifest", str(manifest), str(base)]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if "tokenizer_config.json" in line)
    assert "FAIL" in row and "Windows line endings" in row and "matches once they are LF" in row


def test_verify_names_a_changed_output_file(release, tmp_path, capsys):
    fine, base = release
    assert main(["xor", "create", "-q", str(fine), str(base), str(tmp_path / "payload")]) == 0
    assert main(["xor", "apply", "-q", str(tmp_path / "payload"), str(base), str(tmp_path / "out")]) == 0
    manifest = str(tmp_path / "payload" / "xor-manifest.json")
    assert main(["xor", "verify", "-q", "--manifest", manifest, str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "tokenizer.model", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00")
    (tmp_path / "out" / "config.json").write_text("{}")
    capsys.readouterr()
    assert main(["xor", "verify", "-q", "--manifest", manifest, str(tmp_path / "out")]) == 1
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert "FAIL" in rows["tokenizer.model"] and "FAIL" in rows["config.json"]
    assert "PASS" in rows["pytorch_model-00001-of-00002.bin"]
    assert "truncated" in rows["config.json"]  # 2 bytes where the manifest says more


def test_builtin_pygmalion_manifest_checks_a_look_alike_folder(tmp_path, capsys):
    m = load_manifest("pygmalion-7b")
    assert m.output["pytorch_model-00001-of-00002.bin"]["md5"] == "98764eb949eea16f8e2e1c2d3dea0066"
    assert m.base["pytorch_model-00002-of-00002.bin"]["sha256"].startswith("461bc5e5")
    for name in m.output:
        (tmp_path / name).write_bytes(b"not the real file\n")
    capsys.readouterr()
    assert main(["xor", "verify", "-q", str(tmp_path)]) == 1  # chosen by its file list
    out = capsys.readouterr().out
    assert "pygmalion-7b" in out and "0 of 9 files pass, 9 fail" in out
    assert main(["xor", "verify", "-q", "--base", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "transformers' convert_llama_weights_to_hf.py of version 4.28.0.dev0" in out


def test_refuses_to_overwrite_without_force(release, tmp_path, capsys):
    fine, base = release
    payload = tmp_path / "payload"
    reference_codec(payload, fine, base, encode=True)
    args = ["xor", "apply", "-q", str(payload), str(base), str(tmp_path / "out")]
    assert main(args) == 0
    assert main(args) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


@pytest.mark.parametrize("case, message", [
    ("no-payload", "payload folder not found"),
    ("payload-is-file", "the payload must be a folder"),
    ("empty-payload", "the payload folder has no files"),
    ("no-base-file", "the base has no tokenizer.model"),
    ("no-base", "base folder not found"),
    ("bad-manifest", "not a Galatea XOR manifest"),
    ("unknown-manifest", "no such file and no built-in manifest"),
    ("corrupt-gzip", "corrupt or truncated gzip payload"),
])
def test_clear_errors(release, tmp_path, capsys, case, message):
    fine, base = release
    payload = tmp_path / "payload"
    reference_codec(payload, fine, base, encode=True, compress=case == "corrupt-gzip")
    extra: list[str] = []
    if case == "no-payload":
        payload = tmp_path / "nowhere"
    elif case == "payload-is-file":
        payload = payload / "config.json"
    elif case == "empty-payload":
        payload = tmp_path / "empty"
        payload.mkdir()
    elif case == "no-base-file":
        (base / "tokenizer.model").unlink()
    elif case == "no-base":
        base = tmp_path / "nobase"
    elif case == "bad-manifest":
        (tmp_path / "m.json").write_text("{}")
        extra = ["--manifest", str(tmp_path / "m.json")]
    elif case == "unknown-manifest":
        extra = ["--manifest", "pygmalion-13b"]
    elif case == "corrupt-gzip":
        data = (payload / "pytorch_model-00001-of-00002.bin").read_bytes()
        (payload / "pytorch_model-00001-of-00002.bin").write_bytes(data[: len(data) // 2])
    assert main(["xor", "apply", "-q", *extra, str(payload), str(base), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and err.endswith(errors[0] + "\n") and "Traceback" not in err
    out = tmp_path / "out"
    assert not out.exists() or not any(p.name.endswith(".partial") for p in out.iterdir())


def test_not_enough_disk_space_is_refused_before_writing(release, tmp_path, monkeypatch):
    fine, base = release
    reference_codec(tmp_path / "payload", fine, base, encode=True)
    monkeypatch.setattr(xor.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(GalateaError, match=r"needs .* of free space and has 0.0 MB"):
        xor.apply(tmp_path / "payload", base, tmp_path / "out", log=lambda s: None)
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("failure", ["disk-full", "interrupt"])
def test_failure_mid_file_leaves_no_partial_file(release, tmp_path, monkeypatch, failure):
    fine, base = release
    reference_codec(tmp_path / "payload", fine, base, encode=True)
    seen = []

    def bar(label, total):
        class Bar:
            def update(self, n):
                seen.append(n)
                if len(seen) == 2:  # in the middle of the first (largest) shard
                    if failure == "interrupt":
                        raise KeyboardInterrupt
                    raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                pass
        return Bar()

    with pytest.raises(GalateaError, match="disk full" if failure == "disk-full" else "interrupted"):
        xor.apply(tmp_path / "payload", base, tmp_path / "out", log=lambda s: None, progress_factory=bar)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["config.json"]  # finished before the failure; the shard being written is gone


def test_command_line_progress_and_exit_code(release, tmp_path):
    fine, base = release
    reference_codec(tmp_path / "payload", fine, base, encode=True)
    run = subprocess.run([sys.executable, "-m", "galatea", "xor", "apply", str(tmp_path / "payload"), str(base),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "B/s" in run.stderr and "100%" in run.stderr  # the tqdm bar with throughput
    assert "no manifest matches" in run.stderr
