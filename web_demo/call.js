// 1:1 calls: call.invite / ringing / accept / ice / sdp / reject / cancel / hangup / ended.
// Peer to peer, one peer connection per call; every remote signaling message for it is applied
// through one SerialQueue, in arrival order. A call placed with via:"relay" (the developer
// switch, or the server's policy) carries no SDP in call.*: once answered, each of the two
// devices joins the call's room on the media relay (room.join {call}) and negotiates with the
// relay as in a group call (RelayLink). Ringing, answer, hangup and the call log stay call.*.

import { RelayLink } from "./relaylink.js";
import {
  SerialQueue,
  addRemoteCandidate,
  candidateToWire,
  getLocalMedia,
  iceServers,
  toggleLocalMedia,
  registerPeer,
  rtcSettings,
  toRtcIceServers,
  unregisterPeer,
} from "./rtc.js";

const REASONS = {
  hangup: "Call ended",
  declined: "Call declined",
  busy: "Busy on another call",
  cancelled: "Call cancelled",
  timeout: "No answer",
  answered_elsewhere: "Answered on another device",
  failed: "Call failed",
};

function newCallId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

export class CallManager {
  /** app: {client, token, me, iceFallback(), toast(msg, kind), nameOf(user)} */
  constructor(app) {
    this.app = app;
    this.call = null; // the call this device is in (or placing)
    this.incoming = new Map(); // call_id -> invite event, ringing here
    this.el = {
      view: document.getElementById("call-view"),
      title: document.getElementById("call-title"),
      status: document.getElementById("call-status"),
      remote: document.getElementById("call-remote-video"),
      local: document.getElementById("call-local-video"),
      mic: document.getElementById("call-mic"),
      cam: document.getElementById("call-cam"),
      hangup: document.getElementById("call-hangup"),
      dialog: document.getElementById("incoming-dialog"),
      inTitle: document.getElementById("incoming-title"),
      inMedia: document.getElementById("incoming-media"),
      accept: document.getElementById("incoming-accept"),
      acceptAudio: document.getElementById("incoming-accept-audio"),
      decline: document.getElementById("incoming-decline"),
    };
    this.el.hangup.onclick = () => this.hangup();
    this.el.mic.onclick = () => this.toggle("audio");
    this.el.cam.onclick = () => this.toggle("video");
    this.el.accept.onclick = () => this.acceptShown(false);
    this.el.acceptAudio.onclick = () => this.acceptShown(true);
    this.el.decline.onclick = () => this.declineShown();
    this.durationTimer = null;
  }

  get busy() {
    return !!this.call;
  }

  // ---- placing a call -------------------------------------------------------------------

  /** Call `peer` with {audio, video}. */
  async start(peer, media) {
    if (this.call) {
      this.app.toast("You are already in a call.", "warn");
      return;
    }
    const via = rtcSettings.callViaRelay ? "relay" : "p2p";
    const call = this._newCall({ id: newCallId(), role: "caller", peer, media, via });
    this._show(`Calling ${this.app.nameOf(peer)}…`);
    try {
      call.localStream = await getLocalMedia(media);
      if (call.ended) return;
      this._attachLocal(call);
      const req = {
        call_id: call.id,
        to: { user: peer },
        media: { audio: !!media.audio, video: !!media.video },
      };
      if (via === "relay") {
        req.via = "relay"; // no SDP: the media path is negotiated with the relay after the answer
      } else {
        await this._createPc(call);
        for (const t of call.localStream.getTracks()) call.pc.addTrack(t, call.localStream);
        // Receive what we send at least; an audio call still receives audio only.
        if (!media.audio) call.pc.addTransceiver("audio", { direction: "recvonly" });
        const offer = await call.pc.createOffer();
        await call.pc.setLocalDescription(offer);
        if (call.ended) return;
        req.sdp = { type: call.pc.localDescription.type, sdp: call.pc.localDescription.sdp };
      }
      const data = await this.app.client.request("call.invite", req);
      if (data.replaced_by) {
        // They called us at the same moment and their call won: take that one.
        this._end(call, `${this.app.nameOf(peer)} is calling you at the same time: joining their call…`, false);
        this._takeOver(data.replaced_by);
        return;
      }
      if (data.state === "ended") {
        this._end(call, data.reason === "busy" ? `${this.app.nameOf(peer)} is busy on another call.` : REASONS[data.reason] || "Call ended", true);
        return;
      }
      // The server's policy may send every call through the relay whatever we asked for.
      if (data.via === "relay") this._switchToRelay(call);
      this._signalReady(call);
      if (!call.ended && call.state === "inviting") this._status("Waiting for an answer…");
    } catch (err) {
      this._fail(call, err);
    }
  }

