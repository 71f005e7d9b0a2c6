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
  for (const c of chars) $("character").add(new Option(c.name, c.id));
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
  body.append(head, text);
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
    const r = await open(following.stop.signal);
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

async function importCard(file) {
  try {
    const c = await api("/characters", { method: "POST", body: await file.arrayBuffer() });
    status(`imported ${c.name}`);
    await loadCharacters(c.id);
  } catch (e) { status("import failed: " + e.message); }
}

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
// The chat's sampling settings: read into the form, saved (only what the form holds) on Save.
$("open-settings").onclick = async () => {
  if (!state.chat) return;
  const current = await api(`/chats/${state.chat}/settings`);
  for (const field of $("settings-form").elements) {
    if (field.name && current[field.name] !== undefined) field.value = current[field.name];
  }
  $("settings-dialog").showModal();
};
$("settings-dialog").addEventListener("close", async () => {
  if ($("settings-dialog").returnValue !== "save") return;
  const body = {};
  for (const field of $("settings-form").elements) {
    if (field.name && field.value !== "") body[field.name] = Number(field.value);
  }
  try {
    await api(`/chats/${state.chat}/settings`, { ...post(body), method: "PUT" });
    status("settings saved for this chat");
  } catch (e) { status(`settings not saved: ${e.message}`); }
});
$("show-prompt").onclick = async () => {
  const p = await api(`/chats/${state.chat}/prompt`);
  $("prompt-text").textContent = `(${p.tokens} tokens)\n\n` + p.prompt;
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
$("import").onchange = (ev) => { if (ev.target.files[0]) importCard(ev.target.files[0]); };
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
