// Drawing: every text from the daemon goes through textContent, never innerHTML, so a
// message holding HTML or terminal escapes is shown as the characters it is.

export const MARKS = { pending: "…", accepted: "✓", delivered: "✓✓" };
const MARK_TITLES = {
  pending: "pending: on this device only",
  accepted: "accepted by the relay (its word)",
  delivered: "delivered to the device (end to end)",
};

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "title" || key === "type") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function clock(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

export function messageItem(m) {
  const sender = el("span", { class: "sender", text: m.sender.name });
  const meta = el("div", { class: "meta" }, sender);
  if (!m.outgoing && !m.sender.verified) {
    meta.append(el("span", { class: "unverified", text: `unverified ${m.sender.fingerprint}` }));
  }
  meta.append(el("time", { text: clock(m.sentMs), title: new Date(m.sentMs || 0).toISOString() }));
  if (m.outgoing) {
    meta.append(el("span", { class: "mark", "data-status": m.status, title: MARK_TITLES[m.status] || m.status, text: MARKS[m.status] || "" }));
  }
  return el("li", { class: m.outgoing ? "message outgoing" : "message", "data-id": m.id, "data-status": m.status },
    meta, el("p", { class: "text", text: m.text }));
}

export function setMark(item, status) {
  item.dataset.status = status;
  const mark = item.querySelector(".mark");
  if (mark) {
    mark.dataset.status = status;
    mark.textContent = MARKS[status] || "";
    mark.title = MARK_TITLES[status] || status;
  }
}
