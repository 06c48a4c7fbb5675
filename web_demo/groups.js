// Groups: create, join by id, and the side panel with members, roles, invites, pending
// requests, mutes, settings, leave and dissolve. Every action's result shows up in the
// timeline as a notice sent by the server, so the panel only re-reads after acting.

function splitUsers(text) {
  return text
    .split(/[\s,;]+/)
    .map((s) => s.replace(/^@/, "").trim())
    .filter(Boolean);
}

/** The group object inside a reply, whichever way the server nests it. */
function groupOf(data) {
  if (data && data.group && typeof data.group === "object") return data.group;
  return data || {};
}

export class Groups {
  /** app: {client, me, toast(), nameOf(), chat, rooms} */
  constructor(app) {
    this.app = app;
    this.info = new Map(); // group id -> group object (name, join_policy, …, my role)
    this.openGroup = null;
    this.el = {
      panel: document.getElementById("group-panel"),
      body: document.getElementById("group-body"),
      close: document.getElementById("group-panel-close"),
      createDlg: document.getElementById("create-group-dialog"),
      createForm: document.getElementById("create-group-form"),
      joinDlg: document.getElementById("join-group-dialog"),
      joinForm: document.getElementById("join-group-form"),
    };
    this.el.close.onclick = () => this.hidePanel();
    document.getElementById("open-create-group").onclick = () => this.el.createDlg.showModal();
    document.getElementById("open-join-group").onclick = () => this.el.joinDlg.showModal();
    this.el.createDlg.addEventListener("close", () => {
      if (this.el.createDlg.returnValue === "ok") this.create();
      this.el.createDlg.returnValue = "";
    });
    this.el.joinDlg.addEventListener("close", () => {
      if (this.el.joinDlg.returnValue === "ok") this.join();
      this.el.joinDlg.returnValue = "";
    });
  }

  name(group) {
    const g = this.info.get(group);
    return (g && g.name) || group;
  }

  myRole(group) {
    const g = this.info.get(group);
    return (g && (g.my_role || g.role)) || null;
  }

  isAdmin(group) {
    const r = this.myRole(group);
    return r === "owner" || r === "admin";
  }

  /** Load the groups this user belongs to (names for the list). */
  async loadAll() {
    try {
      const data = await this.app.client.request("group.list", {});
      for (const g of data.groups || []) {
        const id = g.group || g.id;
        if (!id) continue;
        this.info.set(id, { ...this.info.get(id), ...g, id });
        const c = this.app.chat._conv(`g:${id}`);
        if (g.name) c.name = g.name;
        if (g.room) this.app.rooms.active.set(id, { room: g.room.room || g.room, by: g.room.by });
      }
      this.app.chat.renderList();
    } catch (err) {
      if (err.code !== "unsupported") this.app.toast(`Groups: ${err.message}`, "error");
    }
  }

  async refresh(group) {
    const data = await this.app.client.request("group.info", { group });
    const g = groupOf(data);
    const merged = { ...this.info.get(group), ...g, id: group };
    if (data.my_role || data.role) merged.my_role = data.my_role || data.role;
    if (data.room !== undefined || g.room !== undefined) {
      const room = data.room !== undefined ? data.room : g.room;
      if (room) this.app.rooms.active.set(group, { room: room.room || room, by: room.by });
      else if (!this.app.rooms.room || this.app.rooms.room.group !== group) this.app.rooms.active.delete(group);
    }
    this.info.set(group, merged);
    const c = this.app.chat._conv(`g:${group}`);
    if (merged.name) c.name = merged.name;
    return merged;
  }

  async create() {
    const name = document.getElementById("cg-name").value.trim();
    const members = splitUsers(document.getElementById("cg-members").value);
    const join_policy = document.getElementById("cg-policy").value;
    if (!name) return;
    try {
      const data = await this.app.client.request("group.create", { name, members, join_policy });
      const id = typeof data.group === "object" ? data.group.id || data.group.group : data.group;
      this.info.set(id, { id, name, join_policy, my_role: "owner", owner: this.app.me });
      const conv = data.conv || `g:${id}`;
      const c = this.app.chat._conv(conv);
      c.name = name;
      document.getElementById("cg-name").value = "";
      document.getElementById("cg-members").value = "";
      this.app.toast(`Group “${name}” created (id ${id}).`, "info");
      await this.app.chat.open(conv);
    } catch (err) {
      this.app.toast(`Could not create the group: ${err.message}`, "error");
    }
  }

  async join() {
    const group = document.getElementById("jg-group").value.trim();
    const message = document.getElementById("jg-message").value.trim();
    if (!group) return;
    try {
      const req = { group };
      if (message) req.message = message;
      const data = await this.app.client.request("group.join", req);
      document.getElementById("jg-group").value = "";
      document.getElementById("jg-message").value = "";
      const status = data.status || (data.pending ? "pending" : "joined");
      if (status === "pending" || status === "requested") {
        this.app.toast("Request sent. An admin of the group has to approve it.", "info");
        return;
      }
      this.app.toast("Joined the group.", "info");
      await this.refresh(group).catch(() => {});
      await this.app.chat.open(data.conv || `g:${group}`);
    } catch (err) {
      this.app.toast(`Could not join: ${err.message}`, "error");
    }
  }

