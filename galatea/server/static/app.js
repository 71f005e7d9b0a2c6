// Galatea's chat page: plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { character: null, chat: null, busy: false };

// A server started with --api-key: ask for the key once, keep it in a cookie only this page's
// own API reads (SameSite=Strict), and try again.
async function authFetch(url, options = {}) {
  let r = await fetch(url, options);
  if (r.status === 401) {
    const key = window.prompt("This Galatea server needs its API key (galatea serve --api-key):");
    if (key) {
      document.cookie = `galatea_key=${encodeURIComponent(key)}; path=/galatea; SameSite=Strict`;
      r = await fetch(url, options);
    }
  }
  return r;
}

async function api(path, options = {}) {
  const r = await authFetch("/galatea" + path, options);
  if (!r.ok) {
    let msg = r.statusText;
    try { const e = await r.json(); msg = (e.error && e.error.message) || (e.detail && e.detail.msg) || msg; } catch (_) {}
    if (r.status === 503) status(msg);  // the chat store is unreachable: say so wherever the call came from
    throw new Error(msg);
  }
  return r.json();
}

function status(text) { $("status").textContent = text || ""; }

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["send", "regen", "continue", "new-chat"]) $(id).disabled = busy;
  $("stop").disabled = !busy;
}

async function loadCharacters(select) {
  const chars = await api("/characters");
  $("character").innerHTML = "";
  for (const c of chars) $("character").add(new Option(c.label || c.name, c.id));
  const pick = select || (state.character && chars.find((c) => c.id === state.character)?.id) || chars[0]?.id;
  if (pick) { $("character").value = pick; await openCharacter(Number(pick)); }
}

// Each open checks, after every wait, that it is still the latest: a slow answer for a
// character or chat the user has already left must not replace what is on screen.
async function openCharacter(id) {
  state.character = id;
  $("avatar").src = `/galatea/characters/${id}/image`;
  let chats = await listChats(id);
  if (state.character !== id) return;
  if (!chats.length) { await api(`/characters/${id}/chats`, { method: "POST" }); chats = await listChats(id); }
  if (state.character !== id) return;
  await openChat(chats[0].id);
}

// Fill the chat picker (titles with message counts) for a character; returns its chats, newest first.
async function listChats(characterId) {
  const chats = await api(`/characters/${characterId}/chats`);
  if (state.character !== characterId) return chats;  // the user has moved on: leave the picker
  $("chat").innerHTML = "";
  for (const c of chats) $("chat").add(new Option(`${c.title} (${c.messages})`, c.id));
  if (state.chat) $("chat").value = state.chat;
  return chats;
}

async function openChat(id) {
  if (state.following && state.following.chatId !== id) state.following.stop.abort();
  if (state.following && state.chat === id) return;  // on screen and streaming: it re-renders at its end
  state.chat = id;
  $("chat").value = id;
  localStorage.setItem("galatea.chat", id);
  const chat = await api(`/chats/${id}`);
  if (state.chat !== id) return;
  render(chat.messages);
  // a reply still running on the server (started before a reload, or in another tab): follow it
  if (chat.live && !state.busy) streamReply(chat.live.kind, id, (signal) => authFetch(`/galatea/chats/${id}/live`, { signal }));
}

function render(messages) {
  const box = $("messages");
  box.innerHTML = "";
  messages.forEach((m, i) => box.appendChild(messageView(m, i === messages.length - 1)));
  box.scrollTop = box.scrollHeight;
}