  // ---- incoming calls -------------------------------------------------------------------

  _onInvite(ev) {
    if (this.call && this.call.id === ev.call_id) return; // re-sent after a reconnect
    const mine = this.call;
    if (mine && mine.role === "caller" && mine.peer === ev.from && (mine.state === "inviting" || mine.state === "ringing")) {
      // Glare: we called each other at once. The server keeps one of the two calls and
      // ends the other; hold this invite until it says which.
      this.incoming.set(ev.call_id, ev);
      return;
    }
    if (this.autoAccept === ev.call_id) {
      this.autoAccept = null;
      this.incoming.set(ev.call_id, ev);
      this.accept(ev.call_id);
      return;
    }
    if (this.call || this.app.rooms.room) {
      // This device is busy: say so, so the caller hears "busy" rather than ringing forever.
      this.app.client.request("call.reject", { call_id: ev.call_id, reason: "busy" }).catch(() => {});
      return;
    }
    this.incoming.set(ev.call_id, ev);
    this.app.client.request("call.ringing", { call_id: ev.call_id }).catch((err) => this.app.toast(err.message, "error"));
    this._showIncoming(ev);
  }

  _showIncoming(ev) {
    this.shownInvite = ev;
    const kind = ev.media && ev.media.video ? "Video call" : "Audio call";
    this.el.inTitle.textContent = `${this.app.nameOf(ev.from)} is calling`;
    this.el.inMedia.textContent = kind;
    this.el.acceptAudio.hidden = !(ev.media && ev.media.video);
    this.el.dialog.dataset.callId = ev.call_id;
    if (!this.el.dialog.open) {
      if (this.el.dialog.showModal) this.el.dialog.showModal();
      else this.el.dialog.setAttribute("open", "");
    }
    this.app.notify(`${this.app.nameOf(ev.from)} is calling`, kind, { quiet: true }); // the dialog says it
  }

  _closeIncoming(callId) {
    this.incoming.delete(callId);
    if (this.shownInvite && this.shownInvite.call_id === callId) {
      this.shownInvite = null;
      if (this.el.dialog.open) this.el.dialog.close();
      else this.el.dialog.removeAttribute("open");
      delete this.el.dialog.dataset.callId;
      const next = this.incoming.values().next();
      if (!next.done) this._showIncoming(next.value);
    }
  }

  /** Accept `callId` as soon as its invite is here (it may already be held). */
  _takeOver(callId) {
    if (this.incoming.has(callId)) this.accept(callId);
    else this.autoAccept = callId;
  }

  acceptShown(audioOnly) {
    if (this.shownInvite) this.accept(this.shownInvite.call_id, audioOnly);
  }

  declineShown() {
    if (!this.shownInvite) return;
    const id = this.shownInvite.call_id;
    this._closeIncoming(id);
    this.app.client.request("call.reject", { call_id: id, reason: "declined" }).catch((err) => this.app.toast(err.message, "error"));
  }

