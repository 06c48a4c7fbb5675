// Entry point: sign-in, the session (token + device id in localStorage), the connection
// status, and the routing of server events to chat, groups, calls, group calls and the
// developer panel.

import { CallManager } from "./call.js";
import { Chat } from "./chat.js";
import { Client, jwtPayload, postJson, socketUrl } from "./client.js";
import { DevPanel } from "./devpanel.js";
import { Groups } from "./groups.js";
import { RoomManager } from "./room.js";

// "?profile=x" keeps a separate session in the same browser profile (two users, two tabs).
const PROFILE = new URLSearchParams(location.search).get("profile") || "";
const KEY = (k) => `tb.${PROFILE ? `${PROFILE}.` : ""}${k}`;

function deviceId() {
  let id = localStorage.getItem(KEY("device"));
  if (!id) {
    const b = crypto.getRandomValues(new Uint8Array(8));
    id = `web-${Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("")}`;
    localStorage.setItem(KEY("device"), id);
  }
  return id;
}

const $ = (id) => document.getElementById(id);

class App {
  constructor() {
    this.client = null;
    this.token = null;
    this.me = null;
    this.device = deviceId();
    this.names = new Map();
    this.iceList = [];
    this.dev = new DevPanel();
    this.nameOf = (u) => this.names.get(u) || u;
    this.groupName = (g) => this.groups.name(g);
    this.chat = new Chat(this);
    this.groups = new Groups(this);
    this.calls = new CallManager(this);
    this.rooms = new RoomManager(this);
    window.tb = this; // for the browser console and the tests
    this._wireAuth();
    this._wireChrome();
    const saved = localStorage.getItem(KEY("token"));
    if (saved) this.signIn(saved);
  }

  // ---- helpers the modules call -----------------------------------------------------------

  iceFallback() {
    return this.iceList;
  }

  isGroupAdmin(group) {
    return this.groups.isAdmin(group);
  }

  /** A short message in the corner. kind: info | warn | error. */
  toast(text, kind = "info") {
    const div = document.createElement("div");
    div.className = `toast ${kind}`;
    div.setAttribute("role", kind === "error" ? "alert" : "status");
    div.textContent = text;
    const close = document.createElement("button");
    close.className = "ghost small";
    close.type = "button";
    close.textContent = "✕";
    close.onclick = () => div.remove();
    div.append(close);
    $("toasts").append(div);
    setTimeout(() => div.remove(), kind === "error" ? 10000 : 5000);
    if (kind === "error") console.warn(text);
  }

  /** Tell the person something happened elsewhere: the tab title, and a toast unless quiet. */
  notify(title, body, { quiet = false } = {}) {
    if (document.visibilityState !== "visible") document.title = `• ${title} · talkbridge`;
    if (!quiet) this.toast(`${title}${body ? `: ${body}` : ""}`, "info");
  }

  onOpen(c) {
    const dm = c.kind === "dm";
    $("btn-audio").hidden = !dm;
    $("btn-video").hidden = !dm;
    $("btn-room").hidden = dm;
    $("btn-group-info").hidden = dm;
    if (!dm) {
      this.groups.refresh(c.group).then(() => {
        if (this.chat.openConv === c) {
          $("chat-title").textContent = this.chat.title(c);
          this.onRoomChange(c.group);
        }
      }).catch((err) => this.toast(`Group: ${err.message}`, "error"));
      if (!$("group-panel").hidden) this.groups.showPanel(c.group);
    } else {
      this.groups.hidePanel();
    }
    this.onRoomChange(dm ? null : c.group);
  }

  onNotice(c, ev) {
    if (c.kind !== "group") return;
    const e = ev.body && ev.body.event;
    if (e === "room_ended" || e === "call_ended") {
      this.rooms.active.delete(c.group);
      this.onRoomChange(c.group);
    } else if ((e === "call_started" || e === "room_started") && !this.rooms.active.has(c.group)) {
      this.rooms.active.set(c.group, { room: ev.body.room, by: ev.body.actor });
      this.onRoomChange(c.group);
    }
    if ((e === "updated" || e === "created") && ev.body.name) {
      c.name = ev.body.name;
      const g = this.groups.info.get(c.group);
      if (g) g.name = ev.body.name;
      if (this.chat.openConv === c) $("chat-title").textContent = this.chat.title(c);
      if (this.rooms.room && this.rooms.room.group === c.group) $("room-title").textContent = `Group call · ${ev.body.name}`;
    }
    this.groups.onNotice(c.group, ev.body || {});
  }

  /**
   * After a reload nothing says a group call is running except the timeline: a
   * call_started notice with no call_ended after it.
   */
  inferRoom(c) {
    if (this.rooms.active.has(c.group)) return;
    const seqs = [...c.messages.keys()].sort((a, b) => b - a);
    for (const s of seqs) {
      const m = c.messages.get(s);
      const e = m.kind === "notice" && m.body && m.body.event;
      if (e === "call_ended" || e === "room_ended") return;
      if (e === "call_started" || e === "room_started") {
        this.rooms.active.set(c.group, { room: m.body.room, by: m.body.actor });
        this.onRoomChange(c.group);
        return;
      }
    }
  }

