// Conversations and messages: the list with unread counts and mention flags, the timeline
// with history paging, sending with an outbox that survives reconnects, receipts, typing,
// recall, and gap filling after a reconnect (conv.list, then msg.history after_seq).

import { describeCallLog } from "./call.js";
import { ServerError } from "./client.js";

const PAGE = 30;
const TYPING_SEND_MS = 3000;
const TYPING_SHOW_MS = 5000;
const RECALL_WINDOW_MS = 120000;

function newClientMsgId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function timeOf(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  const today = new Date();
  const same = d.toDateString() === today.toDateString();
  const t = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return same ? t : `${d.toLocaleDateString()} ${t}`;
}

/** Mentions typed in a message: "@bob" -> "bob", "@all" -> "@all". */
export function parseMentions(text) {
  const out = new Set();
  for (const m of text.matchAll(/(^|\s)@([A-Za-z0-9_.-]{1,64})/g)) out.add(m[2] === "all" ? "@all" : m[2]);
  return [...out];
}

/** A group timeline notice in words. */
export function describeNotice(body, nameOf) {
  const b = body || {};
  const actor = b.actor ? nameOf(b.actor) : "Someone";
  const users = (b.users || (b.user ? [b.user] : [])).map(nameOf).join(", ");
  switch (b.event) {
    case "created":
    case "group_created":
      return `${actor} created the group${b.name ? ` “${b.name}”` : ""}${users ? ` with ${users}` : ""}`;
    case "member_joined":
      if (b.via === "approval") return `${users} joined (approved by ${actor})`;
      return users && users !== actor ? `${users} joined (added by ${actor})` : `${actor} joined`;
    case "invite_requested":
      return `${actor} invited ${users} (waiting for an admin's approval)`;
    case "member_invited":
    case "invited":
      return `${actor} invited ${users}`;
    case "member_left":
      return `${users || actor} left`;
    case "member_kicked":
      return `${actor} removed ${users}`;
    case "join_requested":
      return `${actor} asked to join${b.message ? `: “${b.message}”` : ""}`;
    case "join_rejected":
      return `${actor} declined the request of ${users}`;
    case "updated": {
      const parts = [];
      if (b.name != null) parts.push(`renamed it “${b.name}”`);
      if (b.announcement != null) parts.push(`set the announcement: “${b.announcement}”`);
      if (b.join_policy != null) parts.push(`set joining to ${b.join_policy}`);
      if (b.avatar != null) parts.push("changed the avatar");
      return `${actor} ${parts.join(", ") || "updated the group"}`;
    }
    case "role_changed":
      return `${actor} made ${users} ${b.role === "admin" ? "an admin" : b.role || "a member"}`;
    case "owner_transferred":
      return `${actor} made ${users} the owner`;
    case "muted":
      return b.until_ts && b.until_ts > Date.now()
        ? `${actor} muted ${users} until ${timeOf(b.until_ts)}`
        : `${actor} unmuted ${users}`;
    case "unmuted":
      return `${actor} unmuted ${users}`;
    case "mute_all":
    case "muted_all":
      return b.on === false ? `${actor} let everyone talk again` : `${actor} muted everyone but admins`;
    case "dissolved":
      return `${actor} dissolved the group`;
    case "room_started":
    case "call_started":
      return `${actor} started a group call`;
    case "call_left":
      return `${actor} left the group call`;
    case "room_ended":
    case "call_ended":
      return `The group call ended${b.duration_s ? ` after ${Math.round(b.duration_s)} s` : ""}`;
    default:
      return `${b.event || "notice"}${b.actor ? ` by ${actor}` : ""}${users ? `: ${users}` : ""}`;
  }
}