  /** Answer the ringing call `callId` on this device. */
  async accept(callId, audioOnly = false) {
    const inv = this.incoming.get(callId);
    if (!inv || this.call) return;
    this._closeIncoming(callId);
    for (const other of [...this.incoming.keys()]) {
      this._closeIncoming(other);
      this.app.client.request("call.reject", { call_id: other, reason: "busy" }).catch(() => {});
    }
    const media = { audio: !!(inv.media && inv.media.audio), video: !!(inv.media && inv.media.video) && !audioOnly };
    // Through the relay whatever this device's own switch says: the caller (or the server) chose.
    const via = inv.via === "relay" ? "relay" : "p2p";
    const call = this._newCall({ id: callId, role: "callee", peer: inv.from, media, via });
    call.peerDevice = inv.from_device;
    // The chat with the caller opens underneath, so the call log shows up where expected.
    const conv = this.app.chat.dmId(inv.from);
    if (!this.app.chat.openConv || this.app.chat.openConv.conv !== conv) this.app.chat.open(conv);
    this._show(`Connecting to ${this.app.nameOf(inv.from)}…`);
    try {
      try {
        call.localStream = await getLocalMedia(media);
      } catch (err) {
        // Still take the call receive-only, and say why the other side cannot see or hear us.
        this.app.toast(`${err.message} Answering without sending media.`, "error");
        call.localStream = new MediaStream();
      }
      if (call.ended) return;
      this._attachLocal(call);
      if (via === "relay") {
        await this.app.client.request("call.accept", { call_id: callId });
        this._signalReady(call);
        call.state = "connecting";
        this._status("Connecting media…");
        await this._joinRoom(call);
        return;
      }
      await this._createPc(call);
      // The offer goes through the call's queue like every later message for this call.
      await call.queue.push(async () => {
        await call.pc.setRemoteDescription(inv.sdp);
        for (const t of call.localStream.getTracks()) call.pc.addTrack(t, call.localStream);
        await call.pc.setLocalDescription(await call.pc.createAnswer());
        // Candidates that came with or after the invite waited for the offer.
        call.remoteReady = true;
        for (const c of call.earlyCandidates.splice(0)) await addRemoteCandidate(call.pc, c);
      });
      if (call.ended) return;
      await this.app.client.request("call.accept", {
        call_id: callId,
        sdp: { type: call.pc.localDescription.type, sdp: call.pc.localDescription.sdp },
      });
      this._signalReady(call);
      call.state = "connecting";
      this._status("Connecting media…");
    } catch (err) {
      this._fail(call, err);
    }
  }

  // ---- events ---------------------------------------------------------------------------

  /** Handle a call.* event from the server. Returns true when it was one. */
  onEvent(ev) {
    const call = this.call && this.call.id === ev.call_id ? this.call : null;
    switch (ev.type) {
      case "call.invite":
        this._onInvite(ev);
        return true;
      case "call.ringing":
        if (call && call.state === "inviting") {
          call.state = "ringing";
          this._status(`Ringing…`);
        }
        return true;
      case "call.accepted":
        if (call && call.role === "caller") {
          call.state = "connecting";
          call.peerDevice = ev.device;
          this._status("Connecting media…");
          if (ev.via === "relay" || call.via === "relay") {
            this._switchToRelay(call);
            this._joinRoom(call);
            return true;
          }
          call.queue.push(async () => {
            await call.pc.setRemoteDescription(ev.sdp);
            call.remoteReady = true;
            for (const c of call.earlyCandidates.splice(0)) await addRemoteCandidate(call.pc, c);
          });
        }
        return true;
      case "call.ice":
        if (call) {
          // A caller's candidates can arrive before call.accepted: hold them until the answer.
          if (!call.remoteReady) call.earlyCandidates.push(ev.candidate);
          else call.queue.push(() => addRemoteCandidate(call.pc, ev.candidate));
        } else if (this.incoming.has(ev.call_id)) {
          const inv = this.incoming.get(ev.call_id);
          (inv.earlyCandidates ||= []).push(ev.candidate);
        }
        return true;
      case "call.sdp":
        if (call) call.queue.push(() => this._onRemoteSdp(call, ev.sdp));
        return true;
      case "call.ended":
        if (call && ev.replaced_by) {
          // Glare, and the other call won: answer it instead.
          this._end(call, `${this.app.nameOf(call.peer)} is calling you at the same time: joining their call…`, false);
          this._takeOver(ev.replaced_by);
          return true;
        }
        if (this.incoming.has(ev.call_id)) {
          this._closeIncoming(ev.call_id);
          if (ev.reason === "answered_elsewhere") this.app.toast("Call answered on another device.", "info");
          else if (ev.reason === "timeout" || ev.reason === "cancelled") this.app.toast(`Missed call (${REASONS[ev.reason]}).`, "info");
        }
        if (call) this._end(call, REASONS[ev.reason] || `Call ended (${ev.reason})`, ev.reason !== "hangup" && ev.reason !== "cancelled");
        return true;
      default:
        return false;
    }
  }

