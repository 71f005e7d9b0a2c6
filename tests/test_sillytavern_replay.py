"""A real SillyTavern 1.12.6 session replayed against `galatea serve`, request by request as
SillyTavern sent it: from the second turn on the server reads only what changed, although
SillyTavern rewrites the middle of its prompt (world-info entries inserted after the first line
and removed again, the oldest message dropped and restored near the 2048-token budget).

"What changed" is measured independently of Galatea's planner: the tokens of each prompt that
difflib's longest-matching-blocks diff does not find in the previous prompt (so the previous
reply, which the server generated itself and which differs from the recorded one, counts as
new text)."""

from __future__ import annotations

import difflib
import json

import httpx
import pytest

from galatea.model.checkpoint import embedded_model_path, load_tokenizer
from tests.checkpoints import ROOT
from tests.helpers import running_server

pytestmark = pytest.mark.server

SESSION = ROOT / "tests" / "data" / "sillytavern-session" / "seraphina.jsonl"


def turns() -> list[dict]:
    if not SESSION.exists():
        raise FileNotFoundError(f"{SESSION} is missing: it is part of the repository (git checkout tests/data)")
    return [json.loads(line) for line in SESSION.read_text(encoding="utf-8").splitlines() if line.strip()]


def really_new(previous: list[int], prompt: list[int]) -> int:
    matcher = difflib.SequenceMatcher(None, previous, prompt, autojunk=False)
    return len(prompt) - sum(block.size for block in matcher.get_matching_blocks())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory, "--cache-slots", "1")


def test_each_turn_reads_only_what_changed(server):
    tok = load_tokenizer(embedded_model_path())
    read_total = new_total = 0
    previous: list[int] | None = None
    for turn in turns():
        body = turn["body"]
        r = httpx.post(f"{server.url}{turn['path']}", json=body, timeout=300)
        assert r.status_code == 200 and "data:" in r.text
        perf = httpx.get(f"{server.url}/api/extra/perf", timeout=10).json()
        prompt = tok.encode(body["prompt"])
        assert abs(perf["last_input_count"] - len(prompt)) <= 1  # (the server adds BOS where the model wants it)
        read = perf["last_input_count"] - perf["last_cached_count"]
        assert perf["last_recomputed_count"] == read
        if previous is not None:
            new = really_new(previous, prompt)
            assert read <= 1.5 * new + 40, f"turn {turn['turn']}: read {read} tokens, {new} changed"
            read_total, new_total = read_total + read, new_total + new
        previous = prompt
    assert read_total <= 1.2 * new_total, f"read {read_total} tokens over the session for {new_total} changed"
