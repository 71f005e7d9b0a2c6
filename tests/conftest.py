"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# `evil.test` resolves to 127.0.0.1 inside the browser: a second site (and a DNS-rebinding name
# for our own server) without touching the machine's resolver.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP evil.test 127.0.0.1"]


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright (which downloads no browser of its own)."""
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        raise AssertionError("Debian chromium is needed: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def embedded_lm():
    """The embedded SmolLM2 as `galatea chat` loads it (its GGUF types, the best kernels)."""
    from galatea.model.checkpoint import load

    return load(None)


@pytest.fixture(scope="session")
def embedded_lm_exact():
    """The embedded SmolLM2 dequantized to float32: exact compute, where a test compares two
    ways of computing the same thing (batched or not, reused cache or not) token for token."""
    import torch

    from galatea.model.checkpoint import load

    return load(None, dtype=torch.float32, quant="none")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL (Debian's), started once for the session on a loopback port."""
    from tests.helpers import Postgres

    cluster = Postgres()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def llama_tok():
    """The LLaMA / Pygmalion 7B vocabulary (SentencePiece, from the shared GGUF)."""
    from galatea.model.checkpoint import load_tokenizer
    from tests.checkpoints import shared_vocab

    return load_tokenizer(shared_vocab())


@pytest.fixture(scope="session")
def smol_tok():
    """The embedded SmolLM2's tokenizer (GPT-2 style BPE, with its ChatML chat template)."""
    from galatea.model.checkpoint import embedded_model_path, load_tokenizer

    return load_tokenizer(embedded_model_path())
