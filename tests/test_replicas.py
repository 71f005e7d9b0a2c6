"""Two `galatea serve` replicas on one PostgreSQL (issue 14, point 3): a chat started through one
continues through the other, and swipes asked of both at once are all kept, none twice."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.helpers import Server

pytestmark = pytest.mark.server


def _reply(server: Server, chat: int, action: str, body: dict | None = None) -> dict:
    with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/{action}", json=body or {}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1].get("done") and "error" not in events[-1], events[-1]
    return events[-1]


def test_two_replicas_share_chats_through_postgresql(postgres, tmp_path):
    url = postgres.database()
    a = Server(tmp_path / "a", "--store", url)
    b = Server(tmp_path / "b", "--store", url, "--allow-host", "chat.example.org")  # as behind nginx
    try:
        aria = httpx.get(f"{a.url}/galatea/characters", timeout=10).json()
        assert [c["name"] for c in aria] == ["Aria"]  # the bundled character, added once for both
        assert [c["name"] for c in httpx.get(f"{b.url}/galatea/characters", timeout=10).json()] == ["Aria"]
        chat = httpx.post(f"{a.url}/galatea/characters/{aria[0]['id']}/chats", timeout=10).json()["id"]
        for server in (a, b):
            assert httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json={"max_new_tokens": 8},
                             timeout=10).status_code == 200
        _reply(a, chat, "send", {"text": "Hello from the first replica."})
        seen_by_b = httpx.get(f"{b.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
        assert [m["text"] for m in seen_by_b][1] == "Hello from the first replica." and len(seen_by_b) == 3

        # both replicas swipe the same reply at once, twice each
        errors: list[BaseException] = []

        def swipes(server: Server) -> None:
            try:
                for _ in range(2):
                    _reply(server, chat, "regenerate")
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=swipes, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        messages = httpx.get(f"{a.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
        assert len(messages) == 3 and messages[2]["swipes"] == 5  # the first reply and four swipes

        # behind a reverse proxy passing the public name: that name is let in, others still not
        assert httpx.get(f"{b.url}/galatea/characters", headers={"Host": "chat.example.org"}, timeout=10).is_success
        assert httpx.get(f"{b.url}/galatea/characters", headers={"Host": "evil.test"}, timeout=10).status_code == 403
        assert httpx.get(f"{a.url}/galatea/characters", headers={"Host": "chat.example.org"},
                         timeout=10).status_code == 403
        _reply(b, chat, "send", {"text": "And now from the second."})  # the chat goes on through b
        messages = httpx.get(f"{a.url}/galatea/chats/{chat}", timeout=10).json()["messages"]
        assert len(messages) == 5 and messages[3]["text"] == "And now from the second."
    finally:
        logs = a.stop() + b.stop()
    assert "Traceback" not in logs, logs