  hidePanel() {
    this.el.panel.hidden = true;
    document.body.classList.remove("group-panel-open");
  }

  async showPanel(group) {
    this.openGroup = group;
    this.el.panel.hidden = false;
    document.body.classList.add("group-panel-open");
    await this.renderPanel(group);
  }

  /** Re-read the panel when a notice says the group changed. */
  onNotice(group, body) {
    const ev = body && body.event;
    if (["member_joined", "member_invited", "created"].includes(ev) && (body.users || []).includes(this.app.me)) {
      this.app.chat.setLeft(`g:${group}`, false);
    }
    if (ev === "dissolved" || ((ev === "member_kicked" || ev === "member_left") && (body.users || [body.actor]).includes(this.app.me))) {
      if (ev === "dissolved") this.app.toast(`The group ${this.name(group)} was dissolved.`, "info");
      else if (ev === "member_kicked") this.app.toast(`You were removed from ${this.name(group)}.`, "info");
      this.info.set(group, { ...this.info.get(group), gone: true, my_role: null });
      this.app.chat.setLeft(`g:${group}`, true);
      if (this.openGroup === group) this.renderGone(group);
      return;
    }
    if (this.openGroup === group && !this.el.panel.hidden) this.renderPanel(group);
    else this.refresh(group).then(() => this.app.chat.renderList()).catch(() => {});
  }

