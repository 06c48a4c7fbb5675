// Group calls through the server's media relay: room.join / room.sdp / room.ice / room.leave,
// with room.tracks mapping each incoming track to the user it carries. The browser is the
// polite side: the relay makes the offers and the browser answers them.

import {
  SerialQueue,
  addRemoteCandidate,
  candidateToWire,
  getLocalMedia,
  registerPeer,
  rtcSettings,
  toRtcIceServers,
  unregisterPeer,
} from "./rtc.js";

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
      pc: null,
      local: null,
      tracks: new Map(), // track_id -> {user, kind}
      mids: new Map(), // mid -> {user, kind} when the relay says which section carries whom
      streams: new Map(), // user -> MediaStream
      participants: new Map(), // `${user}/${device}` -> {user, device}
      pendingTracks: [], // remote tracks whose owner room.tracks has not named yet
      ended: false,
      early: [], // room events that arrived before the peer connection
    };
    r.queue = new SerialQueue((err) => this._report(r, err));
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
      if (Array.isArray(data.tracks)) this._tracks(r, data.tracks);
      this._createPc(r, data.ice_servers);
      // Our tracks go onto the sections the relay offers to receive (see _attachLocal).
      for (const ev of r.early.splice(0)) if (ev.room === r.id) this.onEvent(ev);
      this._status("Connecting media…");
      this.app.onRoomChange(group);
    } catch (err) {
      this._report(r, err);
      this._close(r);
    }
  }

  _createPc(r, servers) {
    const config = {
      iceServers: toRtcIceServers(servers && servers.length ? servers : this.app.iceFallback()),
      iceTransportPolicy: rtcSettings.relayOnly ? "relay" : "all",
      bundlePolicy: "max-bundle",
    };
    const pc = new RTCPeerConnection(config);
    r.pc = pc;
    registerPeer(`room:${r.id}`, pc, { label: `group call ${this.app.groupName(r.group)}`, policy: config.iceTransportPolicy });
    pc.onicecandidate = (e) => {
      if (r.ended) return;
      this.app.client
        .request("room.ice", { room: r.id, candidate: candidateToWire(e.candidate) })
        .catch((err) => this._report(r, err));
    };
    // No onnegotiationneeded: the relay makes the offers (it picks every leg's codec) and
    // the browser answers, attaching its tracks to the sections the relay receives on.
    pc.ontrack = (e) => this._onTrack(r, e);
    pc.onconnectionstatechange = () => {
      if (r.ended) return;
      const s = pc.connectionState;
      if (s === "connected") this._status(`In call · ${this._people(r)}`);
      else if (s === "disconnected") this._status("Connection interrupted, trying to recover…");
      else if (s === "failed") this._status("Media connection to the relay failed.");
    };
  }

  async _onRemoteSdp(r, sdp) {
    const pc = r.pc;
    if (sdp.type === "offer") {
      if (pc.signalingState !== "stable") {
        // Polite peer: drop any offer of ours and take the relay's.
        await pc.setLocalDescription({ type: "rollback" });
      }
      await pc.setRemoteDescription(sdp);
      await this._attachLocal(r, sdp.sdp);
      await pc.setLocalDescription(await pc.createAnswer());
      const desc = pc.localDescription;
      await this.app.client.request("room.sdp", { room: r.id, sdp: { type: desc.type, sdp: desc.sdp } });
      this._assignPending(r);
    } else if (pc.signalingState === "have-local-offer") {
      await pc.setRemoteDescription(sdp);
    }
  }

  /**
   * Put local tracks on the sections the relay offered to receive (a=recvonly on its side).
   * addTrack could pick a section that carries someone else's media to us, so match by mid.
   */
  async _attachLocal(r, offerSdp) {
    const wanted = new Map(); // mid -> kind, for sections where the relay receives
    // Attribute order inside a section varies (a=recvonly may come before a=mid).
    for (const section of offerSdp.split(/\r?\nm=/).slice(1)) {
      const lines = section.split(/\r?\n/);
      const kind = lines[0].split(" ")[0];
      const midLine = lines.find((l) => l.startsWith("a=mid:"));
      if (midLine && lines.includes("a=recvonly")) wanted.set(midLine.slice(6).trim(), kind);
    }
    const used = new Set();
    for (const t of r.pc.getTransceivers()) {
      if (!wanted.has(t.mid)) continue;
      const k = wanted.get(t.mid);
      if (t.sender.track) {
        used.add(t.sender.track);
        continue;
      }
      const track = r.local.getTracks().find((x) => x.kind === k && !used.has(x));
      if (!track) continue;
      used.add(track);
      t.direction = "sendonly";
      await t.sender.replaceTrack(track);
      if (t.sender.setStreams) t.sender.setStreams(r.local);
    }
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
        if (mine && r.pc) r.queue.push(() => this._onRemoteSdp(r, ev.sdp));
        return true;
      case "room.ice":
        if (mine && r.pc) r.queue.push(() => addRemoteCandidate(r.pc, ev.candidate));
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
    for (const t of tracks) {
      r.tracks.set(t.track_id, t);
      if (t.mid != null) r.mids.set(String(t.mid), t);
      if (t.user && t.user !== this.app.me) this._tile(t.user, false);
    }
    this._assignPending(r);
  }

  _ownerOf(r, track, transceiver, streams) {
    const byId = r.tracks.get(track.id);
    if (byId) return byId.user;
    if (transceiver && transceiver.mid != null && r.mids.has(String(transceiver.mid))) return r.mids.get(String(transceiver.mid)).user;
    // Some relays name the stream after the track's owner (msid "<user>" or "<user>:<x>").
    for (const s of streams || []) {
      const hit = r.tracks.get(s.id);
      if (hit) return hit.user;
    }
    return null;
  }

  _onTrack(r, e) {
    const user = this._ownerOf(r, e.track, e.transceiver, e.streams);
    if (!user) {
      r.pendingTracks.push(e);
      return;
    }
    this._addRemote(user, e.track);
  }

  _assignPending(r) {
    const still = [];
    for (const e of r.pendingTracks) {
      const user = this._ownerOf(r, e.track, e.transceiver, e.streams);
      if (user) this._addRemote(user, e.track);
      else still.push(e);
    }
    r.pendingTracks = still;
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
    const tracks = kind === "audio" ? r.local.getAudioTracks() : r.local.getVideoTracks();
    if (!tracks.length) {
      this.app.toast(kind === "audio" ? "No microphone in this call." : "No camera in this call.", "warn");
      return;
    }
    const on = !tracks[0].enabled;
    for (const t of tracks) t.enabled = on;
    const btn = kind === "audio" ? this.el.mic : this.el.cam;
    btn.classList.toggle("off", !on);
    btn.textContent = kind === "audio" ? (on ? "Mute mic" : "Unmute mic") : on ? "Camera off" : "Camera on";
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
    if (r.pc) {
      unregisterPeer(`room:${r.id}`, r.pc);
      r.pc.close();
    }
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