  async _onRemoteSdp(call, sdp) {
    if (sdp.type === "offer") {
      if (call.pc.signalingState !== "stable") {
        await call.pc.setLocalDescription({ type: "rollback" });
      }
      await call.pc.setRemoteDescription(sdp);
      const answer = await call.pc.createAnswer();
      await call.pc.setLocalDescription(answer);
      await this.app.client.request("call.sdp", {
        call_id: call.id,
        sdp: { type: answer.type, sdp: call.pc.localDescription.sdp },
      });
    } else {
      await call.pc.setRemoteDescription(sdp);
    }
  }

  // ---- controls -------------------------------------------------------------------------

  /** Hang up, cancel or decline, whichever fits the call's state. */
  hangup() {
    const call = this.call;
    if (!call) return;
    let type = "call.hangup";
    if (call.role === "caller" && (call.state === "inviting" || call.state === "ringing")) type = "call.cancel";
    this.app.client.request(type, { call_id: call.id }).catch((err) => this.app.toast(err.message, "error"));
    this._end(call, type === "call.cancel" ? "Call cancelled" : "Call ended", false);
  }

  /** Mute or unmute the microphone ("audio") or the camera ("video"). */
  toggle(kind) {
    const call = this.call;
    if (!call || !call.localStream) return;
    toggleLocalMedia(this.app, call.localStream, kind, this.el.mic, this.el.cam);
  }

  /** The signaling connection is back: collect what the server held for this device. */
  resume() {
    const call = this.call;
    if (!call || call.ended || !call.ready) return;
    this.app.client.request("call.resume", { call_id: call.id }).catch((err) => {
      if (err.code === "not_found" || err.code === "conflict") this._end(call, "The call ended while the connection was down.", true);
      else this.app.toast(err.message, "error");
    });
  }

  /** The network came back: restart ICE so media finds a path again. */
  restartIce() {
    const call = this.call;
    // Through the relay there is no peer to renegotiate with: the relay makes the offers.
    if (!call || !call.pc || call.via === "relay" || call.role !== "caller" || call.state !== "active") return;
    call.queue.push(async () => {
      if (call.pc.signalingState !== "stable") return;
      const offer = await call.pc.createOffer({ iceRestart: true });
      await call.pc.setLocalDescription(offer);
      await this.app.client.request("call.sdp", { call_id: call.id, sdp: { type: offer.type, sdp: offer.sdp } });
    });
  }

  // ---- internals ------------------------------------------------------------------------

  _newCall(fields) {
    const call = {
      via: "p2p",
      ...fields,
      state: fields.role === "caller" ? "inviting" : "connecting",
      pc: null,
      link: null, // RelayLink when the media goes through the relay
      roomId: null,
      joining: false,
      earlyRoom: [], // room events that came before the room.join reply was handled
      localStream: null,
      remoteStream: new MediaStream(),
      earlyCandidates: [],
      remoteReady: false,
      outIce: [],
      ready: false,
      ended: false,
      started: null,
    };
    call.queue = new SerialQueue((err) => this._fail(call, err));
    if (fields.role === "callee") {
      const inv = this.incoming.get(fields.id);
      if (inv && inv.earlyCandidates) call.earlyCandidates.push(...inv.earlyCandidates);
    }
    this.call = call;
    window.tbCall = call; // for the developer console and the browser tests
    return call;
  }

