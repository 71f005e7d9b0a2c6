"""Browser safety (issue 17) in a real headless chromium: a page of another site (`evil.test`)
cannot read or change chats through the chat page's API, cannot reach our server through a
rebound DNS name, while KoboldAI Lite-style cross-origin calls to the Kobold API still work;
and a server started with --api-key asks the page's user for the key once and keeps it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.helpers import Server, running_server

pytestmark = [pytest.mark.browser, pytest.mark.server]

# What a hostile page tries against http://127.0.0.1:PORT (`target`), each attempt reported.
ATTACKS = """async ({target, chat, character}) => {
  const out = {};
  try { const r = await fetch(`${target}/galatea/characters`); out.read = await r.text(); }
  catch (e) { out.read = "blocked"; }
  try {
    const r = await fetch(`${target}/galatea/chats/${chat}/send`, {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({text: "preflighted"})});
    out.json_write = await r.text();
  } catch (e) { out.json_write = "blocked"; }
  // A "simple" request needs no preflight: it reaches the server, which must refuse it itself.
  await fetch(`${target}/galatea/characters/${character}/chats`, {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"}, body: "{}"});
  await fetch(`${target}/galatea/chats/${chat}/send`, {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"}, body: JSON.stringify({text: "simple request"})});
  // A form post, as a page would make it without any script.
  await new Promise((done) => {
    const frame = document.createElement("iframe");
    frame.name = "sink"; frame.onload = done; document.body.appendChild(frame);
    const form = document.createElement("form");
    form.method = "POST"; form.enctype = "text/plain"; form.target = "sink";
    form.action = `${target}/galatea/chats/${chat}/send`;
    const field = document.createElement("input");
    field.name = '{"text": "form post", "x": "'; field.value = '"}';
    form.appendChild(field); document.body.appendChild(form); form.submit();
  });
  // What KoboldAI Lite does from its own origin: a JSON generate call with CORS.
  const r = await fetch(`${target}/api/v1/generate`, {method: "POST",
    headers: {"Content-Type": "application/json", ...(window.key ? {"Authorization": `Bearer ${window.key}`} : {})},
    body: JSON.stringify({prompt: "Hello", max_length: 2})});
  out.kobold = (await r.json()).results[0].text;
  return out;
}"""


class AttackerSite:
    """A plain page on another port, opened as http://evil.test:PORT/ (another site)."""

    def __init__(self) -> None:
        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"<!doctype html><title>evil</title><body>nothing to see</body>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://evil.test:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def attacker() -> Iterator[AttackerSite]:
    site = AttackerSite()
    yield site
    site.httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory)


def snapshot(server) -> tuple[int, list]:
    character = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
    chats = httpx.get(f"{server.url}/galatea/characters/{character}/chats", timeout=10).json()
    messages = [httpx.get(f"{server.url}/galatea/chats/{c['id']}", timeout=10).json()["messages"] for c in chats]
    return character, [len(chats), messages]


def test_another_site_cannot_read_or_change_chats(browser, server, attacker):
    character = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
    chat = httpx.post(f"{server.url}/galatea/characters/{character}/chats", timeout=10).json()["id"]
    _, before = snapshot(server)
    page = browser.new_page()
    try:
        page.goto(attacker.url)
        out = page.evaluate(ATTACKS, {"target": server.url, "chat": chat, "character": character})
    finally:
        page.close()
    assert out["read"] == "blocked" and out["json_write"] == "blocked", out
    assert isinstance(out["kobold"], str)  # Lite's cross-origin Kobold calls keep working
    _, after = snapshot(server)
    assert after == before  # no chat made, no message stored by the simple requests or the form


def test_another_site_cannot_read_the_pages_reply_while_it_streams(browser, server, attacker):
    """KoboldAI Lite polls /api/extra/generate/check from its own site (open CORS): without a
    genkey it may see the last Kobold request, never a reply of the chat page."""
    character = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
    chat = httpx.post(f"{server.url}/galatea/characters/{character}/chats", timeout=10).json()["id"]
    httpx.put(f"{server.url}/galatea/chats/{chat}/settings",
              json={"max_new_tokens": 400, "temperature": 1.5, "min_p": 0}, timeout=10)
    page = browser.new_page()
    seen = []
    try:
        page.goto(attacker.url)
        with httpx.stream("POST", f"{server.url}/galatea/chats/{chat}/send", json={"text": "Tell me a long tale."},
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"text"' in line and not seen:
                    seen.append(page.evaluate("""async (target) => {
                      const r = await fetch(`${target}/api/extra/generate/check`);
                      return (await r.json()).results[0].text; }""", server.url))
                    still = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["live"]
                    seen.append(still)
                    httpx.post(f"{server.url}/galatea/abort", json={"chat_id": chat}, timeout=10)
    finally:
        page.close()
    assert seen[0] == "" and seen[1], seen  # read while the reply was still running: nothing


def test_a_rebound_dns_name_is_refused(browser, server):
    """DNS rebinding: a page at evil.test whose name later resolves to 127.0.0.1 is same-origin
    with itself, so CORS cannot stop it; the Host check must."""
    page = browser.new_page()
    try:
        port = server.url.rsplit(":", 1)[1]
        response = page.goto(f"http://evil.test:{port}/galatea/characters")
        assert response.status == 403 and "host name" in page.content()
        response = page.goto(f"{server.url}/galatea/characters")  # by its own address it answers
        assert response.status == 200
    finally:
        page.close()


def test_the_page_asks_for_the_api_key_once_and_keeps_it(browser, tmp_path, attacker):
    s = Server(tmp_path, "--api-key", "s3cret")
    asked: list[str] = []
    page = browser.new_context().new_page()
    try:
        def answer(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept("s3cret")

        page.on("dialog", answer)
        page.goto(s.url + "/")
        page.wait_for_selector("#character option:text('Aria')", state="attached")
        page.wait_for_selector(".msg.char .text:has-text('Well met, traveller')")
        assert len(asked) == 1 and "API key" in asked[0]
        page.fill("#input", "Hello!")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        page.reload()
        page.wait_for_selector(".msg.user .text:has-text('Hello!')")
        assert len(asked) == 1  # kept: not asked again

        # another site gets nothing: the cookie is SameSite=Strict and the key is not sent
        page.goto(attacker.url)
        out = page.evaluate("""async (target) => {
          try { const r = await fetch(`${target}/galatea/characters`, {credentials: "include"});
                return String(r.status); } catch (e) { return "blocked"; } }""", s.url)
        assert out == "blocked"
        page.evaluate("window.key = 's3cret'")  # Lite with the key: its Kobold calls work
        text = page.evaluate("""async (target) => {
          const r = await fetch(`${target}/api/v1/generate`, {method: "POST", headers: {
            "Content-Type": "application/json", "Authorization": "Bearer s3cret"},
            body: JSON.stringify({prompt: "Hi", max_length: 2})});
          return r.status; }""", s.url)
        assert text == 200
    finally:
        page.context.close()
        log = s.stop()
    assert "Traceback" not in log, log