// Message text as SillyTavern shows it: *actions* in italics, "speech" highlighted, **bold** and
// `code`. Safe by construction: the text is HTML-escaped first, and only then are these marks
// turned into tags written here, so no tag, attribute or URL from the model or a card ever
// reaches the page (Markdown links and images stay plain text).
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
function escapeHtml(text) { return text.replace(/[&<>"']/g, (c) => ESCAPES[c]); }
function formatMessage(text) {
  return text.split(/(`[^`\n]+`)/).map((part, i) => {
    if (i % 2) return `<code>${escapeHtml(part.slice(1, -1))}</code>`;
    return escapeHtml(part)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/\*([^*\n]+)\*/g, "<em>$1</em>")
      .replace(/&quot;([^\n]*?)&quot;/g, '<span class="speech">&quot;$1&quot;</span>')
      .replace(/\u201c([^\u201d\n]*)\u201d/g, '<span class="speech">\u201c$1\u201d</span>');
  }).join("");
}

function avatarView(m) {
  if (!m.is_user) {
    const img = document.createElement("img");
    img.className = "avatar"; img.alt = ""; img.src = `/galatea/characters/${state.character}/image`;
    return img;
  }
  const you = document.createElement("div");  // the user: their initial
  you.className = "avatar"; you.textContent = (m.name || "You").trim().charAt(0).toUpperCase();
  return you;
}

function timeText(seconds) {
  if (!seconds) return "";
  const d = new Date(seconds * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
                 : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

// A reasoning model's thinking, folded above its reply (never part of the next prompt).
function thoughtView(reasoning) {
  const box = document.createElement("details");
  box.className = "thought";
  box.hidden = !reasoning;
  const summary = document.createElement("summary");
  summary.textContent = "Thought";
  const body = document.createElement("div");
  body.className = "thought-text"; body.textContent = reasoning;
  box.append(summary, body);
  return box;
}

function messageView(m, isLast) {
  const div = document.createElement("div");
  div.className = "msg " + (m.is_user ? "user" : "char");
  div.dataset.id = m.id;
  const body = document.createElement("div");
  body.className = "body";
  const head = document.createElement("div");
  head.className = "head";
  const name = document.createElement("span");
  name.className = "name"; name.textContent = m.name;
  const time = document.createElement("time");
  time.textContent = timeText(m.time);
  if (m.time) time.dateTime = new Date(m.time * 1000).toISOString();
  head.append(name, time);
  const text = document.createElement("div");
  text.className = "text"; text.innerHTML = formatMessage(m.text);
  text.dataset.raw = m.text;
  body.append(head, thoughtView(m.reasoning || ""), text);
  const tools = document.createElement("div");
  tools.className = "tools";
  if (!m.is_user && m.swipes > 1 || (!m.is_user && isLast)) {
    const prev = button("◀", "Previous swipe", () => swipe(m.id, -1));
    const count = document.createElement("span");
    count.className = "swipe-count"; count.textContent = `${m.swipe + 1}/${m.swipes}`;
    const next = button("▶", "Next swipe (past the last: regenerate)", () =>
      isLast && m.swipe + 1 === m.swipes && m.number > 1 ? generate("regenerate") : swipe(m.id, 1));
    tools.append(prev, count, next);
  }
  if (m.id) {  // a stored message: its actions, in a menu
    const menu = document.createElement("details");
    menu.className = "menu";
    const summary = document.createElement("summary");
    summary.textContent = "⋯"; summary.title = "Message actions";
    menu.append(summary, button("Edit", "Edit this message", () => { menu.open = false; editInPlace(div, m); }),
                button("Copy", "Copy the text", () => { menu.open = false; navigator.clipboard?.writeText(m.text); }),
                button("Branch", "A new chat with the messages up to this one", () => { menu.open = false; branch(m); }),
                button("Delete", "Delete this message", () => { menu.open = false; del(m); }));
    head.append(menu);
  }
  if (tools.childElementCount) body.appendChild(tools);
  div.append(avatarView(m), body);
  return div;
}

function button(label, title, onclick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.title = title; b.onclick = onclick;
  return b;
}

// Edit a message where it is: its text becomes a text box; Save stores it, Escape cancels.
function editInPlace(div, m) {
  const text = div.querySelector(".text");
  const box = document.createElement("textarea");
  box.className = "edit"; box.value = m.text; box.rows = Math.min(12, m.text.split("\n").length + 1);
  const save = button("Save", "Save the edit", async () => {
    await api(`/messages/${m.id}`, { ...post({ text: box.value }), method: "PUT" });
    await openChat(state.chat);
  });
  const cancel = button("Cancel", "Keep the message as it was", () => openChat(state.chat));
  box.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") cancel.click();
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) save.click();
  });
  const editor = document.createElement("div");
  editor.className = "editor";
  editor.append(box, save, cancel);
  text.replaceWith(editor);
  box.focus();
}

// A branch: a new chat holding this chat's messages up to this one (its title says "(branch)").
async function branch(m) {
  const c = await api(`/chats/${state.chat}/branch`, post({ message_id: m.id }));
  state.chat = c.id;
  await listChats(state.character);
  await openChat(c.id);
  status(`a branch from message #${m.number}`);
}

async function swipe(id, step) { await api(`/messages/${id}/swipe`, post({ step })); await openChat(state.chat); }
async function del(m) {
  if (confirm("Delete this message?")) { await api(`/messages/${m.id}`, { method: "DELETE" }); await openChat(state.chat); }
}
function post(body) { return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }; }

// Start a reply. It runs on the server, which stores it whether or not this tab stays open.
async function generate(kind, body) {
  if (state.busy) return;
  const chatId = state.chat;
  if (kind === "send") {
    $("messages").appendChild(messageView({ id: 0, is_user: true, name: "You", text: body.text, swipes: 1, swipe: 0,
                                            time: Date.now() / 1000 }, false));
  }
  await streamReply(kind, chatId, (signal) => authFetch(`/galatea/chats/${chatId}/${kind}`, { ...post(body || {}), signal }));
}

// Show a reply as it streams: the server sends what was written so far, then `data: {"text": ...}`
// events (and `{"progress": {"read", "total"}}` while it reads a long prompt), and a last
// `{"done": true}`. `open(signal)` makes the request: a new reply, or following one already
// running. Leaving the chat stops following it (the reply itself goes on, on the server).
async function streamReply(kind, chatId, open) {
  setBusy(true);
  status("…");
  const following = state.following = { chatId, stop: new AbortController() };
  let summary = "";
  try {
    const live = messageView({ id: 0, is_user: false, name: $("character").selectedOptions[0].text, text: "",
                               swipes: 1, swipe: 0, time: Date.now() / 1000 }, false);
    live.classList.add("streaming");
    if (kind !== "continue") $("messages").appendChild(live);
    const stopWatching = watchLoading();
    let r;
    try { r = await open(following.stop.signal); } finally { stopWatching(); }
    if (!r.ok) { const e = await r.json(); throw new Error((e.error && e.error.message) || r.statusText); }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = null;
    const target = kind === "continue" ? $("messages").lastElementChild.querySelector(".text") : live.querySelector(".text");
    while (true) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        if (event.progress && !target.dataset.raw) {  // a long prompt is read: how far, in the bubble too
          const { read, total } = event.progress;
          status(`reading the prompt: ${read} / ${total} tokens`);
          target.innerHTML = `<span class="pending">reading the prompt… ${Math.floor(100 * read / total)}%</span>`;
        }
        if (event.text) {
          if (!target.dataset.raw) status("…");
          target.dataset.raw = (target.dataset.raw || "") + event.text;
          target.innerHTML = formatMessage(target.dataset.raw);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (event.notice) status(event.notice);  // e.g. the chat store is unreachable: the reply waits
        if (event.reasoning) {  // thinking streams into the folded block above the reply
          const box = target.parentElement.querySelector(".thought");
          box.hidden = false;
          box.querySelector(".thought-text").textContent += event.reasoning;
          if (!target.dataset.raw) status("thinking…");
        }
        if (event.done) done = event;
      }
    }
    if (done && done.error) throw new Error(done.error);
    const s = done && done.status;
    summary = s && s.prompt_tokens !== undefined ?
      `prompt ${s.prompt_tokens} tok · reply ${s.reply_tokens} tok · ${s.tok_s} tok/s` +
      (s.finish_reason === "cancelled" ? " · stopped" : "") : "";
  } catch (e) {
    summary = following.stop.signal.aborted ? "" : "error: " + e.message;
  } finally {
    setBusy(false);
    // Re-render from the store first: the streamed text is replaced by the saved (cleaned) reply,
    // and only then does the summary appear, so "tok/s" on screen means the view is final.
    if (state.following === following) state.following = null;
    if (state.chat === chatId) await openChat(chatId);
    await listChats(state.character);  // message counts changed
    status(summary);
  }
}

async function importCard(file, copy = false) {
  try {
    const body = await file.arrayBuffer();
    const c = await api("/characters" + (copy ? "?copy=true" : ""), { method: "POST", body });
    if (c.existing && confirm(`${c.name} is already in the library (the same card). Import it as a copy anyway?`)) {
      return importCard(file, true);
    }
    status(c.existing ? `${c.name} is already in the library` : `imported ${c.name}`);
    await loadCharacters(c.id);
  } catch (e) { status("import failed: " + e.message); }
}

// ---- chats: rename, delete, search, import --------------------------------------------------
function closeMenu() { $("chat-menu").open = false; }
$("rename-chat").onclick = () => {
  closeMenu();
  $("chat-title").value = $("chat").selectedOptions[0]?.text.replace(/ \(\d+\)$/, "") || "";
  $("rename-dialog").returnValue = "";
  $("rename-dialog").showModal();
};
$("rename-dialog").addEventListener("close", async () => {
  if ($("rename-dialog").returnValue !== "save") return;
  try {
    await api(`/chats/${state.chat}`, { ...post({ title: $("chat-title").value }), method: "PUT" });
    await listChats(state.character);
    status("chat renamed");
  } catch (e) { status("not renamed: " + e.message); }
});
$("delete-chat").onclick = async () => {
  closeMenu();
  const title = $("chat").selectedOptions[0]?.text;
  if (!confirm(`Delete the chat "${title}"? Its messages cannot be brought back.`)) return;
  try {
    await api(`/chats/${state.chat}`, { method: "DELETE" });
    state.chat = null;
    status("chat deleted");
    await openCharacter(state.character);
  } catch (e) { status("not deleted: " + e.message); }
};
$("search-chats").onclick = () => { closeMenu(); $("search-results").innerHTML = ""; $("search-dialog").showModal(); };
$("search-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = $("search-text").value.trim();
  if (!q) return;
  const scope = $("search-all").checked ? "" : `&character_id=${state.character}`;
  const hits = await api(`/search?q=${encodeURIComponent(q)}${scope}`);
  const list = $("search-results");
  list.innerHTML = "";
  if (!hits.length) list.textContent = "Nothing found.";
  for (const h of hits) {
    const li = document.createElement("li");
    li.textContent = `${h.title} · #${h.number}: ${h.text}`;
    li.onclick = async () => {
      $("search-dialog").close();
      const c = await api(`/chats/${h.chat_id}`);
      if (c.character.id !== state.character) { $("character").value = c.character.id; state.character = c.character.id;
        $("avatar").src = `/galatea/characters/${c.character.id}/image`; }
      state.chat = h.chat_id;
      await listChats(state.character);
      await openChat(h.chat_id);
      $("messages").children[h.number - 1]?.scrollIntoView({ block: "center" });
    };
    list.appendChild(li);
  }
});
$("import-chat").onchange = async (ev) => {
  closeMenu();
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  try {
    const r = await api(`/characters/${state.character}/chats/import`, { method: "POST", body: await file.arrayBuffer() });
    state.chat = r.id;
    await listChats(state.character);
    await openChat(r.id);
    status(r.warning ? "imported, but " + r.warning : `imported ${r.messages} messages`);
  } catch (e) { status("import failed: " + e.message); }
};

// ---- the character editor -------------------------------------------------------------------
const CARD_TEXT = ["name", "description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
                   "post_history_instructions", "creator_notes", "creator", "character_version"];
function greetingBox(text) {
  const row = document.createElement("div");
  row.className = "greeting";
  const box = document.createElement("textarea");
  box.rows = 2; box.value = text; box.className = "alt-greeting";
  row.append(box, button("✕", "Remove this greeting", () => row.remove()));
  $("add-greeting").before(row);
}
async function openCharacterEditor(id) {
  const [c] = await Promise.all([api(`/characters/${id}`), loadFormats()]);
  const form = $("character-form");
  state.extensions = c.card.extensions || {};  // kept as they are, but for our own format choice
  form.elements.card_format.value = (state.extensions.galatea || {}).format || "";
  for (const name of CARD_TEXT) form.elements[name].value = c.card[name] || "";
  form.elements.tags.value = (c.card.tags || []).join(", ");
  form.elements.nickname.value = c.card.nickname || "";
  form.elements.source.value = (c.card.source || []).join(", ");
  form.elements.group_only_greetings.value = (c.card.group_only_greetings || []).join("\n");
  for (const old of document.querySelectorAll("#greetings .greeting")) old.remove();
  for (const g of c.card.alternate_greetings || []) greetingBox(g);
  $("card-picture").src = `/galatea/characters/${id}/image?t=${Date.now()}`;
  form.dataset.id = id;
  form.dataset.chats = c.chats;
  $("character-dialog").returnValue = "";  // a dialog keeps its last answer: not this time's
  $("character-dialog").showModal();
}
$("edit-character").onclick = () => state.character && openCharacterEditor(state.character);
$("add-greeting").onclick = () => greetingBox("");
$("character-dialog").addEventListener("close", async () => {
  if ($("character-dialog").returnValue !== "save") return;
  const form = $("character-form");
  const card = {};
  for (const name of CARD_TEXT) card[name] = form.elements[name].value;
  card.tags = form.elements.tags.value.split(",").map((t) => t.trim()).filter(Boolean);
  // V3's own fields, kept with the card (and written back in its exports)
  if (form.elements.nickname.value.trim()) card.nickname = form.elements.nickname.value.trim();
  card.source = form.elements.source.value.split(",").map((t) => t.trim()).filter(Boolean);
  card.group_only_greetings = form.elements.group_only_greetings.value.split("\n").filter((g) => g.trim());
  card.alternate_greetings = [...document.querySelectorAll(".alt-greeting")].map((b) => b.value).filter((g) => g.trim());
  const own = { ...(state.extensions.galatea || {}), format: form.elements.card_format.value || undefined };
  card.extensions = { ...state.extensions, galatea: own };
  try {
    const id = Number(form.dataset.id);
    await api(`/characters/${id}`, { ...post(card), method: "PUT" });
    await loadCharacters(id);
    status(`saved ${card.name}`);
  } catch (e) { status("not saved: " + e.message); }
});
$("card-picture-file").onchange = async (ev) => {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  const id = $("character-form").dataset.id;
  try {
    await api(`/characters/${id}/image`, { method: "PUT", body: await file.arrayBuffer() });
    const bust = `?t=${Date.now()}`;
    $("card-picture").src = `/galatea/characters/${id}/image${bust}`;
    $("avatar").src = `/galatea/characters/${id}/image${bust}`;
  } catch (e) { alert("picture not saved: " + e.message); }
};
function download(url) { const a = document.createElement("a"); a.href = url; a.download = ""; a.click(); }
$("export-png").onclick = () => download(`/galatea/characters/${$("character-form").dataset.id}/export?format=png`);
$("export-json").onclick = () => download(`/galatea/characters/${$("character-form").dataset.id}/export?format=json`);
$("new-character").onclick = async () => {
  const card = JSON.stringify({ spec: "chara_card_v2", spec_version: "2.0", data: { name: "New character" } });
  const c = await api("/characters?copy=true", { method: "POST", body: card });
  $("character-dialog").close("new");
  await loadCharacters(c.id);
  await openCharacterEditor(c.id);
};
$("delete-character").onclick = async () => {
  const form = $("character-form");
  const name = form.elements.name.value;
  const n = Number(form.dataset.chats);
  if (!confirm(`Delete ${name} and ${n === 1 ? "its chat" : `its ${n} chats`}? This cannot be undone.`)) return;
  try {
    await api(`/characters/${form.dataset.id}`, { method: "DELETE" });
    $("character-dialog").close("deleted");
    state.character = null; state.chat = null;
    await loadCharacters();
    status(`deleted ${name}`);  // once the pickers show it gone
  } catch (e) { status("not deleted: " + e.message); }
};

// ---- lorebooks ------------------------------------------------------------------------------
async function listLorebooks() {
  const [books, own] = await Promise.all([api("/lorebooks"), api(`/characters/${state.character}`)]);
  const body = $("lorebook-list").tBodies[0];
  body.innerHTML = "";
  const mine = body.insertRow();  // the card's own book: always used with this character
  mine.className = "own-book";
  mine.insertCell().textContent = `${own.card.name}'s own (in the card)`;
  mine.insertCell().textContent = (own.card.character_book?.entries || []).length;
  mine.insertCell().textContent = "always";
  mine.insertCell().textContent = "always";
  mine.insertCell().append(button("Edit", "Edit the lorebook inside the card", () => editCardBook(own)));
  for (const b of books) {
    const row = body.insertRow();
    row.insertCell().textContent = b.name;
    row.insertCell().textContent = b.entries;
    for (const [scope, ids, id] of [["chat_id", b.chats, state.chat], ["character_id", b.characters, state.character]]) {
      const box = document.createElement("input");
      box.type = "checkbox"; box.checked = ids.includes(id); box.title = `attached to this ${scope.split("_")[0]}`;
      box.onchange = () => api(`/lorebooks/${b.id}/links`, { ...post({ [scope]: id, attached: box.checked }), method: "PUT" })
        .then(() => status(`${b.name} ${box.checked ? "attached" : "detached"}`), (e) => status(e.message));
      row.insertCell().appendChild(box);
    }
    const tools = row.insertCell();
    tools.append(button("Edit", "Edit its entries", () => editLorebook(b.id)),
                 button("Export", "SillyTavern world-info JSON", () => download(`/galatea/lorebooks/${b.id}/export`)),
                 button("Delete", "Delete this lorebook", async () => {
                   if (!confirm(`Delete the lorebook ${b.name}?`)) return;
                   await api(`/lorebooks/${b.id}`, { method: "DELETE" });
                   await listLorebooks();
                 }));
  }
}
$("open-lorebooks").onclick = async () => {
  document.querySelector("#lorebooks-dialog .char-name").textContent = $("character").selectedOptions[0]?.text || "";
  $("lorebook-editor").hidden = true;
  await listLorebooks();
  $("lorebooks-dialog").showModal();
};
$("import-lorebook").onchange = async (ev) => {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) return;
  try {
    const name = file.name.replace(/\.json$/i, "");
    const b = await api(`/lorebooks?name=${encodeURIComponent(name)}`, { method: "POST", body: await file.arrayBuffer() });
    await listLorebooks();
    status(`imported ${b.name} (${b.entries} entries)`);
  } catch (e) { status("import failed: " + e.message); alert("import failed: " + e.message); }
};
const ENTRY_FIELDS = [["keys", "Keys (comma-separated)"], ["secondary_keys", "Secondary keys"]];
function entryView(e) {
  const div = document.createElement("div");
  div.className = "entry";
  const field = (label, input, wide) => { const l = document.createElement("label"); l.textContent = label;
    l.appendChild(input); if (wide) l.className = "wide"; div.appendChild(l); return input; };
  const text = (value) => { const i = document.createElement("input"); i.value = value; return i; };
  const number = (value) => { const i = document.createElement("input"); i.type = "number"; i.value = value; return i; };
  const check = (label, value) => { const l = document.createElement("label"); l.className = "check";
    const i = document.createElement("input"); i.type = "checkbox"; i.checked = value; l.append(i, " " + label);
    div.appendChild(l); return i; };
  const inputs = {};
  inputs.comment = field("Name", text(e.comment || e.name || ""));
  for (const [key, label] of ENTRY_FIELDS) inputs[key] = field(label, text((e[key] || []).join(", ")));
  const content = document.createElement("textarea"); content.rows = 3; content.value = e.content || "";
  inputs.content = field("Content", content, true);
  const position = document.createElement("select");
  position.add(new Option("before the character", "before_char")); position.add(new Option("after the character", "after_char"));
  position.value = e.position === "after_char" ? "after_char" : "before_char";
  inputs.position = field("Position", position);
  inputs.insertion_order = field("Order", number(e.insertion_order ?? 100));
  inputs.depth = field("Depth", number((e.extensions || {}).depth ?? 4));
  inputs.enabled = check("enabled", e.enabled !== false);
  inputs.constant = check("always on", !!e.constant);
  inputs.selective = check("needs a secondary key", !!e.selective);
  inputs.case_sensitive = check("case-sensitive", !!e.case_sensitive);
  div.appendChild(button("Delete entry", "Remove this entry", () => div.remove()));
  div.read = () => {
    const list = (i) => i.value.split(",").map((k) => k.trim()).filter(Boolean);
    return { ...e, comment: inputs.comment.value, name: inputs.comment.value, keys: list(inputs.keys),
             secondary_keys: list(inputs.secondary_keys), content: inputs.content.value, position: inputs.position.value,
             insertion_order: Number(inputs.insertion_order.value) || 0, enabled: inputs.enabled.checked,
             constant: inputs.constant.checked, selective: inputs.selective.checked, case_sensitive: inputs.case_sensitive.checked,
             extensions: { ...(e.extensions || {}), depth: Number(inputs.depth.value) || 0,
                           // SillyTavern's own position number no longer holds once the position is changed here
                           ...(inputs.position.value !== e.position ? { position: undefined } : {}) } };
  };
  return div;
}
// The card's own lorebook in the same editor; saved into the card.
function editCardBook(own) {
  const editor = $("lorebook-editor");
  const book = own.card.character_book || { entries: [] };
  editor.dataset.id = "";
  editor.card = own;
  editor.book = book;
  $("lorebook-name").value = book.name || `${own.card.name}'s lorebook`;
  $("entries").innerHTML = "";
  for (const e of book.entries || []) $("entries").appendChild(entryView(e));
  editor.hidden = false;
}

