// JSON-RPC 2.0 over the page's WebSocket: calls return promises, events go to a callback.
// The token comes from the URL's fragment (never sent by the browser in a request).

export class Rpc {
  constructor(token, onEvent, onClose) {
    const url = new URL("/ws", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", token);
    this.ws = new WebSocket(url);
    this.next = 1;
    this.waiting = new Map();
    this.opened = new Promise((resolve, reject) => {
      this.ws.addEventListener("open", () => resolve());
      this.ws.addEventListener("error", () => reject(new Error("refused")));
    });
    this.ws.addEventListener("message", (e) => this.receive(e.data, onEvent));
    this.ws.addEventListener("close", (e) => {
      for (const { reject } of this.waiting.values()) reject(new Error("closed"));
      this.waiting.clear();
      onClose(e);
    });
  }

  receive(data, onEvent) {
    let message;
    try { message = JSON.parse(data); } catch { return; }
    if (message.method === "event") { onEvent(message.params); return; }
    const entry = this.waiting.get(message.id);
    if (!entry) return;
    this.waiting.delete(message.id);
    if (message.error) entry.reject(Object.assign(new Error(message.error.message), { rpc: message.error }));
    else entry.resolve(message.result);
  }

  call(method, params = {}) {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    });
  }
}
