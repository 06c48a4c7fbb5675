// Group calls through the server's media relay: room.join / room.sdp / room.ice / room.leave,
// with room.tracks mapping each incoming track to the user it carries. The browser is the
// polite side: the relay makes the offers and the browser answers them.

import { getLocalMedia, toRtcIceServers, toggleLocalMedia } from "./rtc.js";
import { RelayLink } from "./relaylink.js";

export class RoomManager {
  /** app: {client, me, toast(), nameOf(user), iceFallback(), onRoomChange(group)} */
  constructor(app) {
    this.app = app;
    this.room = null;
    this.active = new Map(); // group -> {room, by} for rooms running that this device knows of
    this.el = {
      view: document.getElementById("room-view"),
      title: document.getElementById("room-title"),
      status: document.getElementById("room-status"),
      tiles: document.getElementById("room-tiles"),
      leave: document.getElementById("room-leave"),
      mic: document.getElementById("room-mic"),
      cam: document.getElementById("room-cam"),
    };
    this.el.leave.onclick = () => this.leave();
    this.el.mic.onclick = () => this.toggle("audio");
    this.el.cam.onclick = () => this.toggle("video");
  }

  /** Join (or start) the call of `group`, publishing `media`. */
  async join(group, media) {
    if (this.room) {
      this.app.toast("Leave the current group call first.", "warn");
      return;
    }
    const r = {
      group,
      id: null,
      link: null, // the RelayLink once the relay knows this device
      pc: null,
      local: null,
      streams: new Map(), // user -> MediaStream
      participants: new Map(), // `${user}/${device}` -> {user, device}
      ended: false,
      early: [], // room events that arrived before the peer connection
    };
    this.room = r;
    window.tbRoom = r;
    this.el.view.hidden = false;
    this.el.title.textContent = `Group call · ${this.app.groupName(group)}`;
    this._status("Opening camera and microphone…");
    this._tile(this.app.me, true);
    try {
      try {
        r.local = await getLocalMedia(media);
      } catch (err) {
        this.app.toast(`${err.message} Joining without sending media.`, "error");
        r.local = new MediaStream();
      }
      if (r.ended) return;
      this._setStream(this.app.me, r.local, true);
      const sending = { audio: r.local.getAudioTracks().length > 0, video: r.local.getVideoTracks().length > 0 };
      this._status("Joining…");
      const data = await this.app.client.request("room.join", { group, media: sending });
      if (r.ended) {
        this.app.client.request("room.leave", { room: data.room }).catch(() => {});
        return;
      }
      r.id = data.room;
      this.active.set(group, { room: r.id, by: this.app.me });
      for (const p of data.participants || []) this._participant(r, p, true);
      this._createLink(r, data.ice_servers);
      if (Array.isArray(data.tracks)) this._tracks(r, data.tracks);
      for (const ev of r.early.splice(0)) if (ev.room === r.id) this.onEvent(ev);
      this._status("Connecting media…");
      this.app.onRoomChange(group);
    } catch (err) {
      this._report(r, err);
      this._close(r);
    }
  }

  _createLink(r, servers) {
    r.link = new RelayLink({
      client: this.app.client,
      room: r.id,
      name: `room:${r.id}`,
      label: `group call ${this.app.groupName(r.group)}`,
      local: r.local,
      iceServers: toRtcIceServers(servers && servers.length ? servers : this.app.iceFallback()),
      onTrack: (user, track) => this._addRemote(user, track),
      onState: (s) => {
        if (s === "connected") this._status(`In call · ${this._people(r)}`);
        else if (s === "disconnected") this._status("Connection interrupted, trying to recover…");
        else if (s === "failed") this._status("Media connection to the relay failed.");
      },
      onError: (err) => this._report(r, err),
    });
    r.pc = r.link.pc;
  }

