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

        # text must arrive while the reply streams: watched by a MutationObserver, since a short
        # reply can stream and be replaced by the stored one between two polls
        page.evaluate("""new MutationObserver(() => {
            if (document.querySelector('.msg.streaming .text')?.textContent) window.sawStreaming = true;
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true})""")
        page.fill("#input", "Hello Aria! Tell me about Pip.")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        assert page.evaluate("window.sawStreaming === true")
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
            # Pygmalion's layout, where this greedy reply ends by itself well before 500 tokens (in
            # the model's ChatML it loops on, and two long greedy runs may part at a float16 near-tie)
            _settings(server, c, temperature=0, max_new_tokens=500, repetition_penalty=1.0, format="pygmalion")
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


def test_characters_lorebooks_and_chats_are_managed_from_the_page(browser, tmp_path):
    """Issue 15, points 3 and 4, as a user clicks through them: the same card imported twice is
    one character (unless asked for a copy); the character editor (fields, greetings, picture,
    export, delete); SillyTavern world info imported, attached, edited and seen in the prompt;
    a chat renamed, searched, imported with its dates and a name warning, deleted."""
    from io import BytesIO

    from PIL import Image

    server = Server(tmp_path)
    errors: list[str] = []
    dialogs: list[str] = []
    answers: list[bool] = []
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept() if answers.pop(0) else d.dismiss()))
        page.goto(server.url + "/")
        page.wait_for_selector(".msg.char .text:has-text('Well met')")

        card = tmp_path / "mira.json"
        card.write_text(json.dumps({"name": "Mira", "description": "A witch.", "first_mes": "Who goes there?"}))
        page.set_input_files("#import", str(card))
        page.wait_for_selector("#status:has-text('imported Mira')")
        answers.append(False)  # "import it as a copy anyway?" - no
        page.set_input_files("#import", str(card))
        page.wait_for_selector("#status:has-text('Mira is already in the library')")
        assert "already in the library" in dialogs[-1]
        assert [c["name"] for c in httpx.get(f"{server.url}/galatea/characters", timeout=10).json()] == ["Aria", "Mira"]
        mira = page.evaluate("state.character")

        # the character editor
        page.click("#edit-character")
        page.wait_for_selector("#character-dialog[open]")
        assert page.input_value("#character-form [name='first_mes']") == "Who goes there?"
        page.fill("#character-form [name='description']", "A witch of the marsh, {{user}}'s old friend.")
        page.fill("#character-form [name='tags']", "witch, marsh")
        page.fill("#character-form [name='nickname']", "Mi")  # V3's own fields
        page.fill("#character-form [name='source']", "https://example.org/mira")
        page.select_option("#character-form [name='card_format']", "metharme")  # this character's format
        page.click("#add-greeting")
        page.locator(".alt-greeting").last.fill("Back so soon?")
        picture = tmp_path / "red.png"
        Image.new("RGB", (48, 48), (200, 20, 20)).save(picture)
        page.set_input_files("#card-picture-file", str(picture))
        page.wait_for_function("document.querySelector('#card-picture').src.includes('?t=')")
        with page.expect_download() as download:
            page.click("#export-json")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-character-editor.png"))
        page.click("#save-character")
        page.wait_for_selector("#status:has-text('saved Mira')")
        saved = httpx.get(f"{server.url}/galatea/characters/{mira}", timeout=10).json()["card"]
        assert saved["description"] == "A witch of the marsh, {{user}}'s old friend."
        assert saved["alternate_greetings"] == ["Back so soon?"] and saved["tags"] == ["witch", "marsh"]
        assert saved["nickname"] == "Mi" and saved["source"] == ["https://example.org/mira"]
        assert saved["extensions"]["galatea"] == {"format": "metharme"}
        exported = json.loads(open(download.value.path()).read())  # exported before the save: the old card
        assert exported["spec"] == "chara_card_v2" and exported["data"]["description"] == "A witch."
        avatar = Image.open(BytesIO(httpx.get(f"{server.url}/galatea/characters/{mira}/image", timeout=10).content))
        assert avatar.format == "PNG" and avatar.convert("RGB").getpixel((10, 10)) == (200, 20, 20)

        page.click("#new-chat")  # the new greeting is the first message's second swipe
        page.wait_for_selector(".msg.char .swipe-count:text('1/2')")

        # a lorebook: SillyTavern world info, attached to this chat, edited, used in the prompt
        page.click("#open-lorebooks")
        page.set_input_files("#import-lorebook", str(ROOT / "tests" / "data" / "world-info-sillytavern.json"))
        row = page.locator("#lorebook-list tbody tr", has_text="world-info-sillytavern")
        row.wait_for()
        assert row.locator("td").nth(1).inner_text() == "4"
        row.locator("input[type=checkbox]").first.check()  # this chat
        page.wait_for_selector("#status:has-text('attached')")
        row.locator("button:text('Edit')").click()
        first = page.locator("#entries .entry").first
        first.locator("textarea").fill("{{char}} calls it the Singing Wood.")
        page.screenshot(path=str(ARTIFACTS / "web-lorebooks.png"))
        page.click("#save-lorebook")
        page.wait_for_selector("#status:has-text('lorebook saved')")
        # the card's own lorebook, in the same editor, saved into the card
        page.locator("#lorebook-list tr.own-book button:text('Edit')").click()
        page.click("#add-entry")
        own = page.locator("#entries .entry").last
        own.locator("input").nth(1).fill("marsh")  # its keys
        own.locator("textarea").fill("The marsh is {{char}}'s home.")
        page.click("#save-lorebook")
        page.wait_for_selector("#status:has-text('lorebook saved')")
        book = httpx.get(f"{server.url}/galatea/characters/{mira}", timeout=10).json()["card"]["character_book"]
        assert [(e["keys"], e["content"]) for e in book["entries"]] == [(["marsh"], "The marsh is {{char}}'s home.")]
        page.keyboard.press("Escape")
        page.fill("#input", "What lies in the forest?")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')", timeout=120_000)
        page.click("#show-prompt")
        page.wait_for_selector("#prompt-dialog[open]")
        prompt = page.inner_text("#prompt-text")
        # SillyTavern's places: the edited entry before the character (position 0), the constant one after
        # (in the Metharme story the card chose: SillyTavern's default story string)
        assert "<|system|>Enter RP mode. Pretend to be " in prompt and "<|model|>" in prompt
        # (the card's own "marsh" entry joins them when the reply said "marsh": the order is what counts)
        story = prompt.split("follows:\n", 1)[1]
        assert story.index("Mira calls it the Singing Wood.") < story.index("A witch of the marsh, You's old friend.") \
            < story.index("Over Eldoria the moon is always full.")
        page.keyboard.press("Escape")

        # chats: rename, search, import with dates and a warning, delete
        page.click("#chat-menu summary")
        page.click("#rename-chat")
        page.fill("#chat-title", "Forest talk")
        page.click("#save-title")
        page.wait_for_selector("#chat option:text-matches('^Forest talk')", state="attached")
        page.click("#chat-menu summary")
        page.click("#search-chats")
        page.fill("#search-text", "FOREST")
        page.keyboard.press("Enter")
        hit = page.locator("#search-results li", has_text="Forest talk · #2")
        hit.wait_for()
        page.screenshot(path=str(ARTIFACTS / "web-search.png"))
        # the hit re-renders the chat (awaits in between): a menu opened on the old rendering
        # closes with it, so wait for the new one (marked: the old messages carry data-stale)
        page.evaluate("document.querySelectorAll('.msg').forEach(m => m.dataset.stale = '1')")
        hit.click()
        page.wait_for_selector(".msg:not([data-stale])")
        talk = page.evaluate("state.chat")
        first = page.locator(".msg").first  # branch from the greeting: a new chat with just it
        first.locator("details.menu summary").click()
        first.locator("button[title^='A new chat']").click()
        page.wait_for_selector("#status:has-text('a branch from message #1')")
        page.wait_for_function("[...document.querySelectorAll('#chat option')]"
                               ".some(o => o.text === 'Forest talk (branch) (1)')")
        assert page.evaluate("state.chat") != talk and page.locator(".msg").count() == 1

        st = tmp_path / "seraphina.jsonl"
        lines = [{"user_name": "You", "character_name": "Seraphina", "create_date": "2024-05-14@21h33m19s"},
                 {"name": "Seraphina", "is_user": False, "send_date": "May 14, 2024 9:33pm", "mes": "*smiles* Hello."},
                 {"name": "You", "is_user": True, "send_date": "May 14, 2024 9:35pm", "mes": "Where am I?"}]
        st.write_text("\n".join(json.dumps(x) for x in lines))
        page.click("#chat-menu summary")
        page.set_input_files("#import-chat", str(st))
        page.wait_for_selector("#status:has-text(\"was with 'Seraphina', not 'Mira'\")")
        page.wait_for_selector(".msg.user .text:has-text('Where am I?')")
        assert page.locator(".msg time").first.get_attribute("datetime").startswith("2024-05-14")
        imported = page.evaluate("state.chat")
        answers.append(True)  # "Delete the chat ...?" - yes
        page.click("#chat-menu summary")
        page.click("#delete-chat")
        page.wait_for_selector("#status:has-text('chat deleted')")
        left = [c["id"] for c in httpx.get(f"{server.url}/galatea/characters/{mira}/chats", timeout=10).json()]
        assert imported not in left and talk in left

        page.set_viewport_size({"width": 390, "height": 844})  # a phone: the same screens fit
        page.click("#chat-menu summary")
        assert page.locator("#delete-chat").bounding_box()["x"] + 100 < 390
        page.screenshot(path=str(ARTIFACTS / "web-phone-chat-menu.png"))
        page.click("#chat-menu summary")
        n = len(httpx.get(f"{server.url}/galatea/characters/{mira}/chats", timeout=10).json())
        page.click("#edit-character")  # delete the character, after saying yes
        answers.append(True)
        page.click("#delete-character")
        page.wait_for_selector("#status:has-text('deleted Mira')")
        assert f"Delete Mira and its {n} chats?" in dialogs[-1] and n >= 3
        assert [c["name"] for c in httpx.get(f"{server.url}/galatea/characters", timeout=10).json()] == ["Aria"]
        assert page.locator("#character option").count() == 1
        assert not errors, errors
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def test_settings_presets_persona_stop_strings_context_and_defaults(browser, tmp_path):
    """Issue 15, point 1: a preset fills the samplers; the user's name and persona, a stop string
    and a smaller context reach the prompt and the reply; "make the default" carries them to a
    new chat; a preset of the user's is kept."""
    server = Server(tmp_path)
    errors: list[str] = []
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_selector(".msg.char .text:has-text('Well met')")
        chat = page.evaluate("state.chat")

        def settings(save: str = "#save-settings", **fields: str) -> None:
            page.click("#open-settings")
            page.wait_for_selector("#settings-dialog[open]")
            for name, value in fields.items():
                page.fill(f"#settings-form [name='{name}']", value)
            page.click(save)
            page.wait_for_selector("#status:has-text('settings saved')")
            page.evaluate("document.querySelector('#status').textContent = ''")

        def reply(action: str) -> str:
            page.click(action) if action.startswith("#") else (page.fill("#input", action),
                                                              page.keyboard.press("Enter"))
            page.wait_for_function("document.querySelector('#status').textContent.includes('tok/s')",
                                   timeout=120_000)
            text = httpx.get(f"{server.url}/galatea/chats/{chat}", timeout=10).json()["messages"][-1]["text"]
            page.evaluate("document.querySelector('#status').textContent = ''")
            return text

        page.click("#open-settings")
        page.wait_for_selector("#settings-dialog[open]")
        page.select_option("#preset", "Deterministic")
        assert page.input_value("[name='temperature']") == "0"
        assert page.input_value("[name='repetition_penalty']") == "1"
        # the prompt format: "auto" names what the model's metadata picks; Pygmalion's layout chosen
        auto = page.locator("[name='format'] option[value='auto']").inner_text()
        assert auto == "auto (the character's, else the model's chat template)"
        page.select_option("[name='format']", "pygmalion")
        page.fill("[name='max_new_tokens']", "40")
        page.fill("[name='user_name']", "Ann")
        page.fill("[name='persona']", "{{user}} is a knight of the north.")
        page.fill("#preset-name", "Knightly")
        page.click("#save-preset")
        page.wait_for_selector("#preset option:text('Knightly (yours)')", state="attached")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-settings.png"))
        page.click("#save-settings")
        page.wait_for_selector("#status:has-text('settings saved')")

        first = reply("Hello, who are you?")  # greedy, 40 tokens
        cut = "e"  # a stop string met within the first words (a reply is never empty of it for long)
        assert len(first.split()) >= 3 and cut in first, first
        settings(stop=cut)
        second = reply("#regen")
        # greedy again, so the same start (later tokens may differ: the prompt cache's float16 keys
        # can flip a near-tie), and it ends before the stop string
        assert second and second == first[:first.index(cut)].strip(), (first, second)

        page.click("#show-prompt")
        page.wait_for_selector("#prompt-dialog[open]")
        full = page.inner_text("#prompt-text")
        assert "\nAnn is a knight of the north.\n<START>" in full and "\nAnn: Hello, who are you?\n" in full
        full_tokens = int(full.split(" tokens")[0].strip("("))
        page.keyboard.press("Escape")
        settings(max_context=str(full_tokens + 40 - 10))  # 10 tokens short: an example block must go
        page.click("#show-prompt")
        page.wait_for_selector("#prompt-dialog[open]")
        small = page.inner_text("#prompt-text")
        assert int(small.split(" tokens")[0].strip("(")) <= full_tokens - 10
        assert small.count("<START>") < full.count("<START>")
        page.keyboard.press("Escape")

        settings("#save-default", max_context="0")
        page.click("#new-chat")
        page.wait_for_function(f"state.chat !== {chat}")
        fresh = httpx.get(f"{server.url}/galatea/chats/{page.evaluate('state.chat')}/settings", timeout=10).json()
        assert fresh["temperature"] == 0 and fresh["persona"] == "{{user}} is a knight of the north."
        assert fresh["stop"] == [cut] and fresh["max_new_tokens"] == 40 and fresh["format"] == "pygmalion"
        presets = {p["name"]: p for p in httpx.get(f"{server.url}/galatea/presets", timeout=10).json()}
        assert presets["Knightly"]["settings"]["temperature"] == 0 and not presets["Knightly"]["builtin"]
        assert not errors, errors
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def test_a_reasoning_models_thinking_shows_folded(browser, tmp_path):
    """A chat from SillyTavern whose reply carries a thinking model's reasoning (its
    `extra.reasoning`): the page shows it folded above the reply, the reply itself as usual."""
    server = Server(tmp_path)
    try:
        aria = httpx.get(f"{server.url}/galatea/characters", timeout=10).json()[0]["id"]
        lines = [{"user_name": "You", "character_name": "Aria"},
                 {"name": "You", "is_user": True, "send_date": "May 14, 2024 9:35pm", "mes": "Who are you?"},
                 {"name": "Aria", "is_user": False, "send_date": "May 14, 2024 9:36pm", "mes": "I am Aria.",
                  "extra": {"reasoning": "They ask my name; I answer warmly."}}]
        r = httpx.post(f"{server.url}/galatea/characters/{aria}/chats/import",
                       content="\n".join(json.dumps(x) for x in lines), timeout=10)
        chat = r.json()["id"]
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(server.url + "/")
        page.wait_for_selector("#chat option", state="attached")
        page.select_option("#chat", value=str(chat))
        reply = page.locator(".msg.char").last
        reply.locator(".text:has-text('I am Aria.')").wait_for()
        thought = reply.locator("details.thought")
        assert thought.is_visible() and thought.get_attribute("open") is None  # folded
        assert thought.locator("summary").inner_text() == "Thought"
        assert "I answer warmly" not in reply.locator(".text").inner_text()
        thought.locator("summary").click()
        assert thought.locator(".thought-text").inner_text() == "They ask my name; I answer warmly."
        assert page.locator(".msg.user details.thought").first.is_hidden()
        page.close()
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