  /** Show or hide the "call running" banner of the open group. */
  onRoomChange(group) {
    const c = this.chat.openConv;
    const banner = $("room-banner");
    if (!c || c.kind !== "group" || (group && c.group !== group)) {
      if (!c || c.kind !== "group") banner.hidden = true;
      this.chat.renderList();
      return;
    }
    const a = this.rooms.active.get(c.group);
    const inIt = this.rooms.room && this.rooms.room.group === c.group;
    banner.hidden = !a || inIt;
    if (a) $("room-banner-text").textContent = `A group call is running${a.by ? ` (started by ${this.nameOf(a.by)})` : ""}.`;
    $("btn-room").textContent = inIt ? "In call" : a ? "Join call" : "Group call";
    this.chat.renderList();
  }

  // ---- sign-in ----------------------------------------------------------------------------

  _wireAuth() {
    const err = $("auth-error");
    const creds = () => ({ user: $("auth-user").value.trim(), password: $("auth-password").value });
    $("auth-form").onsubmit = async (e) => {
      e.preventDefault();
      err.textContent = "";
      try {
        const data = await postJson("/api/login", creds());
        this.signIn(data.token);
      } catch (ex) {
        err.textContent = ex.code === "unauthorized" || ex.code === "http_401" ? "Wrong user id or password." : ex.message;
      }
    };
    $("auth-register").onclick = async () => {
      err.textContent = "";
      if (!$("auth-form").reportValidity()) return;
      const body = creds();
      const name = $("auth-name").value.trim();
      if (name) body.name = name;
      try {
        const data = await postJson("/api/register", body);
        this.signIn(data.token);
      } catch (ex) {
        err.textContent = ex.code === "conflict" || ex.code === "http_409" ? "That user id is taken. Sign in instead, or pick another." : ex.message;
      }
    };
    $("auth-use-token").onclick = () => {
      const t = $("auth-token").value.trim();
      if (!jwtPayload(t)) {
        err.textContent = "That does not look like a JWT (three base64url parts).";
        return;
      }
      this.signIn(t);
    };
    $("signout").onclick = () => this.signOut();
  }

  signIn(token) {
    const claims = jwtPayload(token);
    if (!claims || !claims.sub) {
      $("auth-error").textContent = "The token has no user (sub claim).";
      localStorage.removeItem(KEY("token"));
      return;
    }
    if (claims.exp && claims.exp * 1000 < Date.now()) {
      $("auth-error").textContent = "The saved session has expired. Sign in again.";
      localStorage.removeItem(KEY("token"));
      return;
    }
    this.token = token;
    this.me = claims.sub;
    if (claims.name) this.names.set(claims.sub, claims.name);
    localStorage.setItem(KEY("token"), token);
    $("auth-view").hidden = true;
    $("app-view").hidden = false;
    $("signout").hidden = false;
    $("me").hidden = false;
    $("me").textContent = `${this.nameOf(this.me)} · ${this.device}`;
    document.body.classList.add("signed-in");
    const client = new Client({ url: socketUrl(), token, device: this.device });
    this.client = client;
    client.addEventListener("frame", (e) => this.dev.addFrame(e.detail));
    client.addEventListener("status", (e) => this._status(e.detail));
    client.addEventListener("open", (e) => this._onOpen(e.detail));
    client.addEventListener("event", (e) => this._onEvent(e.detail));
    client.addEventListener("server-error", (e) => this.toast(`Server error (${e.detail.code}): ${e.detail.message || ""}`, "error"));
    client.addEventListener("unauthorized", (e) => {
      if (this.client !== client) return;
      this.signOut();
      $("auth-error").textContent = `The server refused the session: ${e.detail.message || "unauthorized"}. Sign in again.`;
    });
    client.start();
  }

  signOut() {
    if (this.calls.call) this.calls.hangup();
    if (this.rooms.room) this.rooms.leave();
    if (this.client) this.client.stop();
    this.client = null;
    localStorage.removeItem(KEY("token"));
    this.token = null;
    this.me = null;
    this.chat.reset();
    this.groups.info.clear();
    this.groups.hidePanel();
    $("auth-view").hidden = false;
    $("app-view").hidden = true;
    $("signout").hidden = true;
    $("me").hidden = true;
    document.body.classList.remove("signed-in");
    this._status({ state: "idle" });
  }

  async _onOpen(ok) {
    this.iceList = ok.ice_servers || [];
    this.restarting = false;
    if (ok.user && ok.user !== this.me) this.me = ok.user;
    this._banner(null);
    this.calls.resume();
    try {
      await this.chat.sync();
      await this.groups.loadAll();
    } catch (err) {
      this.toast(`Sync failed: ${err.message}`, "error");
    }
  }