  /** Handle room.* events. Returns true when it was one. */
  onEvent(ev) {
    const r = this.room;
    if (r && !r.pc && !r.ended && ev.type !== "room.started" && ev.type !== "room.ended") {
      // The relay's first offer can overtake the room.join reply: hold it until the
      // peer connection exists, then replay in order.
      r.early.push(ev);
      return true;
    }
    const mine = r && r.id && ev.room === r.id;
    switch (ev.type) {
      case "room.started":
        this.active.set(ev.group, { room: ev.room, by: ev.by });
        this.app.onRoomChange(ev.group);
        if (!r || r.group !== ev.group) {
          this.app.notify(`${this.app.nameOf(ev.by)} started a group call`, this.app.groupName(ev.group));
        }
        return true;
      case "room.ended":
        for (const [g, a] of this.active) if (a.room === ev.room) {
          this.active.delete(g);
          this.app.onRoomChange(g);
        }
        return true;
      case "room.sdp":
      case "room.ice":
        if (mine && r.link) r.link.handle(ev);
        return true;
      case "room.joined":
        if (mine) this._participant(r, ev, false);
        return true;
      case "room.left":
        if (mine) {
          r.participants.delete(`${ev.user}/${ev.device}`);
          if (![...r.participants.values()].some((p) => p.user === ev.user) && ev.user !== this.app.me) {
            this._removeTile(ev.user);
          }
          this._status(`In call · ${this._people(r)}`);
        }
        return true;
      case "room.tracks":
        if (mine) this._tracks(r, ev.tracks || []);
        return true;
      case "room.speaker":
        if (mine) {
          for (const t of this.el.tiles.children) t.classList.toggle("speaking", t.dataset.user === ev.user);
        }
        return true;
      case "room.audio_only":
        if (mine) this.app.toast("Video paused: the network to the relay is losing too many packets. Audio continues.", "warn");
        return true;
      case "room.dropped":
        if (mine) {
          this.app.toast(`The relay dropped this device from the call (${ev.reason}).`, "error");
          this._close(r);
        }
        return true;
      default:
        return false;
    }
  }

  _participant(r, p, initial) {
    if (typeof p === "string") p = { user: p };
    if (!p.user) return;
    r.participants.set(`${p.user}/${p.device || ""}`, p);
    if (p.user !== this.app.me || (p.device && p.device !== this.app.device)) this._tile(p.user, false);
    if (!initial) this._status(`In call · ${this._people(r)}`);
  }

  _people(r) {
    const users = new Set([...r.participants.values()].map((p) => p.user));
    users.add(this.app.me);
    return `${users.size} ${users.size === 1 ? "person" : "people"}`;
  }

  _tracks(r, tracks) {
    for (const t of tracks) if (t.user && t.user !== this.app.me) this._tile(t.user, false);
    r.link.setTracks(tracks);
  }

  _addRemote(user, track) {
    const r = this.room;
    let stream = r.streams.get(user);
    if (!stream) {
      stream = new MediaStream();
      r.streams.set(user, stream);
    }
    // One video and one audio per tile: a republished track replaces the old one.
    for (const old of stream.getTracks()) if (old.kind === track.kind && old !== track) stream.removeTrack(old);
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    track.onended = () => stream.removeTrack(track);
    this._setStream(user, stream, false);
  }

  _tile(user, self) {
    let tile = this.el.tiles.querySelector(`[data-user="${CSS.escape(user)}"]`);
    if (tile) return tile;
    tile = document.createElement("figure");
    tile.className = "tile" + (self ? " self" : "");
    tile.dataset.user = user;
    const video = document.createElement("video");
    video.autoplay = true;
    video.playsInline = true;
    if (self) video.muted = true;
    const cap = document.createElement("figcaption");
    cap.textContent = self ? `${this.app.nameOf(user)} (you)` : this.app.nameOf(user);
    const avatar = document.createElement("div");
    avatar.className = "avatar big";
    avatar.textContent = (this.app.nameOf(user) || "?").slice(0, 1).toUpperCase();
    tile.append(avatar, video, cap);
    this.el.tiles.append(tile);
    this.el.tiles.dataset.count = String(this.el.tiles.children.length);
    return tile;
  }

  _setStream(user, stream, self) {
    const tile = this._tile(user, self);
    const video = tile.querySelector("video");
    if (video.srcObject !== stream) video.srcObject = stream;
    tile.classList.toggle("has-video", stream.getVideoTracks().length > 0);
    video.play().catch(() => {});
  }

  _removeTile(user) {
    const tile = this.el.tiles.querySelector(`[data-user="${CSS.escape(user)}"]`);
    if (tile) tile.remove();
    if (this.room) this.room.streams.delete(user);
    this.el.tiles.dataset.count = String(this.el.tiles.children.length);
  }

  toggle(kind) {
    const r = this.room;
    if (!r || !r.local) return;
    toggleLocalMedia(this.app, r.local, kind, this.el.mic, this.el.cam);
  }

  /** Leave the group call. */
  leave() {
    const r = this.room;
    if (!r) return;
    if (r.id) this.app.client.request("room.leave", { room: r.id }).catch((err) => this.app.toast(err.message, "error"));
    this._close(r);
  }

  _close(r) {
    if (r.ended) return;
    r.ended = true;
    if (r.link) r.link.close();
    if (r.local) for (const t of r.local.getTracks()) t.stop();
    this.el.tiles.replaceChildren();
    this.el.view.hidden = true;
    if (this.room === r) this.room = null;
    this.app.onRoomChange(r.group);
  }

  _report(r, err) {
    if (r.ended) return;
    this.app.toast(`Group call: ${(err && err.message) || err}`, "error");
  }

  _status(text) {
    this.el.status.textContent = text;
  }
}