export class Chat {
  /** app: {client, me, toast(), nameOf(), groupName(), groups, onOpen(conv), isGroupAdmin(group)} */
  constructor(app) {
    this.app = app;
    this.convs = new Map();
    this.openConv = null;
    this.outbox = new Map(); // client_msg_id -> pending message
    this.lastTypingSent = 0;
    this.deliveredTimers = new Map();
    this.el = {
      list: document.getElementById("conv-list"),
      empty: document.getElementById("chat-empty"),
      header: document.getElementById("chat-header"),
      title: document.getElementById("chat-title"),
      sub: document.getElementById("chat-sub"),
      timeline: document.getElementById("timeline"),
      top: document.getElementById("history-top"),
      messages: document.getElementById("messages"),
      typing: document.getElementById("typing"),
      composer: document.getElementById("composer"),
      input: document.getElementById("composer-input"),
    };
    this.el.composer.onsubmit = (e) => {
      e.preventDefault();
      this.sendFromComposer();
    };
    this.el.input.onkeydown = (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.sendFromComposer();
      }
    };
    this.el.input.oninput = () => {
      this._autosize();
      this._sendTyping();
    };
    this.el.timeline.onscroll = () => {
      if (this.el.timeline.scrollTop < 60) this.loadOlder();
    };
    document.addEventListener("visibilitychange", () => this._markRead());
    window.tbChat = this;
  }

  // ---- conversation list ------------------------------------------------------------------

  _conv(id) {
    let c = this.convs.get(id);
    if (!c) {
      c = {
        conv: id,
        last_seq: 0,
        read_seq: 0,
        unread: 0,
        last_message: null,
        mentioned: false,
        messages: new Map(),
        loaded: false,
        minSeq: null,
        maxSeq: 0,
        hasMore: true,
        loadingOlder: false,
        readSent: 0,
        peerDelivered: new Map(),
        peerRead: new Map(),
        typing: new Map(),
      };
      if (id.startsWith("dm:")) {
        c.kind = "dm";
        const [a, b] = id.slice(3).split(":");
        c.peer = a === this.app.me ? b : a;
      } else if (id.startsWith("g:")) {
        c.kind = "group";
        c.group = id.slice(2);
      } else c.kind = "other";
      this.convs.set(id, c);
    }
    return c;
  }

  title(c) {
    if (c.kind === "dm") return this.app.nameOf(c.peer);
    if (c.kind === "group") return c.name || this.app.groupName(c.group);
    return c.conv;
  }

  /** The dm: conversation id with `user`. */
  dmId(user) {
    const [a, b] = [this.app.me, user].sort();
    return `dm:${a}:${b}`;
  }

  /** Refresh the list from the server (conv.list) and fill the gaps of loaded timelines. */
  async sync() {
    const data = await this.app.client.request("conv.list", {});
    for (const s of data.conversations || []) {
      const c = this._conv(s.conv);
      c.last_seq = Math.max(c.last_seq, s.last_seq || 0);
      c.read_seq = Math.max(c.read_seq, s.read_seq || 0);
      c.readSent = Math.max(c.readSent, c.read_seq);
      c.unread = s.unread != null ? s.unread : Math.max(0, c.last_seq - c.read_seq);
      if (s.last_message) c.last_message = s.last_message;
      if (s.name || s.title) c.name = s.name || s.title;
      c.left = !!s.left;
      const lm = s.last_message;
      c.mentioned = !!(s.mentioned || s.mention || (c.unread > 0 && lm && this._mentionsMe(lm)));
      if (lm && lm.from !== this.app.me && c.unread > 0) this._queueDelivered(c, c.last_seq);
    }
    this.renderList();
    for (const c of this.convs.values()) {
      if (c.loaded && c.last_seq > c.maxSeq) await this._fillGap(c);
    }
    if (this.openConv) this._markRead();
    this._flushOutbox();
  }

  async _fillGap(c) {
    // Page forward until the server says there is nothing more.
    for (let guard = 0; guard < 100; guard++) {
      const data = await this.app.client.request("msg.history", { conv: c.conv, after_seq: c.maxSeq, limit: 100 });
      const msgs = data.messages || [];
      for (const m of msgs) this._store(c, m);
      if (!data.has_more || !msgs.length) break;
    }
    if (c === this.openConv) this.renderTimeline({ keepBottom: true });
  }

  _mentionsMe(m) {
    const ms = m.mentions || [];
    return ms.includes(this.app.me) || (ms.includes("@all") && m.from !== this.app.me);
  }

  renderList() {
    const list = [...this.convs.values()].sort((a, b) => {
      const ta = (a.last_message && a.last_message.ts) || a.created || 0;
      const tb = (b.last_message && b.last_message.ts) || b.created || 0;
      return tb - ta;
    });
    const frag = document.createDocumentFragment();
    for (const c of list) {
      const li = document.createElement("li");
      li.className = "conv" + (c === this.openConv ? " active" : "");
      li.dataset.conv = c.conv;
      li.tabIndex = 0;
      li.setAttribute("role", "button");
      const av = document.createElement("div");
      av.className = `avatar ${c.kind}`;
      av.textContent = (this.title(c) || "?").slice(0, 1).toUpperCase();
      const main = document.createElement("div");
      main.className = "conv-main";
      const top = document.createElement("div");
      top.className = "conv-top";
      const name = document.createElement("span");
      name.className = "conv-name";
      name.textContent = this.title(c);
      const when = document.createElement("span");
      when.className = "conv-time muted small";
      when.textContent = c.last_message ? timeOf(c.last_message.ts) : "";
      top.append(name, when);
      const bottom = document.createElement("div");
      bottom.className = "conv-bottom";
      const last = document.createElement("span");
      last.className = "conv-last muted small";
      last.textContent = c.last_message ? this.preview(c, c.last_message) : "No messages yet";
      if (c.left) li.classList.add("left");
      bottom.append(last);
      if (c.mentioned) {
        const m = document.createElement("span");
        m.className = "mention-flag";
        m.title = "You were mentioned";
        m.textContent = "@";
        bottom.append(m);
      }
      if (c.unread > 0 && c !== this.openConv) {
        const u = document.createElement("span");
        u.className = "unread";
        u.textContent = c.unread > 99 ? "99+" : String(c.unread);
        bottom.append(u);
      }
      if (c.kind === "group" && this.app.rooms.active.has(c.group)) {
        const r = document.createElement("span");
        r.className = "live-flag";
        r.title = "Group call running";
        r.textContent = "● live";
        bottom.append(r);
      }
      main.append(top, bottom);
      li.append(av, main);
      li.onclick = () => this.open(c.conv);
      li.onkeydown = (e) => {
        if (e.key === "Enter") this.open(c.conv);
      };
      frag.append(li);
    }
    this.el.list.replaceChildren(frag);
    const total = list.reduce((n, c) => n + (c !== this.openConv ? c.unread : 0), 0);
    document.title = total ? `(${total}) talkbridge demo` : "talkbridge demo";
  }

  preview(c, m) {
    const who = m.from === this.app.me ? "You: " : c.kind === "group" && m.from ? `${this.app.nameOf(m.from)}: ` : "";
    if (m.recalled) return `${who}message recalled`;
    switch (m.kind) {
      case "text":
        return who + ((m.body && m.body.text) || "");
      case "notice":
        return describeNotice(m.body, this.app.nameOf);
      case "call":
        return describeCallLog(m.body || {}, this.app.me, m.from);
      case "file":
        return `${who}File: ${(m.body && (m.body.name || m.body.url)) || "file"}`;
      default:
        return `${who}[${m.kind}]`;
    }
  }

  // ---- opening and paging -----------------------------------------------------------------

  /** Open a conversation by id (creating the local entry for a new dm). */
  async open(convId) {
    const c = this._conv(convId);
    if (!c.created) c.created = Date.now();
    this.openConv = c;
    c.mentioned = false;
    this.el.empty.hidden = true;
    this.el.header.hidden = false;
    this.el.timeline.hidden = false;
    this.el.composer.hidden = false;
    this._renderComposer();
    document.body.classList.add("conv-open");
    this.el.title.textContent = this.title(c);
    this.el.sub.textContent = c.kind === "dm" ? `@${c.peer}` : `group ${c.group}`;
    this._renderTyping();
    this.renderList();
    this.app.onOpen(c);
    this.renderTimeline({ toBottom: true });
    if (!c.loaded) {
      this.el.top.textContent = "Loading…";
      try {
        const req = { conv: c.conv, limit: PAGE };
        if (c.last_seq > 0) req.before_seq = c.last_seq + 1;
        const data = await this.app.client.request("msg.history", req);
        for (const m of data.messages || []) this._store(c, m);
        c.hasMore = !!data.has_more;
        c.loaded = true;
      } catch (err) {
        if (err.code === "not_found" || err.code === "forbidden") {
          // A dm nobody has written in yet: nothing to load.
          c.loaded = c.kind === "dm";
          c.hasMore = false;
          if (c.kind !== "dm") this.app.toast(err.message, "error");
        } else {
          this.app.toast(`Could not load history: ${err.message}`, "error");
        }
      }
      if (this.openConv === c) this.renderTimeline({ toBottom: true });
      if (c.last_seq > c.maxSeq && c.loaded) await this._fillGap(c);
      if (c.kind === "group") this.app.inferRoom(c);
    }
    this._loadReceipts(c);
    this._markRead();
    this.el.input.focus();
  }

  /** Mark a conversation as one this user can no longer write in (left, kicked, dissolved). */
  setLeft(convId, left) {
    const c = this._conv(convId);
    c.left = left;
    if (this.openConv === c) this._renderComposer();
    this.renderList();
  }

  _renderComposer() {
    const c = this.openConv;
    const left = !!(c && c.left);
    this.el.input.disabled = left;
    this.el.composer.querySelector("button").disabled = left;
    this.el.input.placeholder = left
      ? "You are no longer a member of this group."
      : "Write a message… (@user to mention, Enter to send)";
  }

  close() {
    this.openConv = null;
    document.body.classList.remove("conv-open");
    this.el.empty.hidden = false;
    this.el.header.hidden = true;
    this.el.timeline.hidden = true;
    this.el.composer.hidden = true;
    this.el.typing.hidden = true;
    this.renderList();
  }

  async loadOlder() {
    const c = this.openConv;
    if (!c || !c.loaded || !c.hasMore || c.loadingOlder || c.minSeq == null || c.minSeq <= 1) return;
    c.loadingOlder = true;
    this.el.top.textContent = "Loading older messages…";
    try {
      const data = await this.app.client.request("msg.history", { conv: c.conv, before_seq: c.minSeq, limit: PAGE });
      for (const m of data.messages || []) this._store(c, m);
      c.hasMore = !!data.has_more && (data.messages || []).length > 0;
      if (this.openConv === c) this.renderTimeline({ keepTop: true });
    } catch (err) {
      this.app.toast(`Could not load older messages: ${err.message}`, "error");
    } finally {
      c.loadingOlder = false;
    }
  }

  async _loadReceipts(c) {
    // Ticks after a reload: ask who has read my latest message.
    let mine = 0;
    for (const m of c.messages.values()) if (m.from === this.app.me && m.seq > mine) mine = m.seq;
    if (!mine) return;
    try {
      const data = await this.app.client.request("msg.receipts", { conv: c.conv, seq: mine });
      for (const u of data.read || []) {
        if (u === this.app.me) continue;
        c.peerRead.set(u, Math.max(c.peerRead.get(u) || 0, mine));
        c.peerDelivered.set(u, Math.max(c.peerDelivered.get(u) || 0, mine));
      }
      for (const u of data.delivered || []) {
        if (u !== this.app.me) c.peerDelivered.set(u, Math.max(c.peerDelivered.get(u) || 0, mine));
      }
      if (this.openConv === c) this.renderTimeline({});
    } catch {
      // Older servers answer msg.receipts for groups only; live receipt events still arrive.
    }
  }

  _store(c, m) {
    if (m.seq == null) return;
    const had = c.messages.get(m.seq);
    c.messages.set(m.seq, had && had.recalled && !m.recalled ? { ...m, recalled: true } : m);
    c.minSeq = c.minSeq == null ? m.seq : Math.min(c.minSeq, m.seq);
    c.maxSeq = Math.max(c.maxSeq, m.seq);
    if (m.seq >= c.last_seq) {
      c.last_seq = m.seq;
      c.last_message = m;
    }
    if (m.from === this.app.me && m.client_msg_id) this.outbox.delete(m.client_msg_id);
  }

  // ---- rendering the timeline -------------------------------------------------------------

  renderTimeline({ toBottom = false, keepTop = false, keepBottom = false } = {}) {
    const c = this.openConv;
    if (!c) return;
    const tl = this.el.timeline;
    const nearBottom = tl.scrollTop + tl.clientHeight >= tl.scrollHeight - 80;
    const oldHeight = tl.scrollHeight;
    const oldTop = tl.scrollTop;
    const frag = document.createDocumentFragment();
    const seqs = [...c.messages.keys()].sort((a, b) => a - b);
    let prevDay = "";
    for (const s of seqs) {
      const m = c.messages.get(s);
      const day = m.ts ? new Date(m.ts).toDateString() : "";
      if (day && day !== prevDay) {
        const d = document.createElement("li");
        d.className = "day";
        d.textContent = new Date(m.ts).toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" });
        frag.append(d);
        prevDay = day;
      }
      frag.append(this._messageNode(c, m));
    }
    for (const p of this.outbox.values()) if (p.conv === c.conv && !c.messages.has(p.seq)) frag.append(this._pendingNode(p));
    this.el.messages.replaceChildren(frag);
    if (c.loaded) {
      this.el.top.textContent = c.hasMore && c.minSeq > 1 ? "Scroll up for older messages" : c.messages.size ? "Beginning of the conversation" : "No messages yet. Say hello!";
    }
    if (keepTop) tl.scrollTop = oldTop + (tl.scrollHeight - oldHeight);
    else if (toBottom || keepBottom || nearBottom) tl.scrollTop = tl.scrollHeight;
    // A short first page does not fill the view, so no scroll event would ever page back.
    if (c.loaded && c.hasMore && tl.scrollHeight <= tl.clientHeight + 60) queueMicrotask(() => this.loadOlder());
  }

  _messageNode(c, m) {
    const li = document.createElement("li");
    li.dataset.seq = String(m.seq);
    if (m.kind === "notice") {
      li.className = "notice";
      li.textContent = describeNotice(m.body, this.app.nameOf);
      return li;
    }
    const mine = m.from === this.app.me;
    li.className = `msg ${mine ? "mine" : "theirs"} kind-${m.kind}`;
    if (this._mentionsMe(m) && !mine) li.classList.add("mentions-me");
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (c.kind === "group" && !mine) {
      const who = document.createElement("div");
      who.className = "from";
      who.textContent = this.app.nameOf(m.from);
      bubble.append(who);
    }
    const body = document.createElement("div");
    body.className = "body";
    if (m.recalled) {
      body.classList.add("recalled");
      body.textContent = mine ? "You recalled this message" : `${this.app.nameOf(m.from)} recalled a message`;
    } else if (m.kind === "text") {
      this._renderText(body, (m.body && m.body.text) || "");
    } else if (m.kind === "call") {
      li.classList.add("call-log");
      body.textContent = `${m.body && m.body.media && m.body.media.video ? "▶" : "☎"} ${describeCallLog(m.body || {}, this.app.me, m.from)}`;
    } else if (m.kind === "file") {
      const a = document.createElement("a");
      a.href = (m.body && m.body.url) || "#";
      a.target = "_blank";
      a.rel = "noopener";
      a.textContent = `File: ${(m.body && (m.body.name || m.body.url)) || "file"}`;
      body.append(a);
    } else {
      const pre = document.createElement("code");
      pre.textContent = JSON.stringify(m.body);
      body.append(pre);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const t = document.createElement("time");
    t.textContent = timeOf(m.ts);
    meta.append(t);
    if (mine && !m.recalled) {
      const tick = document.createElement("span");
      const st = this._tickState(c, m.seq);
      tick.className = `tick ${st.cls}`;
      tick.textContent = st.text;
      tick.title = st.title;
      tick.dataset.state = st.cls;
      tick.dataset.readers = String(st.readers || 0);
      meta.append(tick);
    }
    if (!m.recalled && m.kind !== "call" && this._canRecall(c, m)) {
      const r = document.createElement("button");
      r.type = "button";
      r.className = "recall";
      r.textContent = "Recall";
      r.title = "Recall this message for everyone";
      r.onclick = () => this.recall(c, m.seq);
      meta.prepend(r);
    }
    bubble.append(body, meta);
    li.append(bubble);
    return li;
  }

  _renderText(el, text) {
    // Highlight @mentions without ever inserting HTML from the message.
    const parts = text.split(/(@[A-Za-z0-9_.-]{1,64})/g);
    for (const p of parts) {
      if (p.startsWith("@")) {
        const s = document.createElement("span");
        s.className = "mention";
        s.textContent = p;
        el.append(s);
      } else if (p) el.append(document.createTextNode(p));
    }
  }

  _pendingNode(p) {
    const li = document.createElement("li");
    li.className = "msg mine pending" + (p.failed ? " failed" : "");
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    const body = document.createElement("div");
    body.className = "body";
    this._renderText(body, p.body.text);
    const meta = document.createElement("div");
    meta.className = "meta";
    const tick = document.createElement("span");
    tick.className = "tick sending";
    tick.dataset.state = p.failed ? "failed" : "sending";
    tick.textContent = p.failed ? "⚠ not sent" : "◷";
    tick.title = p.failed ? p.error || "not sent" : "Sending…";
    meta.append(tick);
    bubble.append(body, meta);
    if (p.failed) {
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "ghost small";
      retry.textContent = "Retry";
      retry.onclick = () => {
        p.failed = false;
        this._send(p);
        this.renderTimeline({});
      };
      bubble.append(retry);
    }
    li.append(bubble);
    return li;
  }

  _tickState(c, seq) {
    const others = c.kind === "dm" ? [c.peer] : [...new Set([...c.peerDelivered.keys(), ...c.peerRead.keys()])];
    const readers = others.filter((u) => (c.peerRead.get(u) || 0) >= seq);
    const delivered = others.filter((u) => (c.peerDelivered.get(u) || 0) >= seq || (c.peerRead.get(u) || 0) >= seq);
    if (readers.length) {
      if (c.kind === "dm") return { cls: "read", text: "✓✓", title: "Read", readers: 1 };
      const names = readers.map((u) => this.app.nameOf(u)).sort();
      return { cls: "read", text: `✓✓ read by ${readers.length}`, title: `Read by ${names.join(", ")}`, readers: readers.length };
    }
    if (delivered.length) return { cls: "delivered", text: "✓✓", title: "Delivered" };
    return { cls: "sent", text: "✓", title: "Sent" };
  }

  _canRecall(c, m) {
    if (m.from === this.app.me && m.ts && Date.now() - m.ts < RECALL_WINDOW_MS) return true;
    return c.kind === "group" && this.app.isGroupAdmin(c.group);
  }

  // ---- sending ----------------------------------------------------------------------------

  sendFromComposer() {
    const c = this.openConv;
    const text = this.el.input.value.trim();
    if (!c || !text) return;
    this.el.input.value = "";
    this._autosize();
    const to = c.kind === "dm" ? { user: c.peer } : { group: c.group };
    const p = { client_msg_id: newClientMsgId(), conv: c.conv, to, body: { text }, mentions: parseMentions(text), failed: false };
    this.outbox.set(p.client_msg_id, p);
    this.renderTimeline({ toBottom: true });
    this._send(p);
  }

  async _send(p) {
    if (!this.app.client.isOpen) {
      // Kept in the outbox; sent again with the same client_msg_id once reconnected.
      this.renderTimeline({});
      return;
    }
    const req = { to: p.to, client_msg_id: p.client_msg_id, kind: "text", body: p.body };
    if (p.mentions.length) req.mentions = p.mentions;
    try {
      const data = await this.app.client.request("msg.send", req);
      const c = this._conv(data.conv || p.conv);
      this._store(c, {
        conv: c.conv,
        seq: data.seq,
        msg_id: data.msg_id,
        from: this.app.me,
        from_device: this.app.device,
        ts: data.ts,
        kind: "text",
        body: p.body,
        client_msg_id: p.client_msg_id,
        mentions: p.mentions,
      });
      this.outbox.delete(p.client_msg_id);
      c.readSent = Math.max(c.readSent, data.seq);
      if (c.loaded && data.seq > c.maxSeq + 1) await this._fillGap(c);
      this.renderList();
      if (this.openConv === c) this.renderTimeline({ toBottom: true });
    } catch (err) {
      if (err instanceof ServerError && err.code === "network") {
        // Resent on reconnect; the server deduplicates by client_msg_id.
        this.renderTimeline({});
        return;
      }
      // Anything else (timeout included) shows as not sent, with a Retry button: a retry
      // reuses the client_msg_id, so a message the server did store is not duplicated.
      p.failed = true;
      p.error = err.message;
      this.app.toast(`Message not sent: ${err.message}`, "error");
      this.renderTimeline({});
    }
  }

  _flushOutbox() {
    for (const p of this.outbox.values()) if (!p.failed) this._send(p);
  }

  async recall(c, seq) {
    try {
      await this.app.client.request("msg.recall", { conv: c.conv, seq });
      this._applyRecall(c, seq);
    } catch (err) {
      this.app.toast(`Cannot recall: ${err.message}`, "error");
    }
  }

  _applyRecall(c, seq) {
    const m = c.messages.get(seq);
    if (m) c.messages.set(seq, { ...m, recalled: true });
    if (c.last_message && c.last_message.seq === seq) c.last_message = { ...c.last_message, recalled: true };
    this.renderList();
    if (this.openConv === c) this.renderTimeline({});
  }

  // ---- typing, receipts -------------------------------------------------------------------

  _sendTyping() {
    const c = this.openConv;
    if (!c || !this.app.client.isOpen) return;
    const now = Date.now();
    if (now - this.lastTypingSent < TYPING_SEND_MS) return;
    this.lastTypingSent = now;
    this.app.client.request("typing", { conv: c.conv }).catch(() => {});
  }

  _renderTyping() {
    const c = this.openConv;
    if (!c || !c.typing.size) {
      this.el.typing.hidden = true;
      return;
    }
    const who = [...c.typing.keys()].map(this.app.nameOf);
    this.el.typing.hidden = false;
    this.el.typing.textContent = `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…`;
  }

  _queueDelivered(c, seq) {
    // Batch: one receipt.delivered for a burst of messages.
    c.deliverUpTo = Math.max(c.deliverUpTo || 0, seq);
    if (this.deliveredTimers.has(c.conv)) return;
    this.deliveredTimers.set(
      c.conv,
      setTimeout(() => {
        this.deliveredTimers.delete(c.conv);
        if (!this.app.client.isOpen) return;
        this.app.client.request("receipt.delivered", { conv: c.conv, seq: c.deliverUpTo }).catch((err) => this.app.toast(err.message, "error"));
      }, 150),
    );
  }

  _markRead() {
    const c = this.openConv;
    if (!c || document.visibilityState !== "visible" || !this.app.client.isOpen) return;
    const seq = Math.max(c.maxSeq, c.loaded ? 0 : c.last_seq);
    c.unread = 0;
    if (seq > c.readSent) {
      c.readSent = seq;
      c.read_seq = seq;
      this.app.client.request("receipt.read", { conv: c.conv, seq }).catch((err) => this.app.toast(err.message, "error"));
    }
    this.renderList();
  }

  // ---- events -----------------------------------------------------------------------------

  /** Handle msg.* / receipt / typing events; returns true when it was one. */
  onEvent(ev) {
    switch (ev.type) {
      case "msg.new": {
        const c = this._conv(ev.conv);
        const isNewer = ev.seq > c.last_seq;
        const gap = c.loaded && ev.seq > c.maxSeq + 1;
        if (!c.messages.has(ev.seq)) {
          if (ev.from !== this.app.me && isNewer) {
            c.unread += 1;
            if (this._mentionsMe(ev)) c.mentioned = true;
          }
        }
        if (c.loaded) this._store(c, ev);
        else if (isNewer) {
          c.last_seq = ev.seq;
          c.last_message = ev;
        }
        if (ev.from !== this.app.me) {
          c.typing.delete(ev.from);
          this._queueDelivered(c, ev.seq);
        }
        if (ev.kind === "notice") this.app.onNotice(c, ev);
        if (gap) this._fillGap(c).catch((err) => this.app.toast(err.message, "error"));
        if (this.openConv === c) {
          if (c.mentioned) c.mentioned = false;
          this.renderTimeline({});
          this._renderTyping();
          this._markRead();
        } else if (ev.from !== this.app.me && ev.kind !== "notice") {
          this.app.notify(this.title(c), this.preview(c, ev));
        }
        this.renderList();
        return true;
      }
      case "msg.recalled": {
        this._applyRecall(this._conv(ev.conv), ev.seq);
        return true;
      }
      case "receipt": {
        const c = this._conv(ev.conv);
        // Group receipts to a sender come coalesced (one event a second per conversation):
        // `receipts` lists every reader; the top-level user/seq is the one-reader shape.
        const entries = Array.isArray(ev.receipts) && ev.receipts.length ? ev.receipts : [{ user: ev.user, seq: ev.seq }];
        let peers = false;
        for (const { user, seq } of entries) {
          if (!user || typeof seq !== "number") continue;
          if (user === this.app.me) {
            // My other device read it: clear the unread count here too.
            if (ev.kind === "read" && seq > c.read_seq) {
              c.read_seq = seq;
              c.readSent = Math.max(c.readSent, seq);
              c.unread = Math.max(0, c.last_seq - seq);
              this.renderList();
            }
            continue;
          }
          const map = ev.kind === "read" ? c.peerRead : c.peerDelivered;
          map.set(user, Math.max(map.get(user) || 0, seq));
          if (ev.kind === "read") c.peerDelivered.set(user, Math.max(c.peerDelivered.get(user) || 0, seq));
          peers = true;
        }
        if (peers && this.openConv === c) this.renderTimeline({});
        return true;
      }
      case "typing": {
        if (ev.user === this.app.me) return true;
        const c = this._conv(ev.conv);
        clearTimeout(c.typing.get(ev.user));
        c.typing.set(
          ev.user,
          setTimeout(() => {
            c.typing.delete(ev.user);
            if (this.openConv === c) this._renderTyping();
          }, TYPING_SHOW_MS),
        );
        if (this.openConv === c) this._renderTyping();
        return true;
      }
      default:
        return false;
    }
  }

  /** Forget a conversation (left or dissolved group). */
  drop(convId) {
    this.convs.delete(convId);
    if (this.openConv && this.openConv.conv === convId) this.close();
    this.renderList();
  }

  reset() {
    this.convs.clear();
    this.outbox.clear();
    this.close();
  }

  _autosize() {
    const el = this.el.input;
    el.style.height = "auto";
    el.style.height = `${Math.min(160, el.scrollHeight)}px`;
  }
}