  async _createPc(call) {
    const servers = await iceServers(this.app.token, this.app.iceFallback());
    const relay = rtcSettings.relayOnly;
    const config = {
      iceServers: toRtcIceServers(servers),
      iceTransportPolicy: relay ? "relay" : "all",
      bundlePolicy: "max-bundle",
    };
    if (relay && !config.iceServers.some((s) => [].concat(s.urls).some((u) => /^turns?:/.test(u)))) {
      this.app.toast("Relay-only ICE is on but the server offers no TURN server: the call cannot connect.", "error");
    }
    const pc = new RTCPeerConnection(config);
    call.pc = pc;
    registerPeer("call", pc, { label: `1:1 call with ${call.peer}`, policy: config.iceTransportPolicy, path: "peer to peer" });
    pc.onicecandidate = (e) => {
      if (call.pc !== pc) return; // dropped for the relay path
      const wire = candidateToWire(e.candidate);
      if (call.ready) this._sendIce(call, wire);
      else call.outIce.push(wire);
    };
    pc.ontrack = (e) => this._addRemoteTrack(call, e.track);
    pc.onconnectionstatechange = () => {
      if (call.pc === pc) this._onConnState(call, pc.connectionState);
    };
    pc.oniceconnectionstatechange = () => {
      // Firefox before connectionState support reports here only.
      if (pc.connectionState === undefined && pc.iceConnectionState === "connected" && call.state !== "active") {
        call.state = "active";
        call.started = Date.now();
        this._tickDuration();
      }
    };
    return pc;
  }

  _addRemoteTrack(call, track) {
    // One audio and one video: a track republished through the relay replaces the old one.
    for (const old of call.remoteStream.getTracks()) if (old.kind === track.kind && old !== track) call.remoteStream.removeTrack(old);
    if (!call.remoteStream.getTracks().includes(track)) call.remoteStream.addTrack(track);
    this.el.remote.srcObject = call.remoteStream;
    this.el.remote.play().catch(() => {});
  }

  _onConnState(call, state) {
    if (call.ended) return;
    if (state === "connected") {
      if (call.state !== "active") {
        call.state = "active";
        call.started = call.started || Date.now();
        this._tickDuration();
      }
    } else if (state === "disconnected") {
      this._status("Connection interrupted, trying to recover…");
    } else if (state === "failed") {
      if (call.via === "relay") {
        this._status("Media connection to the relay failed.");
      } else {
        this._status("Media connection failed. Restarting ICE…");
        this.restartIce();
      }
    }
  }

  /** The call's media goes through the relay: drop any peer-to-peer connection begun for it. */
  _switchToRelay(call) {
    call.via = "relay";
    call.outIce = [];
    call.earlyCandidates = [];
    if (call.pc && !call.link) {
      unregisterPeer("call", call.pc);
      call.pc.close();
      call.pc = null;
    }
  }

  /** Join the call's room on the relay (both parties' devices do, once the call is answered). */
  async _joinRoom(call) {
    if (call.link || call.joining || call.ended) return;
    call.joining = true;
    try {
      const local = call.localStream || new MediaStream();
      const sending = { audio: local.getAudioTracks().length > 0, video: local.getVideoTracks().length > 0 };
      const data = await this.app.client.request("room.join", { call: call.id, media: sending });
      if (call.ended) return; // the server closes the room with the call
      call.roomId = data.room;
      const servers = data.ice_servers && data.ice_servers.length ? data.ice_servers : this.app.iceFallback();
      call.link = new RelayLink({
        client: this.app.client,
        room: data.room,
        name: `room:${data.room}`,
        label: `1:1 call with ${call.peer} through the media relay`,
        local,
        iceServers: toRtcIceServers(servers),
        onTrack: (user, track) => {
          if (user !== this.app.me) this._addRemoteTrack(call, track);
        },
        onState: (state) => this._onConnState(call, state),
        onError: (err) => {
          if (!call.ended) this.app.toast(`Call: ${(err && err.message) || err}`, "error");
        },
      });
      call.pc = call.link.pc;
      if (Array.isArray(data.tracks)) call.link.setTracks(data.tracks);
      for (const ev of call.earlyRoom.splice(0)) this.onRoomEvent(ev);
    } catch (err) {
      this._fail(call, err);
    }
  }

