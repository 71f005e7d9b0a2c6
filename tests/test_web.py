"""The chat page in a real headless browser (Debian chromium driven by Playwright) against a real
server: pick the bundled character, send, see the streamed reply, regenerate, swipe, reload."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from galatea.chat.cards import Character
from tests.checkpoints import ROOT
from tests.helpers import Server

pytestmark = [pytest.mark.browser, pytest.mark.server]

ARTIFACTS = ROOT / "test-artifacts"


def test_chat_page(browser, tmp_path):
    server = Server(tmp_path)
    errors: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector("#character option:text('Aria')", state="attached")
        page.wait_for_selector(".msg.char .text:has-text('Well met, traveller')")

        page.fill("#input", "Hello Aria! Tell me about Pip.")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.streaming .text:not(:empty)", timeout=60_000)  # text arrives while streaming
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        msgs = page.locator(".msg")
        assert msgs.count() == 3
        assert "Hello Aria! Tell me about Pip." in msgs.nth(1).inner_text()
        first_reply = msgs.nth(2).locator(".text").inner_text()
        assert first_reply.strip()

        page.evaluate("document.querySelector('#status').textContent = ''")
        page.click("#regen")
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        page.wait_for_selector(".msg:last-child .swipe-count:text('2/2')")
        page.locator(".msg:last-child button[title='Previous swipe']").click()
        page.wait_for_selector(".msg:last-child .swipe-count:text('1/2')")
        assert page.locator(".msg:last-child .text").inner_text() == first_reply

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"), full_page=True)

        page.reload()  # the chat is in the store: it comes back
        page.wait_for_selector(".msg.user .text:has-text('Hello Aria! Tell me about Pip.')")
        page.wait_for_selector(".msg:last-child .swipe-count:text('1/2')")
        page.set_viewport_size({"width": 1280, "height": 800})
        page.screenshot(path=str(ARTIFACTS / "web-chat-desktop.png"))

        # the settings panel: change this chat's reply length and DRY, and the next reply obeys
        page.click("#open-settings")
        page.wait_for_selector("#settings-dialog[open]")
        assert page.input_value("input[name='temperature']") == "0.7"  # the chat's current settings
        page.fill("input[name='max_new_tokens']", "6")
        page.fill("input[name='dry_multiplier']", "0.8")
        page.select_option("select[name='mirostat']", "2")
        page.click("#save-settings")
        page.wait_for_selector("#status:has-text('settings saved')")
        saved = page.evaluate("fetch(`/galatea/chats/${state.chat}/settings`).then(r => r.json())")
        assert saved["max_new_tokens"] == 6 and saved["dry_multiplier"] == 0.8 and saved["mirostat"] == 2
        page.evaluate("document.querySelector('#status').textContent = ''")
        page.fill("#input", "Sing me a long song, please.")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        reply_tokens = int(page.inner_text("#status").split("reply ")[1].split(" tok")[0])
        assert 1 <= reply_tokens <= 6

        # importing a PNG card (what a drop on the page does) selects the new character
        card = tmp_path / "mira.png"
        card.write_bytes(Character(name="Mira", description="A witch.", first_mes="Who goes there?").to_png())
        page.set_input_files("#import", str(card))
        page.wait_for_selector("#status:has-text('imported Mira')")
        page.wait_for_selector(".msg.char .text:has-text('Who goes there?')")
        assert page.locator("#character").evaluate("s => s.selectedOptions[0].text") == "Mira"
        assert not errors, errors
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


HOSTILE = ('*waves* "Hello <img src=x onerror=\'window.pwned = 2\'>" **bold** '
           '[click](javascript:window.pwned=3) `<b>code</b>` <script>window.pwned = 1</script>')


def test_messages_are_formatted_and_nothing_from_a_card_executes(browser, tmp_path):
    """SillyTavern's formatting (*actions*, "speech", **bold**, `code`) on a hostile card: its
    tags, handlers and javascript: links must stay text. Avatars, timestamps, the message
    menu and editing in place."""
    server = Server(tmp_path)
    errors: list[str] = []
    try:
        card = {"name": "Eve", "description": "<script>window.pwned = 5</script>A trickster.", "first_mes": HOSTILE}
        assert httpx.post(f"{server.url}/galatea/characters", content=json.dumps(card), timeout=10).status_code == 200
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        page.goto(server.url + "/")
        page.wait_for_selector("#character option:text('Eve')", state="attached")
        page.select_option("#character", label="Eve")  # maybe while the first character still loads
        page.wait_for_selector(".msg.char .text:has-text('[click]')")
        page.wait_for_timeout(500)  # a late answer for the first character must not replace Eve's chat
        assert page.locator(".msg.char").count() == 1
        greeting = page.locator(".msg.char .text").first
        assert greeting.locator("em").inner_text() == "waves"
        assert greeting.locator(".speech").inner_text() == '"Hello <img src=x onerror=\'window.pwned = 2\'>"'
        assert greeting.locator("strong").inner_text() == "bold"
        assert greeting.locator("code").inner_text() == "<b>code</b>"
        assert "[click](javascript:window.pwned=3)" in greeting.inner_text()
        assert page.locator("#messages img:not(.avatar), #messages script, #messages a, #messages b").count() == 0
        assert page.evaluate("window.pwned") is None

        char = page.locator(".msg.char").first
        assert "/galatea/characters/" in char.locator("img.avatar").get_attribute("src")
        assert char.locator("time").inner_text().strip()  # when it was written

        page.fill("#input", 'I *smile*. "Hi <b>there</b>!"')
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        mine = page.locator(".msg.user").last
        assert mine.locator(".avatar").inner_text() == "Y" and mine.locator("em").inner_text() == "smile"
        assert mine.locator(".speech").inner_text() == '"Hi <b>there</b>!"'

        # edit the greeting in place, from its menu
        char.locator("details.menu summary").click()
        char.locator("button[title='Edit this message']").click()
        box = char.locator("textarea.edit")
        assert box.input_value() == HOSTILE  # the raw text, marks and all
        box.fill("*bows* Welcome back.")
        char.locator("button[title='Save the edit']").click()
        page.wait_for_selector(".msg.char .text em:text('bows')")
        chat = page.evaluate("state.chat")
        stored = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"][0]["text"]
        assert stored == "*bows* Welcome back."
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-formatting.png"))
        assert page.evaluate("window.pwned") is None
        assert not errors, errors
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def _settings(server: Server, chat: int, **values: object) -> None:
    r = httpx.put(f"{server.url}/galatea/chats/{chat}/settings", json=values, timeout=10)
    assert r.status_code == 200, r.text


def _wait_idle(server: Server, chat: int, within: float = 120) -> dict:
    deadline = time.time() + within
    while (state := httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json())["live"] is not None:
        assert time.time() < deadline, f"timed out: the reply in chat {chat} still runs after {within} s"
        time.sleep(0.2)
    return state


def test_a_reply_survives_its_tab_and_stop_before_the_first_token_leaves_nothing(browser, tmp_path):
    """A long persona: the page shows how far the prompt is read; Stop while it is read keeps
    the user's message and stores no empty reply; a reply whose tab closes mid-stream goes on,
    is stored whole (the same greedy reply an uninterrupted chat gets) and streams again in
    the reopened page."""
    server = Server(tmp_path)
    errors: list[str] = []
    try:
        lore = " ".join(f"Lyra remembers verse {i} of the song of the old north road." for i in range(220))
        card = {"name": "Lyra", "description": f"A wandering bard. {lore}", "first_mes": "*tunes her lute* Hello."}
        lyra = httpx.post(f"{server.url}/galatea/characters", content=json.dumps(card), timeout=10).json()["id"]
        chat, reference = (httpx.post(f"{server.url}/galatea/characters/{lyra}/chats", timeout=10).json()["id"]
                           for _ in range(2))
        for c in (chat, reference):
            _settings(server, c, temperature=0, max_new_tokens=500, repetition_penalty=1.0)
        tabs = browser.new_context(viewport={"width": 1100, "height": 800})  # one browser profile
        page = tabs.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector(".msg.char .text:has-text('Well met')")  # the first load has ended
        page.evaluate(f"localStorage.setItem('galatea.chat', {chat})")
        page.reload()
        page.wait_for_selector(".msg.char .text:has-text('Hello.')")
        assert page.evaluate("state.chat") == chat

        page.fill("#input", "Sing me the song of the road, all of it.")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status:has-text('reading the prompt')", timeout=60_000)
        read, total = page.inner_text("#status").split(": ")[1].split(" tokens")[0].split(" / ")
        assert 0 < int(read) < int(total) and int(total) > 2000
        assert "reading the prompt" in page.locator(".msg.streaming .text").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-prompt-progress.png"))
        page.click("#stop")
        page.wait_for_selector("#status:has-text('stopped')", timeout=60_000)
        msgs = _wait_idle(server, chat)["messages"]
        assert [m["is_user"] for m in msgs] == [False, True], msgs  # no empty reply stored
        assert page.locator(".msg").count() == 2

        page.click("#regen")  # the last message is the user's: a reply to it
        page.wait_for_selector(".msg.streaming .text[data-raw]", timeout=120_000)  # reply text, not progress
        seen = page.locator(".msg.streaming .text").get_attribute("data-raw")
        page.close()  # mid-reply
        assert httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["live"] is not None, \
            "the reply had already ended: the test proves nothing (make the reply longer)"

        page = tabs.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")  # the saved chat opens, and the running reply streams in it
        page.wait_for_selector(".msg.streaming .text[data-raw]", timeout=30_000)
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        stored = _wait_idle(server, chat)["messages"]
        assert len(stored) == 3 and not stored[2]["is_user"]
        assert page.locator(".msg:last-child .text").get_attribute("data-raw") == stored[2]["text"]

        with httpx.stream("POST", f"{server.url}/galatea/chats/{reference}/send",
                          json={"text": "Sing me the song of the road, all of it."}, timeout=120) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["done"] and events[-1]["status"]["finish_reason"] != "cancelled", events[-1]
        whole = _wait_idle(server, reference)["messages"][2]["text"]
        assert stored[2]["text"] == whole and len(whole) > len(seen.strip())
        assert not errors, errors
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
