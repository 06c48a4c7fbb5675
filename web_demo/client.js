// The signaling client: one WebSocket to /ws, first-frame auth, request/reply matching,
// events, and reconnection with exponential backoff. Every frame in and out is reported to
// listeners (the developer panel) with a timestamp.

export class ServerError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

const REQUEST_TIMEOUT_MS = 15000;
// The server's default frame limit (TALKBRIDGE_MAX_FRAME). Larger frames get an error
// without the request id, so the request would only time out: refuse them here instead.
const MAX_FRAME = 65536;

export class Client extends EventTarget {
  constructor({ url, token, device }) {
    super();
    this.url = url;
    this.token = token;
    this.device = device;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, timer, type}
    this.state = "idle"; // idle | connecting | open | closed
    this.attempt = 0;
    this.retryTimer = null;
    this.stopped = false;
    this.session = null;
  }

  /** Open the socket; reconnects by itself until stop() or an auth failure. */
  start() {
    this.stopped = false;
    this._connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000, "sign out");
    this._failPending("network", "signed out");
  }

  /** Skip the remaining backoff and try now (e.g. the browser came back online). */
  retryNow() {
    if (this.stopped || this.state === "open" || this.state === "connecting") return;
    clearTimeout(this.retryTimer);
    this._connect();
  }

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  _connect() {
    this.state = "connecting";
    this._emit("status", { state: "connecting", attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleRetry(String(err));
      return;
    }
    this.ws = ws;
    let authed = false;
    ws.onopen = () => {
      this._sendRaw({ type: "auth", token: this.token, device: this.device });
    };
    ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        this._emit("frame", { dir: "in", ts: Date.now(), frame: { unparsable: String(ev.data) } });
        return;
      }
      this._emit("frame", { dir: "in", ts: Date.now(), frame });
      if (!authed) {
        if (frame.type === "auth.ok") {
          authed = true;
          this.attempt = 0;
          this.state = "open";
          this.session = frame;
          this._emit("status", { state: "open" });
          this._emit("open", frame);
          return;
        }
        if (frame.type === "error" && frame.code === "unauthorized") {
          this.stopped = true;
          this._emit("unauthorized", frame);
          return;
        }
      }
      this._handle(frame);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      const wasOpen = this.state === "open";
      this.state = "closed";
      this._failPending("network", "connection lost");
      this._emit("close", { code: ev.code, reason: ev.reason, wasOpen });
      if (ev.code === 4401) {
        this.stopped = true;
        this._emit("unauthorized", { code: "unauthorized", message: ev.reason || "token refused" });
        return;
      }
      if (!this.stopped) this._scheduleRetry(ev.reason || `closed (${ev.code})`);
    };
    ws.onerror = () => {
      // The close event follows and carries the handling; nothing to do twice.
    };
  }

  _scheduleRetry(why) {
    this.attempt += 1;
    // Exponential backoff with jitter, so many clients do not reconnect in lockstep.
    const base = Math.min(15000, 500 * 2 ** Math.min(this.attempt - 1, 5));
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    this._emit("status", { state: "waiting", delay, attempt: this.attempt, why });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this._connect(), delay);
  }

  _failPending(code, message) {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new ServerError(code, `${p.type}: ${message}`));
      this.pending.delete(id);
    }
  }

  _sendRaw(frame, text = JSON.stringify(frame)) {
    this.ws.send(text);
    this._emit("frame", { dir: "out", ts: Date.now(), frame });
  }

  _handle(frame) {
    if (frame.type === "reply" && frame.id != null) {
      const p = this.pending.get(String(frame.id));
      if (!p) return;
      this.pending.delete(String(frame.id));
      clearTimeout(p.timer);
      if (frame.ok) p.resolve(frame.data || {});
      else {
        const e = frame.error || {};
        p.reject(new ServerError(e.code || "internal", `${p.type}: ${e.message || e.code || "failed"}`));
      }
      return;
    }
    if (frame.type === "error") {
      this._emit("server-error", frame);
      return;
    }
    this._emit("event", frame);
  }

  get isOpen() {
    return this.state === "open" && this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send a request; resolves with the reply's data, rejects with ServerError. */
  request(type, fields = {}) {
    if (!this.isOpen) {
      return Promise.reject(new ServerError("network", `${type}: not connected`));
    }
    const id = `r${this.nextId++}`;
    const frame = { ...fields, type, id };
    const text = JSON.stringify(frame);
    if (text.length > MAX_FRAME) {
      return Promise.reject(
        new ServerError("too_large", `${type}: too long (${text.length} characters; the server takes up to ${MAX_FRAME})`),
      );
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ServerError("timeout", `${type}: no reply within ${REQUEST_TIMEOUT_MS / 1000} s`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer, type });
      try {
        this._sendRaw(frame, text);
      } catch (err) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(new ServerError("network", `${type}: ${err}`));
      }
    });
  }
}

/** Decode a JWT's payload without checking it (the server checks); null when malformed. */
export function jwtPayload(token) {
  try {
    const part = token.split(".")[1];
    const bin = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (ch) => ch.charCodeAt(0))));
  } catch {
    return null;
  }
}

/** The WebSocket URL of this page's server. */
export function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

/** POST JSON to an /api endpoint; throws ServerError with the server's message. */
export async function postJson(path, body) {
  let res;
  try {
    res = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (err) {
    throw new ServerError("network", `cannot reach the server (${err.message || err})`);
  }
  let data = {};
  try {
    data = await res.json();
  } catch {
    /* a non-JSON error page: fall through with the status */
  }
  if (!res.ok) {
    const e = data.error || data;
    throw new ServerError(e.code || `http_${res.status}`, e.message || `${path} failed with HTTP ${res.status}`);
  }
  return data;
}