  renderGone(group) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "You are no longer a member of this group.";
    this.el.body.replaceChildren(p);
  }

  async renderPanel(group) {
    const body = this.el.body;
    body.replaceChildren(Object.assign(document.createElement("p"), { className: "muted", textContent: "Loading…" }));
    let g;
    let members = [];
    let requests = [];
    try {
      g = await this.refresh(group);
      const m = await this.app.client.request("group.members", { group, limit: 200 });
      members = m.members || [];
      const mine = members.find((x) => (x.user || x) === this.app.me);
      if (mine && mine.role) {
        g.my_role = mine.role;
        this.info.set(group, g);
      }
      if (this.isAdmin(group)) {
        const r = await this.app.client.request("group.requests", { group }).catch(() => ({ requests: [] }));
        requests = r.requests || [];
      }
    } catch (err) {
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = `Could not load the group: ${err.message}`;
      body.replaceChildren(p);
      return;
    }
    if (this.openGroup !== group) return;
    const admin = this.isAdmin(group);
    const owner = this.myRole(group) === "owner";
    const frag = document.createDocumentFragment();

    const head = document.createElement("section");
    head.className = "group-head";
    head.innerHTML = "";
    const h = document.createElement("h4");
    h.textContent = g.name || group;
    const idLine = document.createElement("div");
    idLine.className = "muted small";
    idLine.textContent = `id ${group} · ${g.join_policy || "?"} · you are ${this.myRole(group) || "a member"}`;
    head.append(h, idLine);
    if (g.announcement) {
      const a = document.createElement("p");
      a.className = "announcement";
      a.textContent = `Announcement: ${g.announcement}`;
      head.append(a);
    }
    frag.append(head);

    // Members
    const ms = document.createElement("section");
    ms.append(Object.assign(document.createElement("h5"), { textContent: `Members (${g.member_count || members.length})` }));
    const ul = document.createElement("ul");
    ul.className = "members";
    for (const raw of members) {
      const m = typeof raw === "string" ? { user: raw, role: "member" } : raw;
      const li = document.createElement("li");
      li.dataset.user = m.user;
      const n = document.createElement("span");
      n.className = "member-name";
      n.textContent = this.app.nameOf(m.user) + (m.user === this.app.me ? " (you)" : "");
      const role = document.createElement("span");
      role.className = `role ${m.role}`;
      role.textContent = m.role || "member";
      li.append(n, role);
      if (m.muted_until && m.muted_until > Date.now()) {
        li.append(Object.assign(document.createElement("span"), { className: "muted-flag", textContent: "muted", title: `muted until ${new Date(m.muted_until).toLocaleString()}` }));
      }
      if (admin && m.user !== this.app.me && m.role !== "owner") {
        const actions = document.createElement("span");
        actions.className = "member-actions";
        if (owner) {
          actions.append(this._btn(m.role === "admin" ? "Make member" : "Make admin", () =>
            this._act("group.set_role", { group, user: m.user, role: m.role === "admin" ? "member" : "admin" })));
          actions.append(this._btn("Make owner", () => {
            if (confirm(`Transfer ownership of ${g.name || group} to ${m.user}?`)) this._act("group.transfer", { group, user: m.user });
          }));
        }
        const muted = m.muted_until && m.muted_until > Date.now();
        actions.append(this._btn(muted ? "Unmute" : "Mute 10 min", () =>
          this._act("group.mute", { group, user: m.user, until_ts: muted ? 0 : Date.now() + 600000 })));
        actions.append(this._btn("Kick", () => {
          if (confirm(`Remove ${m.user} from the group?`)) this._act("group.kick", { group, user: m.user });
        }, "danger"));
        li.append(actions);
      }
      ul.append(li);
    }
    ms.append(ul);
    frag.append(ms);

    // Pending join requests
    if (admin) {
      const rs = document.createElement("section");
      rs.className = "requests";
      rs.append(Object.assign(document.createElement("h5"), { textContent: `Join requests (${requests.length})` }));
      if (!requests.length) rs.append(Object.assign(document.createElement("p"), { className: "muted small", textContent: "None pending." }));
      for (const raw of requests) {
        const r = typeof raw === "string" ? { user: raw } : raw;
        const row = document.createElement("div");
        row.className = "request";
        row.dataset.user = r.user;
        row.append(Object.assign(document.createElement("span"), { textContent: `${this.app.nameOf(r.user)}${r.message ? `: “${r.message}”` : ""}` }));
        row.append(this._btn("Approve", () => this._act("group.approve", { group, user: r.user }), "ok"));
        row.append(this._btn("Reject", () => this._act("group.reject", { group, user: r.user }), "danger"));
        rs.append(row);
      }
      frag.append(rs);
    }

    // Invite
    if (admin || g.join_policy !== "invite_only") {
      const inv = document.createElement("form");
      inv.className = "inline-form";
      const input = Object.assign(document.createElement("input"), { placeholder: "Invite user ids (comma separated)", name: "invite" });
      input.setAttribute("aria-label", "Users to invite");
      inv.append(input, Object.assign(document.createElement("button"), { type: "submit", textContent: "Invite" }));
      inv.onsubmit = (e) => {
        e.preventDefault();
        const users = splitUsers(input.value);
        if (users.length) this._act("group.invite", { group, users });
      };
      frag.append(inv);
    }

    // Settings
    if (admin) {
      const st = document.createElement("form");
      st.className = "settings";
      st.append(Object.assign(document.createElement("h5"), { textContent: "Settings" }));
      const name = Object.assign(document.createElement("input"), { value: g.name || "", name: "name" });
      const ann = Object.assign(document.createElement("input"), { value: g.announcement || "", name: "announcement", placeholder: "Announcement" });
      const pol = document.createElement("select");
      for (const v of ["open", "approval", "invite_only"]) pol.append(new Option(v, v, false, g.join_policy === v));
      const lab = (t, el) => {
        const l = document.createElement("label");
        l.append(document.createTextNode(t), el);
        return l;
      };
      st.append(lab("Name", name), lab("Announcement", ann), lab("Who may join", pol));
      st.append(Object.assign(document.createElement("button"), { type: "submit", textContent: "Save" }));
      st.onsubmit = (e) => {
        e.preventDefault();
        const req = { group };
        if (name.value.trim() && name.value.trim() !== g.name) req.name = name.value.trim();
        if (ann.value !== (g.announcement || "")) req.announcement = ann.value;
        if (pol.value !== g.join_policy) req.join_policy = pol.value;
        if (Object.keys(req).length > 1) this._act("group.update", req);
      };
      const allMuted = !!(g.mute_all || g.muted_all);
      st.append(this._btn(allMuted ? "Let everyone talk" : "Mute everyone (admins can talk)", () => this._act("group.mute_all", { group, on: !allMuted })));
      frag.append(st);
    }

    // Leave / dissolve
    const danger = document.createElement("section");
    danger.className = "danger-zone";
    if (!owner) {
      danger.append(this._btn("Leave group", () => {
        if (confirm("Leave this group?")) this._act("group.leave", { group }, () => this.app.chat.drop(`g:${group}`));
      }, "danger"));
    } else {
      danger.append(Object.assign(document.createElement("p"), { className: "muted small", textContent: "The owner hands ownership to someone else before leaving." }));
    }
    if (owner) {
      danger.append(this._btn("Dissolve group", () => {
        if (confirm("Dissolve this group for everyone?")) this._act("group.dissolve", { group });
      }, "danger"));
    }
    frag.append(danger);
    body.replaceChildren(frag);
  }

  _btn(text, onclick, cls = "secondary") {
    const b = document.createElement("button");
    b.type = "button";
    b.className = `${cls} small`;
    b.textContent = text;
    b.onclick = onclick;
    return b;
  }

  async _act(type, req, after) {
    try {
      await this.app.client.request(type, req);
      if (after) after();
      else if (this.openGroup === req.group) await this.renderPanel(req.group);
    } catch (err) {
      this.app.toast(`${err.message}`, "error");
    }
  }
}
