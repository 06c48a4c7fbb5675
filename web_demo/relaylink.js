// One device's peer connection to the server's media relay, as used by group calls and by
// 1:1 calls placed through the relay: the relay makes the offers (room.sdp events) and the
// browser answers them, putting its own tracks on the sections the relay receives on;
// room.ice trickles candidates; room.tracks says whose media each incoming track carries.
// Every remote signaling message goes through one SerialQueue, in arrival order.

import { SerialQueue, addRemoteCandidate, candidateToWire, registerPeer, rtcSettings, unregisterPeer } from "./rtc.js";

export class RelayLink {
  /**
   * opts: {client, room, name (peer registry name), label, local (MediaStream),
   *        iceServers (RTCIceServer dictionaries), onTrack(user, track), onState(state), onError(err)}
   */
  constructor(opts) {
    this.opts = opts;
    this.room = opts.room;
    this.name = opts.name;
    this.local = opts.local;
    this.closed = false;
    this.tracks = new Map(); // track_id -> {user, kind}
    this.mids = new Map(); // mid -> {user, kind} when the relay says which section carries whom
    this.pending = []; // remote track events whose owner room.tracks has not named yet
    this.queue = new SerialQueue((err) => this._error(err));
    const config = {
      iceServers: opts.iceServers,
      iceTransportPolicy: rtcSettings.relayOnly ? "relay" : "all",
      bundlePolicy: "max-bundle",
    };
    const pc = new RTCPeerConnection(config);
    this.pc = pc;
    registerPeer(this.name, pc, { label: opts.label, policy: config.iceTransportPolicy, path: `media relay (${this.room})` });
    pc.onicecandidate = (e) => {
      if (this.closed) return;
      opts.client.request("room.ice", { room: this.room, candidate: candidateToWire(e.candidate) }).catch((err) => this._error(err));
    };
    // No onnegotiationneeded: the relay makes the offers (it picks every leg's codec).
    pc.ontrack = (e) => {
      const user = this._ownerOf(e);
      if (user) opts.onTrack(user, e.track);
      else this.pending.push(e);
    };
    pc.onconnectionstatechange = () => {
      if (!this.closed) opts.onState(pc.connectionState);
    };
  }

  /** Apply a room.sdp, room.ice or room.tracks event of this room; true when it was one. */
  handle(ev) {
    switch (ev.type) {
      case "room.sdp":
        this.queue.push(() => this._onRemoteSdp(ev.sdp));
        return true;
      case "room.ice":
        this.queue.push(() => addRemoteCandidate(this.pc, ev.candidate));
        return true;
      case "room.tracks":
        this.setTracks(ev.tracks || []);
        return true;
      default:
        return false;
    }
  }

  /** Learn whose media each track carries (room.tracks, or the join reply's tracks). */
  setTracks(list) {
    for (const t of list) {
      this.tracks.set(t.track_id, t);
      if (t.mid != null) this.mids.set(String(t.mid), t);
    }
    this._assignPending();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    unregisterPeer(this.name, this.pc);
    this.pc.close();
  }

  _error(err) {
    if (!this.closed) this.opts.onError(err);
  }

  async _onRemoteSdp(sdp) {
    const pc = this.pc;
    if (this.closed) return;
    if (sdp.type === "offer") {
      if (pc.signalingState !== "stable") {
        // Polite peer: drop any offer of ours and take the relay's.
        await pc.setLocalDescription({ type: "rollback" });
      }
      await pc.setRemoteDescription(sdp);
      await this._attachLocal(sdp.sdp);
      await pc.setLocalDescription(await pc.createAnswer());
      const desc = pc.localDescription;
      await this.opts.client.request("room.sdp", { room: this.room, sdp: { type: desc.type, sdp: desc.sdp } });
      this._assignPending();
    } else if (pc.signalingState === "have-local-offer") {
      await pc.setRemoteDescription(sdp);
    }
  }

  /**
   * Put local tracks on the sections the relay offered to receive (a=recvonly on its side).
   * addTrack could pick a section that carries someone else's media to us, so match by mid.
   */
  async _attachLocal(offerSdp) {
    const wanted = new Map(); // mid -> kind, for sections where the relay receives
    // Attribute order inside a section varies (a=recvonly may come before a=mid).
    for (const section of offerSdp.split(/\r?\nm=/).slice(1)) {
      const lines = section.split(/\r?\n/);
      const kind = lines[0].split(" ")[0];
      const midLine = lines.find((l) => l.startsWith("a=mid:"));
      if (midLine && lines.includes("a=recvonly")) wanted.set(midLine.slice(6).trim(), kind);
    }
    const used = new Set();
    for (const t of this.pc.getTransceivers()) {
      if (!wanted.has(t.mid)) continue;
      const k = wanted.get(t.mid);
      if (t.sender.track) {
        used.add(t.sender.track);
        continue;
      }
      const track = this.local.getTracks().find((x) => x.kind === k && !used.has(x));
      if (!track) continue;
      used.add(track);
      t.direction = "sendonly";
      await t.sender.replaceTrack(track);
      if (t.sender.setStreams) t.sender.setStreams(this.local);
    }
  }

  _ownerOf(e) {
    const byId = this.tracks.get(e.track.id);
    if (byId) return byId.user;
    const t = e.transceiver;
    if (t && t.mid != null && this.mids.has(String(t.mid))) return this.mids.get(String(t.mid)).user;
    // Some relays name the stream after the track's owner (msid "<user>" or "<user>:<x>").
    for (const s of e.streams || []) {
      const hit = this.tracks.get(s.id);
      if (hit) return hit.user;
    }
    return null;
  }

  _assignPending() {
    const still = [];
    for (const e of this.pending) {
      const user = this._ownerOf(e);
      if (user) this.opts.onTrack(user, e.track);
      else still.push(e);
    }
    this.pending = still;
  }
}