async function editLorebook(id) {
  const b = await api(`/lorebooks/${id}`);
  const editor = $("lorebook-editor");
  editor.card = null;
  editor.dataset.id = id;
  editor.book = b.book;
  $("lorebook-name").value = b.name;
  $("entries").innerHTML = "";
  for (const e of b.book.entries || []) $("entries").appendChild(entryView(e));
  editor.hidden = false;
}
$("add-entry").onclick = () => $("entries").appendChild(entryView({ keys: [], content: "", enabled: true }));
$("close-editor").onclick = () => { $("lorebook-editor").hidden = true; };
$("lorebook-editor").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const editor = $("lorebook-editor");
  const entries = [...$("entries").children].map((d) => d.read());
  const book = { ...editor.book, name: $("lorebook-name").value, entries };
  try {
    if (editor.card) {  // the card's own book: the card is saved with it
      await api(`/characters/${editor.card.id}`, { ...post({ ...editor.card.card, character_book: book }), method: "PUT" });
    } else {
      await api(`/lorebooks/${editor.dataset.id}`, { ...post({ name: book.name, book }), method: "PUT" });
    }
    status("lorebook saved");
    editor.hidden = true;
    await listLorebooks();
  } catch (e) { status("lorebook not saved: " + e.message); alert("not saved: " + e.message); }
});

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  $("input").value = "";
  generate("send", { text });
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("regen").onclick = () => generate("regenerate");
$("continue").onclick = () => generate("continue");
$("stop").onclick = () => api("/abort", post({ chat_id: state.chat }));  // only this chat's reply
// The chat's settings: read into the form, saved (only what the form holds) on Save; "Save and
// make the default" also makes them what every chat starts from. A preset fills the samplers.
function fillSettings(values) {
  for (const field of $("settings-form").elements) {
    if (!field.name || values[field.name] === undefined) continue;
    const kind = field.dataset.kind;
    if (kind === "bool") { field.checked = !!values[field.name]; continue; }
    field.value = kind === "lines" ? values[field.name].join("\n") : kind === "ints" ? values[field.name].join(",")
                : values[field.name];
  }
}
function readSettings() {
  const body = {};
  for (const field of $("settings-form").elements) {
    if (!field.name) continue;
    if (field.dataset.kind === "bool") body[field.name] = field.checked;
    else if (field.dataset.kind === "lines") body[field.name] = field.value.split("\n").filter((l) => l !== "");
    else if (field.dataset.kind === "ints") { if (field.value.trim()) body[field.name] = field.value.split(",").map(Number); }
    else if (field.dataset.kind === "text") { if (field.name !== "user_name" || field.value.trim()) body[field.name] = field.value; }
    else if (field.value !== "") body[field.name] = Number(field.value);
  }
  return body;
}
async function loadFormats() {  // the choices, "auto" saying what the character or the model picks
  if ($("format-select").length) return;
  const { formats, auto } = await api("/formats");
  for (const f of formats) {
    $("format-select").add(new Option(f.name === "auto" ? `auto (the character's, else ${auto})` : f.title, f.name));
    if (f.name !== "auto") $("card-format-select").add(new Option(f.title, f.name));
  }
}
async function loadModels() {  // several models served: the chat chooses one (empty: the server's default)
  const { models, default: first } = await api("/models");
  $("model-row").hidden = models.length < 2;
  const select = $("model-select");
  select.length = 0;
  select.add(new Option(`the server's default (${first})`, ""));
  for (const m of models) select.add(new Option(`${m.name} · ${m.family}${m.loaded ? " · loaded" : ""}`, m.name));
}
// While a reply waits for its model to load, say so (the request answers once it is loaded).
function watchLoading() {
  const timer = setInterval(async () => {
    try {
      const { models } = await api("/models");
      const loading = models.find((m) => m.loading !== null && m.loading !== undefined);
      if (loading) status(`loading ${loading.name}… ${Math.round(loading.loading)} s`);
    } catch (e) { /* the status line is best effort */ }
  }, 700);
  return () => clearInterval(timer);
}
async function loadPresets() {
  const presets = await api("/presets");
  const select = $("preset");
  select.length = 1;
  for (const p of presets) select.add(new Option(p.builtin ? p.name : `${p.name} (yours)`, p.name));
  state.presets = Object.fromEntries(presets.map((p) => [p.name, p]));
}
$("open-settings").onclick = async () => {
  if (!state.chat) return;
  const [current] = await Promise.all([api(`/chats/${state.chat}/settings`), loadPresets(), loadFormats(),
                                       loadModels()]);
  fillSettings(current);
  $("settings-form").elements.max_context.placeholder = current.model_context;
  $("settings-dialog").returnValue = "";
  $("settings-dialog").showModal();
};
$("preset").onchange = () => { const p = state.presets[$("preset").value]; if (p) fillSettings(p.settings); };
$("save-preset").onclick = async () => {
  const name = $("preset-name").value.trim();
  if (!name) { status("give the preset a name first"); $("preset-name").focus(); return; }
  try {
    await api(`/presets/${encodeURIComponent(name)}`, { ...post(readSettings()), method: "PUT" });
    await loadPresets();
    $("preset").value = name;
    $("preset-name").value = "";
    status(`preset ${name} saved`);
  } catch (e) { status("preset not saved: " + e.message); }
};
$("delete-preset").onclick = async () => {
  const p = state.presets[$("preset").value];
  if (!p || p.builtin) { status("choose one of your presets to delete (built-in ones stay)"); return; }
  if (!confirm(`Delete the preset ${p.name}?`)) return;
  await api(`/presets/${encodeURIComponent(p.name)}`, { method: "DELETE" });
  await loadPresets();
};
$("settings-dialog").addEventListener("close", async () => {
  const how = $("settings-dialog").returnValue;
  if (how !== "save" && how !== "default") return;
  const body = readSettings();
  try {
    await api(`/chats/${state.chat}/settings`, { ...post(body), method: "PUT" });
    if (how === "default") {
      await api("/settings", { ...post(body), method: "PUT" });
      status("settings saved for this chat and as the default for every chat");
    } else status("settings saved for this chat");
  } catch (e) { status(`settings not saved: ${e.message}`); }
});
$("show-prompt").onclick = async () => {
  const p = await api(`/chats/${state.chat}/prompt`);
  const recalled = p.recalled.map((r) => `#${r.number} (${r.matched.join(", ") || "matched"})`).join(", ");
  $("prompt-text").textContent = `(${p.tokens} tokens${recalled ? `; recalled ${recalled}` : ""})\n\n` + p.prompt;
  $("prompt-dialog").showModal();
};
$("character").onchange = () => openCharacter(Number($("character").value));
$("chat").onchange = () => openChat(Number($("chat").value));
$("new-chat").onclick = async () => {
  const c = await api(`/characters/${state.character}/chats`, { method: "POST" });
  state.chat = c.id;
  await listChats(state.character);
  await openChat(c.id);
};
$("import").onchange = (ev) => {  // cleared after each pick, so the same file can be picked again
  const file = ev.target.files[0];
  ev.target.value = "";
  if (file) importCard(file);
};
document.addEventListener("dragover", (ev) => { ev.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", (ev) => { if (!ev.relatedTarget) document.body.classList.remove("dragging"); });
document.addEventListener("drop", (ev) => {
  ev.preventDefault(); document.body.classList.remove("dragging");
  if (ev.dataTransfer.files[0]) importCard(ev.dataTransfer.files[0]);
});

setBusy(false);
(async () => {
  const saved = Number(localStorage.getItem("galatea.chat"));
  await loadCharacters();
  if (saved) {
    try {
      const c = await api(`/chats/${saved}`);
      $("character").value = c.character.id;
      await openCharacter(c.character.id);
      await openChat(saved);
    } catch (_) { /* that chat is gone: keep the default */ }
  }
})();
