// The developer panel: every signaling frame with a timestamp, each peer connection's
// ICE/signaling state and selected candidate pair, live getStats numbers, and the relay switches.

import { peers, rtcSettings } from "./rtc.js";

const MAX_FRAMES = 500;

function fmtTime(ts) {
  const d = new Date(ts);
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

function kbps(bytes, ms) {
  return ms > 0 ? (bytes * 8) / ms : 0; // bits per millisecond = kbit/s
}

/** Summarise one getStats() report against the previous one. */
export function summarise(report, prev, now, prevNow) {
  const out = {
    bytesIn: 0,
    bytesOut: 0,
    framesDecoded: 0,
    packetsLost: 0,
    packetsReceived: 0,
    rtt: null,
    width: 0,
    height: 0,
    pair: null,
  };
  const byId = new Map();
  report.forEach((s) => byId.set(s.id, s));
  let selectedPairId = null;
  report.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) selectedPairId = s.selectedCandidatePairId;
  });
  report.forEach((s) => {
    if (s.type === "inbound-rtp") {
      out.bytesIn += s.bytesReceived || 0;
      out.packetsLost += Math.max(0, s.packetsLost || 0);
      out.packetsReceived += s.packetsReceived || 0;
      if (s.kind === "video") {
        out.framesDecoded += s.framesDecoded || 0;
        if (s.frameWidth) {
          out.width = Math.max(out.width, s.frameWidth);
          out.height = Math.max(out.height, s.frameHeight || 0);
        }
      }
    } else if (s.type === "outbound-rtp") {
      out.bytesOut += s.bytesSent || 0;
    } else if (s.type === "candidate-pair") {
      // Firefox marks the pair itself; Chromium and Safari name it from the transport.
      if (!selectedPairId && (s.selected || (s.nominated && s.state === "succeeded"))) selectedPairId = s.id;
    }
  });
  const pair = selectedPairId && byId.get(selectedPairId);
  if (pair) {
    const local = byId.get(pair.localCandidateId) || {};
    const remote = byId.get(pair.remoteCandidateId) || {};
    out.rtt = pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null;
    out.pair = {
      local: local.candidateType,
      remote: remote.candidateType,
      protocol: local.protocol || local.relayProtocol,
      localAddr: `${local.address || local.ip || "?"}:${local.port || "?"}`,
      remoteAddr: `${remote.address || remote.ip || "?"}:${remote.port || "?"}`,
    };
  }
  const dt = prev ? now - prevNow : 0;
  out.kbpsIn = prev ? kbps(out.bytesIn - prev.bytesIn, dt) : 0;
  out.kbpsOut = prev ? kbps(out.bytesOut - prev.bytesOut, dt) : 0;
  out.fps = prev && dt > 0 ? ((out.framesDecoded - prev.framesDecoded) * 1000) / dt : 0;
  const total = out.packetsLost + out.packetsReceived;
  out.lossPct = total > 0 ? (100 * out.packetsLost) / total : 0;
  return out;
}

export class DevPanel {
  constructor() {
    this.el = {
      panel: document.getElementById("devpanel"),
      toggle: document.getElementById("dev-toggle"),
      close: document.getElementById("dev-close"),
      frames: document.getElementById("dev-frames"),
      filter: document.getElementById("dev-filter"),
      clear: document.getElementById("dev-clear"),
      peers: document.getElementById("dev-peers"),
      relayOnly: document.getElementById("dev-relay-only"),
      viaRelay: document.getElementById("dev-call-via-relay"),
      count: document.getElementById("dev-count"),
    };
    this.frames = [];
    this.prev = new Map(); // peer name -> {summary, now}
    this.latest = new Map(); // peer name -> last summary (read by tests)
    window.tbStats = this.latest;
    this.el.toggle.onclick = () => this.setOpen(this.el.panel.hidden);
    this.el.close.onclick = () => this.setOpen(false);
    this.el.clear.onclick = () => {
      this.frames = [];
      this.el.frames.replaceChildren();
      this._count();
    };
    this.el.filter.oninput = () => this._refilter();
    rtcSettings.load();
    this.el.relayOnly.checked = rtcSettings.relayOnly;
    this.el.viaRelay.checked = rtcSettings.callViaRelay;
    this.el.relayOnly.onchange = () => {
      rtcSettings.relayOnly = this.el.relayOnly.checked;
      rtcSettings.save();
    };
    this.el.viaRelay.onchange = () => {
      rtcSettings.callViaRelay = this.el.viaRelay.checked;
      rtcSettings.save();
    };
    window.addEventListener("tb-peers", () => this._renderPeers());
    this.setOpen(localStorage.getItem("tb.dev") === "1");
    setInterval(() => this._poll(), 1000);
  }

  setOpen(open) {
    this.el.panel.hidden = !open;
    document.body.classList.toggle("dev-open", open);
    this.el.toggle.setAttribute("aria-pressed", String(open));
    localStorage.setItem("tb.dev", open ? "1" : "0");
    if (open) this._renderPeers();
  }

