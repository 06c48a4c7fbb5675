// WebRTC helpers shared by 1:1 and group calls: camera/microphone access with messages a
// person understands, an ordered signaling queue per peer connection, ICE server settings,
// and a registry of live peer connections that the developer panel (and tests) read.

/** Explain a getUserMedia failure in words a person can act on. */
export function mediaErrorMessage(err, wanted) {
  const what = wanted.video ? (wanted.audio ? "camera and microphone" : "camera") : "microphone";
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return `Access to the ${what} was denied. Allow it in the browser's site settings and try again.`;
    case "NotFoundError":
    case "OverconstrainedError":
      return `No ${what} found on this device.`;
    case "NotReadableError":
    case "AbortError":
      return `The ${what} is in use by another application or could not be started.`;
    case "TypeError":
      return "This page cannot use camera or microphone here (it needs https or localhost).";
    default:
      return `Could not open the ${what}: ${(err && (err.message || err.name)) || err}`;
  }
}

/** Open the devices for `media`; rejects with an Error whose message is user-facing. */
/** Mute or unmute the microphone ("audio") or the camera ("video") of a local stream, and
 * show it on the call's buttons (1:1 and group calls alike). */
export function toggleLocalMedia(app, stream, kind, micButton, camButton) {
  const tracks = kind === "audio" ? stream.getAudioTracks() : stream.getVideoTracks();
  if (!tracks.length) {
    app.toast(kind === "audio" ? "No microphone in this call." : "No camera in this call.", "warn");
    return;
  }
  const on = !tracks[0].enabled;
  for (const t of tracks) t.enabled = on;
  const btn = kind === "audio" ? micButton : camButton;
  btn.classList.toggle("off", !on);
  btn.textContent = kind === "audio" ? (on ? "Mute mic" : "Unmute mic") : on ? "Camera off" : "Camera on";
}

export async function getLocalMedia(media) {
  const wanted = { audio: !!media.audio, video: !!media.video };
  if (!wanted.audio && !wanted.video) return new MediaStream();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("This browser gives no access to camera or microphone here (it needs https or localhost).");
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: wanted.audio,
      video: wanted.video ? { width: { ideal: 640 }, height: { ideal: 480 } } : false,
    });
  } catch (err) {
    const e = new Error(mediaErrorMessage(err, wanted));
    e.name = err && err.name;
    throw e;
  }
}

/**
 * Run async steps strictly one after another. Signaling messages for one peer connection go
 * through one queue, so a candidate is never applied before the description it belongs to.
 */
export class SerialQueue {
  constructor(onError) {
    this.tail = Promise.resolve();
    this.onError = onError;
  }

  push(step) {
    const run = this.tail.then(step);
    // Keep the chain alive after a failure, but report it: nothing fails silently.
    this.tail = run.catch((err) => this.onError && this.onError(err));
    return run;
  }
}

const SETTINGS_KEY = "tb.rtc";

/** Developer switches, kept across reloads. */
export const rtcSettings = {
  relayOnly: false, // iceTransportPolicy "relay" on every peer connection
  callViaRelay: false, // place 1:1 calls with via:"relay": media through the server's media relay
  load() {
    try {
      const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
      // Only known switches: an old "forceRelayCall" (TURN for 1:1 calls) meant something else.
      if (typeof saved.relayOnly === "boolean") this.relayOnly = saved.relayOnly;
      if (typeof saved.callViaRelay === "boolean") this.callViaRelay = saved.callViaRelay;
    } catch {
      /* defaults */
    }
  },
  save() {
    localStorage.setItem(
      SETTINGS_KEY,
      JSON.stringify({ relayOnly: this.relayOnly, callViaRelay: this.callViaRelay }),
    );
  },
};

/** Fetch fresh ICE servers (TURN credentials expire); falls back to the auth.ok list. */
export async function iceServers(token, fallback) {
  try {
    const res = await fetch("/api/ice-servers", { headers: { Authorization: `Bearer ${token}` } });
    if (res.ok) {
      const data = await res.json();
      if (Array.isArray(data.ice_servers)) return data.ice_servers;
    }
  } catch {
    /* offline or endpoint missing: use what auth.ok gave */
  }
  return fallback || [];
}

/** Convert the server's ice_servers entries into RTCIceServer dictionaries. */
export function toRtcIceServers(list) {
  return (list || []).map((s) => {
    const out = { urls: s.urls };
    if (s.username != null) out.username = s.username;
    if (s.credential != null) out.credential = s.credential;
    return out;
  });
}

/** Live peer connections by name ("call", "room:<id>"): read by the developer panel and tests. */
export const peers = new Map();
window.tbPeers = peers;

export function registerPeer(name, pc, meta = {}) {
  peers.set(name, { pc, meta, created: Date.now() });
  window.dispatchEvent(new CustomEvent("tb-peers"));
}

export function unregisterPeer(name, pc) {
  const entry = peers.get(name);
  if (entry && entry.pc === pc) {
    peers.delete(name);
    window.dispatchEvent(new CustomEvent("tb-peers"));
  }
}

/** A candidate object in the wire shape (or null for end-of-candidates). */
export function candidateToWire(c) {
  if (!c) return null;
  return { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex };
}

/** Apply a remote candidate; an empty/null one means end-of-candidates. */
export async function addRemoteCandidate(pc, cand) {
  if (!cand || !cand.candidate) {
    try {
      await pc.addIceCandidate(null);
    } catch {
      // Older Safari rejects null; end-of-candidates is only an optimisation.
    }
    return;
  }
  await pc.addIceCandidate(cand);
}
