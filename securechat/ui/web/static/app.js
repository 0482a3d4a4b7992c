// The page: a view of the daemon. State comes from subscribe (replayed from cursor 0,
// then live), peers and presence from `peers` and presence events.
import { Rpc } from "./rpc.js";
import { el, messageItem, setMark } from "./view.js";

const RANK = { pending: 0, accepted: 1, delivered: 2, received: 3 };
const $ = (id) => document.getElementById(id);

const state = {
  account: "",
  convs: new Map(),      // id -> { id, group, members, messages: Map(id -> message), unread }
  peers: new Map(),      // name -> { name, fingerprint, online, keyChanged }
  open: null,            // the conversation shown (an id, or a draft { members })
  rpc: null,
};

function token() {
  const params = new URLSearchParams(window.location.hash.slice(1));
  return params.get("token") || "";
}

function lastRead(id) {
  return Number(localStorage.getItem(`read:${state.account}:${id}`) || 0);
}

function markRead(conv) {
  let latest = lastRead(conv.id);
  for (const m of conv.messages.values()) latest = Math.max(latest, m.cursor || 0);
  localStorage.setItem(`read:${state.account}:${conv.id}`, String(latest));
  conv.unread = 0;
}

function conversationOf(c) {
  let conv = state.convs.get(c.id);
  if (!conv) {
    conv = { id: c.id, group: c.group, members: c.members, messages: new Map(), unread: 0 };
    state.convs.set(c.id, conv);
  }
  return conv;
}

function onMessage(m) {
  if (!m.outgoing && (!m.sender.verified || !state.peers.has(m.sender.name))) {
    loadPeers().catch(() => {}); // a new known peer, or a stranger using a known name
  }
  const conv = conversationOf(m.conversation);
  const old = conv.messages.get(m.id);
  if (old && RANK[old.status] >= RANK[m.status]) return;
  conv.messages.set(m.id, m);
  if (!m.outgoing && !old && !isOpen(conv) && (m.cursor || 0) > lastRead(conv.id)) conv.unread += 1;
  if (isOpen(conv)) { markRead(conv); drawMessages(); }
  drawConversations();
}

function onReceipt(r) {
  for (const conv of state.convs.values()) {
    const m = conv.messages.get(r.id);
    if (m && RANK[r.status] > RANK[m.status]) {
      m.status = r.status;
      const item = document.querySelector(`li.message[data-id="${r.id}"]`);
      if (item) setMark(item, r.status);
    }
  }
}

function isOpen(conv) {
  return state.open && state.open.id === conv.id;
}

async function onKeyChanged(k) {
  await loadPeers();
  const peer = state.peers.get(k.peer);
  if (peer && peer.keyChanged) showBanner(k.peer, k.oldFingerprint, k.newFingerprint);
}

function showBanner(name, oldFp, newFp) {
  const id = `banner-${name}`;
  if (document.getElementById(id)) return;
  const trust = el("button", { type: "button", text: `Trust ${name}'s new key` });
  const banner = el("div", { class: "banner", id, role: "alert" },
    el("strong", { text: `${name}'s key has changed. ` }),
    el("span", { text: `Was ${oldFp}, now ${newFp}. Someone may be impersonating ${name}: compare the safety number with them in person or by phone before you trust the new key.` }),
    trust);
  trust.addEventListener("click", async () => {
    try {
      await state.rpc.call("trust", { peer: name });
      banner.remove();
      await loadPeers();
    } catch (e) { notice(e.message); }
  });
  $("banners").append(banner);
}

function onEvent(event) {
  switch (event.type) {
    case "message": onMessage(event); break;
    case "receipt": onReceipt(event); break;
    case "keyChanged": onKeyChanged(event); break;
    case "presence": {
      const peer = state.peers.get(event.peer);
      if (peer) { peer.online = event.online; drawPeers(); drawHeader(); }
      break;
    }
    case "connection": drawConnection(event.connected, event.detail); break;
    case "error":
      if (event.code === -32002) { resubscribe(event.cursor); break; }
      notice(event.message);
      break;
    case "notice": notice(event.message); break;
  }
}

let cursor = 0;
function track(event) {
  if (typeof event.cursor === "number") cursor = Math.max(cursor, event.cursor);
  onEvent(event);
}

async function resubscribe(from) {
  await state.rpc.call("subscribe", { since: from });
}

function notice(text) {
  $("notice").textContent = text;
}

function drawConnection(connected, detail) {
  const node = $("connection");
  node.textContent = connected ? "connected to the relay" : `offline: ${detail || ""}`;
  node.classList.toggle("online", connected);
}

function title(conv) {
  return conv.members.join(", ");
}

function drawConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.convs.values()) {
    const button = el("button", { type: "button", "aria-current": isOpen(conv) ? "true" : "false", "data-conv": conv.id },
      el("span", { text: (conv.group ? "group: " : "") + title(conv) }));
    if (conv.unread) button.append(el("span", { class: "unread", text: String(conv.unread), title: `${conv.unread} unread` }));
    button.addEventListener("click", () => openConversation(conv));
    list.append(el("li", {}, button));
  }
}

