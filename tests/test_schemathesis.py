"""Schemathesis against our own OpenAPI schema on a real `galatea serve` (issue 17): generated
requests to every route, valid and invalid, with a fixed seed and example budget, must never be
answered with a 5xx, never time out, and never leave a traceback in the server's log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import ROOT
from tests.helpers import running_server

pytestmark = pytest.mark.server

EXAMPLES = 20  # per operation and phase; about two minutes on a quiet 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory)


def test_generated_requests_get_no_server_error(server, tmp_path):
    exe = Path(sys.executable).parent / "schemathesis"
    assert exe.exists(), "schemathesis is a test dependency: pip install -e '.[test]'"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [str(exe), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
         "--phases", "fuzzing,stateful", "--max-examples", str(EXAMPLES), "--seed", "17",
         "--generation-database", "none", "--request-timeout", "60", "--workers", "1", "--no-color"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)  # its cache stays there
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert " passed" in run.stdout and "errored" not in run.stdout, report