  /** Record one signaling frame ({dir, ts, frame}). */
  addFrame(rec) {
    this.frames.push(rec);
    if (this.frames.length > MAX_FRAMES) {
      this.frames.shift();
      if (this.el.frames.firstChild) this.el.frames.firstChild.remove();
    }
    const row = this._row(rec);
    if (!this._matches(rec)) row.hidden = true;
    const stick = this.el.frames.scrollTop + this.el.frames.clientHeight >= this.el.frames.scrollHeight - 20;
    this.el.frames.append(row);
    if (stick) this.el.frames.scrollTop = this.el.frames.scrollHeight;
    this._count();
  }

  _count() {
    this.el.count.textContent = String(this.frames.length);
  }

  _row(rec) {
    const row = document.createElement("details");
    row.className = `frame ${rec.dir}`;
    const sum = document.createElement("summary");
    const f = rec.frame || {};
    // Tokens never appear in the log: someone may share a screenshot of it.
    const shown = f.type === "auth" ? { ...f, token: "…" } : f;
    const text = JSON.stringify(shown);
    sum.innerHTML = "";
    const t = document.createElement("time");
    t.textContent = fmtTime(rec.ts);
    const d = document.createElement("span");
    d.className = "dir";
    d.textContent = rec.dir === "in" ? "⬇ in" : "⬆ out";
    const ty = document.createElement("b");
    ty.textContent = f.type === "reply" ? `reply ${f.ok ? "ok" : "error"}` : f.type || "?";
    const s = document.createElement("span");
    s.className = "preview";
    s.textContent = text.length > 160 ? `${text.slice(0, 160)}…` : text;
    sum.append(t, d, ty, s);
    const pre = document.createElement("pre");
    row.addEventListener("toggle", () => {
      if (row.open && !pre.textContent) pre.textContent = JSON.stringify(shown, null, 2);
    });
    row.append(sum, pre);
    row._rec = rec;
    return row;
  }

  _matches(rec) {
    const q = this.el.filter.value.trim().toLowerCase();
    if (!q) return true;
    return JSON.stringify(rec.frame).toLowerCase().includes(q);
  }

  _refilter() {
    for (const row of this.el.frames.children) row.hidden = !this._matches(row._rec);
  }

  _renderPeers() {
    const box = this.el.peers;
    const names = new Set(peers.keys());
    for (const card of [...box.children]) if (!names.has(card.dataset.peer)) card.remove();
    if (!peers.size) {
      if (!box.querySelector(".empty")) {
        const p = document.createElement("p");
        p.className = "empty";
        p.textContent = "No peer connection. Start a call to see ICE state and live stats.";
        box.append(p);
      }
      return;
    }
    const empty = box.querySelector(".empty");
    if (empty) empty.remove();
    for (const [name, entry] of peers) {
      let card = box.querySelector(`[data-peer="${CSS.escape(name)}"]`);
      if (!card) {
        card = document.createElement("section");
        card.className = "peer-card";
        card.dataset.peer = name;
        box.append(card);
        const pc = entry.pc;
        const redraw = () => this._renderCard(card, name, entry);
        pc.addEventListener("icegatheringstatechange", redraw);
        pc.addEventListener("iceconnectionstatechange", redraw);
        pc.addEventListener("connectionstatechange", redraw);
        pc.addEventListener("signalingstatechange", redraw);
      }
      this._renderCard(card, name, entry);
    }
  }

  _renderCard(card, name, entry) {
    const pc = entry.pc;
    const s = this.latest.get(name);
    const pair = s && s.pair;
    const rows = [
      ["media path", entry.meta.path || "peer to peer"],
      ["ICE policy", entry.meta.policy || "all"],
      ["signaling", pc.signalingState],
      ["ICE gathering", pc.iceGatheringState],
      ["ICE connection", pc.iceConnectionState],
      ["connection", pc.connectionState || "n/a"],
      ["candidate pair", pair ? `${pair.local} → ${pair.remote} (${pair.protocol || "?"})` : "none yet"],
      ["addresses", pair ? `${pair.localAddr} → ${pair.remoteAddr}` : "—"],
      ["bitrate in / out", s ? `${s.kbpsIn.toFixed(0)} / ${s.kbpsOut.toFixed(0)} kbit/s` : "—"],
      ["RTT", s && s.rtt != null ? `${s.rtt.toFixed(1)} ms` : "—"],
      ["packet loss", s ? `${s.lossPct.toFixed(2)} % (${s.packetsLost})` : "—"],
      ["frames decoded/s", s ? s.fps.toFixed(1) : "—"],
      ["resolution", s && s.width ? `${s.width}×${s.height}` : "—"],
    ];
    const h = document.createElement("h4");
    h.textContent = entry.meta.label || name;
    const dl = document.createElement("dl");
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      dd.dataset.field = k;
      dl.append(dt, dd);
    }
    card.replaceChildren(h, dl);
  }

  async _poll() {
    // Stats are gathered even with the panel closed: the tests and the console read them.
    for (const [name, entry] of peers) {
      let report;
      try {
        report = await entry.pc.getStats();
      } catch {
        continue;
      }
      const now = performance.now();
      const prev = this.prev.get(name);
      const sum = summarise(report, prev && prev.summary, now, prev && prev.now);
      this.prev.set(name, { summary: sum, now });
      this.latest.set(name, sum);
    }
    for (const name of [...this.latest.keys()]) if (!peers.has(name)) {
      this.latest.delete(name);
      this.prev.delete(name);
    }
    if (!this.el.panel.hidden) this._renderPeers();
  }
}