  /** Handle a room.* event of this device's 1:1 call through the relay; true when it was one. */
  onRoomEvent(ev) {
    const call = this.call;
    if (!call || call.via !== "relay" || ev.type === "room.started" || ev.type === "room.ended") return false;
    if (!call.link) {
      if (!call.joining) return false;
      call.earlyRoom.push(ev); // before the room.join reply was handled: replay in order
      return true;
    }
    if (ev.room !== call.roomId) return false;
    if (call.link.handle(ev)) return true;
    if (ev.type === "room.audio_only") {
      this.app.toast("Video paused: the network to the relay is losing too many packets. Audio continues.", "warn");
    } else if (ev.type === "room.dropped") {
      this._fail(call, new Error(`The relay dropped this device from the call (${ev.reason}).`));
    }
    return true;
  }

  _signalReady(call) {
    call.ready = true;
    const out = call.outIce.splice(0);
    if (call.via !== "relay") for (const c of out) this._sendIce(call, c);
  }

  _sendIce(call, candidate) {
    if (call.ended || call.via === "relay") return;
    this.app.client.request("call.ice", { call_id: call.id, candidate }).catch((err) => {
      if (!call.ended) this.app.toast(err.message, "error");
    });
  }

  _attachLocal(call) {
    this.el.local.srcObject = call.localStream;
    this.el.local.hidden = call.localStream.getVideoTracks().length === 0;
    this.el.local.play().catch(() => {});
    this.el.mic.textContent = "Mute mic";
    this.el.cam.textContent = "Camera off";
    this.el.mic.classList.remove("off");
    this.el.cam.classList.remove("off");
    this.el.cam.hidden = call.localStream.getVideoTracks().length === 0;
  }

  _show(text) {
    this.el.view.hidden = false;
    this.el.view.classList.toggle("audio-only", !(this.call && this.call.media.video));
    this.el.title.textContent = this.call ? this.app.nameOf(this.call.peer) : "";
    this._status(text);
  }

  _status(text) {
    this.el.status.textContent = text;
  }

  _tickDuration() {
    clearInterval(this.durationTimer);
    const show = () => {
      const call = this.call;
      if (!call || !call.started) return;
      const s = Math.floor((Date.now() - call.started) / 1000);
      this._status(`In call · ${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`);
    };
    show();
    this.durationTimer = setInterval(show, 1000);
  }

  _fail(call, err) {
    if (call.ended) return;
    const msg = (err && err.message) || String(err);
    this.app.toast(msg, "error");
    // Tell the other side, so it does not wait for a call this device has given up on.
    let req = null;
    if (call.role === "caller") {
      // Before the invite went out the server knows nothing of this call.
      if (call.ready) req = call.state === "inviting" || call.state === "ringing" ? ["call.cancel", {}] : ["call.hangup", {}];
    } else {
      req = call.ready ? ["call.hangup", {}] : ["call.reject", { reason: "declined" }];
    }
    if (req && this.app.client.isOpen) this.app.client.request(req[0], { call_id: call.id, ...req[1] }).catch(() => {});
    this._end(call, msg, true);
  }

  _end(call, text, important) {
    if (call.ended) return;
    call.ended = true;
    clearInterval(this.durationTimer);
    if (call.link) {
      call.link.close();
    } else if (call.pc) {
      unregisterPeer("call", call.pc);
      call.pc.close();
    }
    if (call.localStream) for (const t of call.localStream.getTracks()) t.stop();
    this.el.remote.srcObject = null;
    this.el.local.srcObject = null;
    if (this.call === call) this.call = null;
    this._status(text);
    if (important) this.app.toast(text, "info");
    setTimeout(() => {
      if (!this.call) this.el.view.hidden = true;
    }, 1200);
  }
}

export function describeCallLog(body, me, from) {
  const media = body.media && body.media.video ? "Video call" : "Audio call";
  const dur = body.duration_s ? ` · ${Math.floor(body.duration_s / 60)}:${String(Math.round(body.duration_s) % 60).padStart(2, "0")}` : "";
  const outcomes = {
    completed: "completed",
    missed: from === me ? "no answer" : "missed",
    declined: "declined",
    cancelled: "cancelled",
    busy: "busy",
    failed: "failed",
  };
  return `${media} · ${outcomes[body.outcome] || body.outcome || ""}${dur}`;
}