  _onEvent(ev) {
    try {
      if (ev.type.startsWith("call.")) return void this.calls.onEvent(ev);
      if (ev.type.startsWith("room.")) {
        // A 1:1 call through the relay negotiates with room.* too.
        if (this.calls.onRoomEvent(ev)) return;
        return void this.rooms.onEvent(ev);
      }
      if (this.chat.onEvent(ev)) return;
      if (ev.type === "pong") return;
      if (ev.type === "server.shutdown") {
        this.restarting = true;
        return;
      }
      if (ev.type === "group.request") {
        this.toast(`${this.nameOf(ev.user)} asks to join ${this.groupName(ev.group)}${ev.message ? `: “${ev.message}”` : ""}`, "info");
        this.groups.onNotice(ev.group, {});
        return;
      }
      if (ev.type === "group.request_resolved") {
        if (ev.user === this.me) {
          const ok = ev.outcome === "approved";
          this.toast(`Your request to join ${this.groupName(ev.group)} was ${ok ? "approved" : "declined"}.`, ok ? "info" : "warn");
          if (ok) this.chat.sync().then(() => this.groups.loadAll()).catch((err) => this.toast(err.message, "error"));
        } else this.groups.onNotice(ev.group, {});
        return;
      }
      if (ev.type === "presence" || ev.type.startsWith("group.")) {
        // Optional extras of docs/PROTOCOL.md: groups re-read on their notices anyway.
        if (ev.group) this.groups.onNotice(ev.group, {});
        return;
      }
    } catch (err) {
      this.toast(`Could not handle ${ev.type}: ${err.message}`, "error");
    }
  }

  _status(s) {
    const el = $("conn-status");
    el.dataset.state = s.state;
    if (s.state === "open") el.textContent = "connected";
    else if (s.state === "connecting") el.textContent = s.attempt ? "reconnecting…" : "connecting…";
    else if (s.state === "waiting") {
      el.textContent = `offline · retry in ${Math.ceil(s.delay / 1000)} s`;
      const why = this.restarting ? "the server is restarting" : navigator.onLine === false ? "this device reports no network" : s.why;
      this._banner(`Lost the connection to the server (${why}). Reconnecting in ${Math.ceil(s.delay / 1000)} s… Messages you write now are sent once it is back.`);
    } else el.textContent = "signed out";
  }

  _banner(text) {
    const b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
    if (text) {
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "ghost small";
      btn.textContent = "Retry now";
      btn.onclick = () => this.client && this.client.retryNow();
      b.append(" ", btn);
    }
  }

  _wireChrome() {
    $("new-dm").onsubmit = (e) => {
      e.preventDefault();
      const user = $("new-dm-user").value.trim().replace(/^@/, "");
      if (!user) return;
      if (user === this.me) {
        this.toast("That is you. Pick someone else's user id.", "warn");
        return;
      }
      $("new-dm-user").value = "";
      this.chat.open(this.chat.dmId(user));
    };
    $("chat-back").onclick = () => this.chat.close();
    $("btn-audio").onclick = () => this._call({ audio: true, video: false });
    $("btn-video").onclick = () => this._call({ audio: true, video: true });
    $("btn-room").onclick = () => this._room();
    $("room-banner-join").onclick = () => this._room();
    $("btn-group-info").onclick = () => {
      const c = this.chat.openConv;
      if (!c || c.kind !== "group") return;
      if ($("group-panel").hidden) this.groups.showPanel(c.group);
      else this.groups.hidePanel();
    };
    window.addEventListener("offline", () => this._banner("This device went offline. Messages you write now are sent when the network is back."));
    window.addEventListener("online", () => {
      this._banner(null);
      if (this.client) this.client.retryNow();
      this.calls.restartIce();
    });
    window.addEventListener("focus", () => {
      document.title = "talkbridge demo";
    });
    window.addEventListener("unhandledrejection", (e) => {
      this.toast(`Unexpected error: ${(e.reason && e.reason.message) || e.reason}`, "error");
    });
  }

  _call(media) {
    const c = this.chat.openConv;
    if (!c || c.kind !== "dm") return;
    if (!this.client || !this.client.isOpen) {
      this.toast("Not connected to the server: calls need the signaling connection.", "error");
      return;
    }
    if (this.rooms.room) {
      this.toast("Leave the group call before starting a 1:1 call.", "warn");
      return;
    }
    this.calls.start(c.peer, media);
  }

  _room() {
    const c = this.chat.openConv;
    if (!c || c.kind !== "group") return;
    if (this.rooms.room) {
      if (this.rooms.room.group === c.group) return;
      this.toast("Leave the current group call first.", "warn");
      return;
    }
    if (!this.client || !this.client.isOpen) {
      this.toast("Not connected to the server: calls need the signaling connection.", "error");
      return;
    }
    if (this.calls.call) {
      this.toast("Hang up the 1:1 call before joining a group call.", "warn");
      return;
    }
    this.rooms.join(c.group, { audio: true, video: true });
  }
}

new App();