function drawPeers() {
  const list = $("peers");
  const ticked = new Set([...list.querySelectorAll("input:checked")].map((i) => i.value));
  $("start").disabled = ticked.size === 0;
  list.replaceChildren();
  for (const peer of state.peers.values()) {
    const box = el("input", { type: "checkbox", value: peer.name, checked: ticked.has(peer.name) });
    box.addEventListener("change", () => { $("start").disabled = !list.querySelector("input:checked"); });
    const dot = el("span", { class: peer.online ? "dot online" : "dot", title: peer.online ? "online" : "offline or unknown" });
    list.append(el("li", {}, el("label", {}, box, dot, el("span", { text: peer.name }))));
  }
}

function drawHeader() {
  const conv = state.open;
  $("conv-title").textContent = conv ? (conv.group ? "Group: " : "") + title(conv) : "No conversation open";
  const presence = conv ? conv.members.map((n) => {
    const p = state.peers.get(n);
    return `${n} ${p && p.online ? "online" : p && p.online === false ? "offline" : ""}`.trim();
  }).join(", ") : "";
  $("conv-presence").textContent = presence;
  $("safety").hidden = !conv || conv.group;
  $("message").disabled = !conv;
  $("send").disabled = !conv;
}

function drawMessages() {
  const list = $("messages");
  list.replaceChildren();
  const conv = state.open && state.convs.get(state.open.id);
  if (!conv) return;
  const sorted = [...conv.messages.values()].sort((a, b) => (a.sentMs || 0) - (b.sentMs || 0));
  for (const m of sorted) list.append(messageItem(m));
  list.scrollTop = list.scrollHeight;
}

function openConversation(conv) {
  state.open = conv;
  $("safety-panel").hidden = true;
  if (state.convs.has(conv.id)) markRead(state.convs.get(conv.id));
  drawConversations();
  drawHeader();
  drawMessages();
  $("message").focus();
}

async function send() {
  const box = $("message");
  const text = box.value;
  const conv = state.open;
  if (!conv || !text.trim()) return;
  const known = conv.members.every((n) => state.peers.has(n));
  const params = known ? { to: conv.members, text } : { conv: conv.id, text };
  try {
    const result = await state.rpc.call("send", params);
    box.value = "";
    notice("");
    if (result.conversation !== conv.id) {
      // A new chat, or the same names with a new key (after a trusted key change).
      openConversation(conversationOf({ id: result.conversation, group: conv.members.length > 1, members: conv.members }));
    }
  } catch (e) {
    notice(e.message);
    if (e.rpc && e.rpc.code === 4) loadPeers().then(() => checkBanners());
  }
}

async function checkBanners() {
  for (const peer of state.peers.values()) {
    if (peer.keyChanged) showBanner(peer.name, "the key you trusted", "the key in " + peer.name + ".pub");
  }
}

async function loadPeers() {
  const result = await state.rpc.call("peers");
  state.peers = new Map(result.peers.map((p) => [p.name, p]));
  drawPeers();
  drawHeader();
}

async function showSafety() {
  const conv = state.open;
  if (!conv || conv.group) return;
  try {
    const result = await state.rpc.call("safetyNumber", { peer: conv.members[0] });
    const panel = $("safety-panel");
    panel.textContent = `Safety number with ${result.peer}: ${result.safetyNumber} (compare with ${result.peer} in person or by phone)`;
    panel.hidden = false;
  } catch (e) { notice(e.message); }
}

function startChat() {
  const names = [...$("peers").querySelectorAll("input:checked")].map((i) => i.value);
  if (!names.length) return;
  const sameMembers = [...state.convs.values()].find((c) => c.members.length === names.length && names.every((n) => c.members.includes(n)));
  openConversation(sameMembers || { id: `draft:${names.join(",")}`, group: names.length > 1, members: names });
}

function wire() {
  $("compose").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("start").addEventListener("click", startChat);
  $("safety").addEventListener("click", showSafety);
}

function refused(text) {
  const box = $("refused");
  box.textContent = text;
  box.hidden = false;
  drawConnection(false, "not connected to the daemon");
}

async function main() {
  wire();
  const secret = token();
  if (!secret) { refused("This page needs the link that 'securechat web' printed (it holds the token)."); return; }
  let opened = false;
  state.rpc = new Rpc(secret, track, () => {
    if (opened) refused("The connection to the daemon closed. Reload the page once 'securechat web' runs again.");
  });
  try {
    await state.rpc.opened;
    opened = true;
  } catch {
    refused("Refused: the token in this link is missing or wrong (or securechat web has stopped). Open the link that 'securechat web' printed.");
    return;
  }
  const info = await state.rpc.call("version");
  state.account = info.account;
  $("account").textContent = `${info.account} · ${info.fingerprint}`;
  const status = await state.rpc.call("status");
  drawConnection(status.connected, status.lastError && status.lastError.message);
  await loadPeers();
  await state.rpc.call("subscribe", { since: 0 });
  document.body.dataset.ready = "true";
}

main();
