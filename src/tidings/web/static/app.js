// The Tidings web app: plain ES modules on top of the JavaScript SDK, no build step.
// Each browser tab is its own device: its device id and token live in sessionStorage.
import { TidingsClient, RequestError, login, logout, register, wsUrl, newCid } from "/sdk/tidings.js";
import { RoomView } from "/app/room.js";

const $ = (id) => document.getElementById(id);
const KEY = "tidings.session"; // {token, user, device}
const OPEN = "tidings.open"; // the conversation open in this tab
const OUTBOX = "tidings.outbox"; // sends not yet stored when the tab was reloaded
const PAGE = 30;
const TYPING_SHOW_MS = 5000;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function deviceId() {
  let session = null;
  try {
    session = JSON.parse(sessionStorage.getItem(KEY) || "null");
  } catch {
    session = null;
  }
  if (session && session.device) return session.device;
  return `web-${newCid().slice(0, 12)}`;
}

function timeOf(ts) {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function describeError(e) {
  if (e instanceof RequestError) {
    const map = {
      not_found: "No such user or conversation.",
      auth_failed: "Wrong user name or password.",
      conflict: "That was already used for something else.",
      forbidden: "You are not allowed to do that.",
      muted: "You are muted in this group.",
      blocked: "This user does not accept your messages.",
      too_large: "Too long.",
      group_full: "The group is full.",
    };
    return map[e.code] || e.message;
  }
  return e && e.message ? e.message : String(e);
}

// ---------------------------------------------------------------------- sign in / up

let mode = "signin";

function showAuth(message = "") {
  $("main").hidden = true;
  $("auth").hidden = false;
  $("auth-form").reset(); // nothing of the last user stays filled in
  setMode("signin");
  $("auth-error").textContent = message;
  $("auth-user").focus();
}

function setMode(m) {
  mode = m;
  $("tab-signin").classList.toggle("active", m === "signin");
  $("tab-signup").classList.toggle("active", m === "signup");
  $("auth-name-row").hidden = m !== "signup";
  $("auth-submit").textContent = m === "signup" ? "Create account" : "Sign in";
  $("auth-password").autocomplete = m === "signup" ? "new-password" : "current-password";
}

$("tab-signin").addEventListener("click", () => setMode("signin"));
$("tab-signup").addEventListener("click", () => setMode("signup"));
$("auth-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $("auth-user").value.trim();
  const password = $("auth-password").value;
  const device = deviceId();
  $("auth-error").textContent = "";
  $("auth-submit").disabled = true;
  try {
    const t =
      mode === "signup"
        ? await register("", { user, password, device, name: $("auth-name").value.trim() || undefined })
        : await login("", { user, password, device });
    sessionStorage.setItem(KEY, JSON.stringify({ token: t.token, user: t.user, device: t.device }));
    start(t.token);
  } catch (e) {
    const taken = e instanceof RequestError && e.code === "conflict";
    $("auth-error").textContent = taken ? "That name is taken." : describeError(e);
  } finally {
    $("auth-submit").disabled = false;
  }
});

// ---------------------------------------------------------------------- the app

class App {
  constructor(token) {
    this.token = token;
    this.client = new TidingsClient(wsUrl(), token, { tail: 50 });
    this.open = null; // {kind: "conv", conv} | {kind: "draft", to} | {kind: "room", room}
    this.presence = new Map(); // user -> {online, last_seen}
    this.typing = new Map(); // conv -> {user, until}
    this.floor = new Map(); // conv -> the oldest seq history has (nothing older exists)
    this.loading = new Set(); // conversations with a history page on its way
    this.reading = null; // the read position last asked for
    this.editing = null; // seq being edited
    this.receipts = new Map(); // `${conv}:${seq}` -> count (groups)
    this.groupInfo = new Map(); // conv -> info (asked once per group)
    this.wasDown = false;
    this.lastTyping = 0;
    this.renderQueued = false;
    this.room = new RoomView(this.client);
    this.unlisten = []; // removes the window/document listeners on sign-out
    this.destroyed = false;
    this.bind();
  }

  get c() {
    return this.client;
  }

  async start() {
    $("auth").hidden = true;
    $("main").hidden = false;
    const c = this.c;
    c.addEventListener("connected", () => this.onConnected());
    c.addEventListener("disconnected", (ev) => this.onDisconnected(ev.detail));
    c.addEventListener("change", () => this.queueRender());
    c.addEventListener("message", (ev) => this.onMessage(ev.detail));
    c.addEventListener("typing", (ev) => this.onTyping(ev.detail));
    c.addEventListener("presence", (ev) => {
      for (const p of ev.detail.users) this.presence.set(p.user, p);
    });
    c.addEventListener("left", (ev) => {
      if (this.open && this.open.conv === ev.detail.conv) this.close();
    });
    c.addEventListener("kicked", () => this.signOut("This account signed in elsewhere."));
    c.addEventListener("room", (ev) => this.room.onFrame(ev.detail));
    // Sends that were still on their way when this tab was last closed or reloaded go
    // out again with their own client ids (the server stores each once).
    let kept = [];
    try {
      kept = JSON.parse(sessionStorage.getItem(OUTBOX) || "[]");
    } catch {
      kept = [];
    }
    sessionStorage.removeItem(OUTBOX);
    for (const p of kept) {
      c.send({ ...p }).catch((e) => ($("chat-error").textContent = describeError(e)));
    }
    this.listen(window, "pagehide", () => {
      const pending = this.c.pendingSends();
      if (pending.length) sessionStorage.setItem(OUTBOX, JSON.stringify(pending));
    });
    this.render();
    try {
      await c.connect();
    } catch (e) {
      return; // a final refusal: onDisconnected signs out
    }
    const last = sessionStorage.getItem(OPEN);
    if (last && !this.open) this.openConv(last);
  }

  bind() {
    $("sign-out").onclick = () => this.signOut("");
    $("new-chat").onsubmit = (ev) => {
      ev.preventDefault();
      const name = $("new-chat-user").value.trim();
      if (name) this.startChat(name);
      $("new-chat-user").value = "";
    };
    $("join-room").onsubmit = (ev) => {
      ev.preventDefault();
      const id = $("join-room-id").value.trim();
      if (id) this.openRoom(id);
    };
    $("new-group").onclick = () => {
      $("group-form").hidden = false;
      $("group-name").focus();
    };
    $("group-cancel").onclick = () => ($("group-form").hidden = true);
    $("group-form").onsubmit = (ev) => {
      ev.preventDefault();
      this.createGroup();
    };
    $("add-member").onsubmit = (ev) => {
      ev.preventDefault();
      this.addMember();
    };
    $("composer").onsubmit = (ev) => {
      ev.preventDefault();
      this.submit();
    };
    $("text").oninput = () => this.onInput();
    $("edit-cancel").onclick = () => this.stopEditing();
    $("back").onclick = () => this.close();
    $("room-back").onclick = () => this.close();
    $("room-leave").onclick = () => this.leaveRoom();
    $("messages").onscroll = () => this.maybeLoadOlder();
    this.listen(window, "focus", () => this.markRead());
    this.listen(document, "visibilitychange", () => this.markRead());
    this.ticker = setInterval(() => this.tick(), 1000);
  }

  listen(target, type, fn) {
    target.addEventListener(type, fn);
    this.unlisten.push(() => target.removeEventListener(type, fn));
  }

  /** Signed out: stop everything this app started and leave no trace of it on screen. */
  destroy() {
    this.destroyed = true;
    clearInterval(this.ticker);
    for (const off of this.unlisten.splice(0)) off();
    this.room.stop();
    this.c.close();
    document.body.classList.remove("show-chat");
    $("banner").hidden = true;
    for (const id of ["me-name", "chat-error", "side-error", "history-status"]) $(id).textContent = "";
    $("conv-list").replaceChildren();
    $("message-list").replaceChildren();
    $("chat").hidden = $("room").hidden = true;
    $("group-form").hidden = true;
  }

  // ------------------------------------------------------------------ connection

  onConnected() {
    $("conn-dot").className = "dot up";
    if (this.wasDown) {
      this.banner("Connected again.", "up");
      setTimeout(() => {
        if (this.c.ready) $("banner").hidden = true;
      }, 3000);
    } else {
      $("banner").hidden = true;
    }
    this.wasDown = false;
    $("me-name").textContent = this.c.user;
    this.refreshPresence();
    if (this.open && this.open.kind === "conv") this.loadOpenConv();
  }

  onDisconnected(d) {
    if (this.destroyed) return;
    $("conn-dot").className = "dot down";
    if (d.final) {
      if (d.code === 4004) return; // kicked: handled by the kicked event
      const why = d.reason === "token_expired" ? "Your session expired." : "Please sign in again.";
      this.signOut(why);
      return;
    }
    this.wasDown = true;
    this.banner("Connection lost. Reconnecting…", "down");
  }

  banner(text, cls) {
    const b = $("banner");
    b.textContent = text;
    b.className = `banner ${cls}`;
    b.hidden = false;
  }

  signOut(message) {
    if (this.destroyed) return;
    const token = this.token;
    this.destroy();
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(OPEN);
    logout("", token).catch(() => {});
    app = null;
    showAuth(message);
  }

  // ------------------------------------------------------------------ events

  onMessage({ message: m }) {
    const v = this.c.state.convs.get(m.conv);
    if (v && v.peer && !this.presence.has(v.peer)) {
      this.presence.set(v.peer, { user: v.peer, online: false }); // asked once
      clearTimeout(this.presenceTimer); // one request for a whole sync's new peers
      this.presenceTimer = setTimeout(() => this.refreshPresence(), 300);
    }
    const t = this.typing.get(m.conv);
    if (t && t.user === m.from) this.typing.delete(m.conv);
    if (m.type === "group" && this.groupInfo.has(m.conv)) this.groupInfo.delete(m.conv);
  }

  onTyping({ conv, user }) {
    this.typing.set(conv, { user, until: Date.now() + TYPING_SHOW_MS });
    this.queueRender();
  }

  tick() {
    const now = Date.now();
    for (const [conv, t] of this.typing) {
      if (t.until < now) {
        this.typing.delete(conv);
        this.queueRender();
      }
    }
    if (this.open && this.open.kind === "conv" && this.open.conv.startsWith("g:")) {
      this.refreshReceipts();
    }
  }

  async refreshPresence() {
    const peers = [...new Set([...this.c.state.convs.values()].map((v) => v.peer).filter(Boolean))];
    if (!peers.length || !this.c.ready) return;
    try {
      for (let i = 0; i < peers.length; i += 100) {
        for (const p of await this.c.presence(peers.slice(i, i + 100))) this.presence.set(p.user, p);
      }
      this.queueRender();
    } catch {
      /* offline: presence comes with the next connect */
    }
  }

  // ------------------------------------------------------------------ navigation

  openConv(conv) {
    this.room.stop();
    this.open = { kind: "conv", conv };
    sessionStorage.setItem(OPEN, conv);
    this.stopEditing();
    $("chat-error").textContent = "";
    document.body.classList.add("show-chat");
    this.loadOpenConv();
    this.render();
    $("messages").scrollTop = $("messages").scrollHeight;
    $("text").focus();
  }

  async loadOpenConv() {
    const conv = this.open.conv;
    const v = this.c.state.convs.get(conv);
    if (conv.startsWith("g:")) this.fetchGroupInfo(conv, true);
    // Fill the screen from history when little is shown (e.g. after a reload with `tail`).
    if (!v || this.shown(conv).length < PAGE) await this.loadOlder(conv);
    this.markRead();
  }

  startChat(name) {
    const lower = name.toLowerCase();
    for (const v of this.c.state.convs.values()) {
      if (v.peer === lower || v.peer === name) return this.openConv(v.conv);
    }
    this.room.stop();
    this.open = { kind: "draft", to: name };
    sessionStorage.removeItem(OPEN);
    document.body.classList.add("show-chat");
    this.render();
    $("text").focus();
  }

  close() {
    this.room.stop();
    this.open = null;
    sessionStorage.removeItem(OPEN);
    document.body.classList.remove("show-chat");
    this.render();
  }

  async openRoom(id) {
    $("side-error").textContent = "";
    this.open = { kind: "room", room: id };
    document.body.classList.add("show-chat");
    this.render();
    try {
      await this.room.enter(id);
      $("join-room-id").value = "";
    } catch (e) {
      $("side-error").textContent = describeError(e);
      this.close();
    }
  }

  leaveRoom() {
    this.close(); // stops the room view, which leaves the room
  }

  async createGroup() {
    const name = $("group-name").value.trim();
    const users = $("group-members")
      .value.split(/[\s,]+/)
      .map((u) => u.trim())
      .filter(Boolean);
    $("side-error").textContent = "";
    try {
      const done = await this.c.createGroup(users, name);
      $("group-form").hidden = true;
      $("group-name").value = "";
      $("group-members").value = "";
      this.groupInfo.set(done.conv, done.info);
      this.openConv(done.conv);
    } catch (e) {
      $("side-error").textContent = describeError(e);
    }
  }

  async addMember() {
    const user = $("add-member-user").value.trim();
    if (!user || !this.open) return;
    try {
      await this.c.addMembers(this.open.conv, [user]);
      $("add-member-user").value = "";
      this.fetchGroupInfo(this.open.conv, true);
    } catch (e) {
      $("chat-error").textContent = describeError(e);
    }
  }

  async fetchGroupInfo(conv, force = false) {
    if (!force && this.groupInfo.has(conv)) return;
    this.groupInfo.set(conv, this.groupInfo.get(conv) || null);
    if (!this.c.ready) return;
    try {
      const done = await this.c.groupInfo(conv);
      this.groupInfo.set(conv, done.info);
      this.queueRender();
    } catch {
      /* not a member any more, or offline */
    }
  }

  // ------------------------------------------------------------------ history and reads

  maybeLoadOlder() {
    if ($("messages").scrollTop < 40 && this.open && this.open.kind === "conv") {
      this.loadOlder(this.open.conv);
    }
  }

  /** The entries on screen: the newest run of consecutive seqs. A sync with `tail` can
   * leave a hole between older entries held and the newest ones; it is filled by paging
   * back from the run's first entry, as the user scrolls up. */
  shown(conv) {
    const entries = this.c.state.entries(conv);
    let i = entries.length - 1;
    while (i > 0 && entries[i - 1].seq === entries[i].seq - 1) i--;
    return i > 0 ? entries.slice(i) : entries;
  }

  async loadOlder(conv) {
    if (this.loading.has(conv) || !this.c.ready) return;
    const run = this.shown(conv);
    const before = run.length ? run[0].seq : 0;
    if (run.length && before <= (this.floor.get(conv) || 1)) return; // all of it is shown
    this.loading.add(conv);
    const mine = () => this.open && this.open.conv === conv;
    if (mine()) $("history-status").textContent = "Loading…";
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    try {
      const page = await this.c.history(conv, before, PAGE);
      if (!page.more) this.floor.set(conv, page.msgs.length ? page.msgs[0].seq : before);
      if (mine()) {
        this.render();
        box.scrollTop = box.scrollHeight - fromBottom; // keep the view where it was
      }
    } catch {
      /* offline: try again on the next scroll */
    } finally {
      this.loading.delete(conv);
      if (mine()) {
        const first = this.shown(conv)[0];
        const all = !first || first.seq <= (this.floor.get(conv) || 1);
        $("history-status").textContent = all ? "Start of the conversation" : "";
      }
    }
  }

  markRead() {
    if (!this.open || this.open.kind !== "conv" || document.visibilityState !== "visible") return;
    const v = this.c.state.convs.get(this.open.conv);
    const held = this.c.held.get(this.open.conv) || 0;
    const key = `${v ? v.conv : ""}:${held}`;
    if (v && this.c.ready && held > v.readSeq && v.unread > 0 && this.reading !== key) {
      this.reading = key; // one request per position, however often this renders
      this.c.markRead(v.conv, held).catch(() => {
        this.reading = null;
      });
    }
  }

  async refreshReceipts() {
    const conv = this.open.conv;
    if (!this.c.ready) return;
    const mine = this.c.state
      .entries(conv)
      .filter((m) => m.from === this.c.user && !["group", "recall", "edit"].includes(m.type))
      .slice(-20);
    if (!mine.length) return;
    try {
      const items = await this.c.receipts(conv, mine.map((m) => m.seq));
      let changed = false;
      for (const r of items) {
        const key = `${conv}:${r.seq}`;
        if (this.receipts.get(key) !== r.count) {
          this.receipts.set(key, r.count);
          changed = true;
        }
      }
      if (changed) this.queueRender();
    } catch {
      /* offline or no longer a member */
    }
  }

  // ------------------------------------------------------------------ composing

  onInput() {
    const now = Date.now();
    if (this.open && this.open.kind === "conv" && now - this.lastTyping > 2000) {
      this.lastTyping = now;
      this.c.typing(this.open.conv);
    }
  }

  startEditing(m) {
    this.editing = m.seq;
    $("editing").hidden = false;
    $("text").value = m.body.text || "";
    $("text").focus();
  }

  stopEditing() {
    this.editing = null;
    $("editing").hidden = true;
  }

  async submit() {
    const text = $("text").value.trim();
    if (!text || !this.open) return;
    $("chat-error").textContent = "";
    $("text").value = "";
    const open = this.open;
    let p;
    if (open.kind === "draft") {
      p = this.c.send({ to: open.to, text });
    } else if (this.editing !== null) {
      p = this.c.edit(open.conv, this.editing, text);
      this.stopEditing();
    } else {
      p = this.c.send({ conv: open.conv, text });
    }
    this.render(); // the pending bubble
    try {
      const sent = await p;
      if (open.kind === "draft" && this.open === open) this.openConv(sent.conv);
    } catch (e) {
      $("chat-error").textContent = describeError(e);
      this.render();
    }
  }

  async recall(m) {
    try {
      await this.c.recall(m.conv, m.seq);
    } catch (e) {
      $("chat-error").textContent = describeError(e);
    }
  }

  // ------------------------------------------------------------------ rendering

  queueRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      this.render();
      this.markRead();
    });
  }

  title(v) {
    if (v.conv.startsWith("g:")) {
      const info = this.groupInfo.get(v.conv);
      if (!v.title && !info) this.fetchGroupInfo(v.conv);
      return (info && info.name) || v.title || v.conv.slice(2);
    }
    return v.peer || v.conv;
  }

  render() {
    this.renderList();
    const open = this.open;
    $("chat").hidden = !open || open.kind === "room";
    $("room").hidden = !open || open.kind !== "room";
    $("placeholder").hidden = Boolean(open);
    if (open && open.kind !== "room") this.renderChat();
  }

  renderList() {
    const list = $("conv-list");
    const views = this.c.state.conversationList();
    $("empty-list").hidden = views.length > 0;
    list.replaceChildren(
      ...views.map((v) => {
        const li = el("li", "conv");
        li.dataset.conv = v.conv;
        if (this.open && this.open.conv === v.conv) li.classList.add("active");
        const top = el("div", "conv-top");
        const name = el("span", "conv-title", this.title(v));
        if (v.peer) {
          const p = this.presence.get(v.peer);
          name.prepend(el("span", `dot ${p && p.online ? "up" : "off"}`));
        }
        top.append(name);
        if (v.unread > 0) top.append(el("span", "badge", String(v.unread)));
        const t = this.typing.get(v.conv);
        const preview = t ? `${t.user} is typing…` : this.preview(this.lastShown(v));
        li.append(top, el("div", "conv-last", preview));
        li.onclick = () => this.openConv(v.conv);
        return li;
      }),
    );
    const badge = this.c.state.badge;
    document.title = badge ? `(${badge}) Tidings` : "Tidings";
  }

  /** The newest entry worth showing in the list: a recall or edit changes an older
   * entry, which is what the list shows (as it now reads). */
  lastShown(v) {
    if (!v.last || (v.last.type !== "recall" && v.last.type !== "edit")) return v.last;
    const held = this.c.state.messages.get(v.conv);
    if (held) {
      for (let seq = v.last.seq - 1; seq > 0 && held.has(seq); seq--) {
        const m = held.get(seq);
        if (m.type !== "recall" && m.type !== "edit") return m;
      }
    }
    return v.last;
  }

  preview(m) {
    if (!m) return "";
    if (m.deleted) return "(deleted)";
    if (m.recalled) return "(message recalled)";
    if (m.type === "group") return this.eventText(m);
    if (m.type === "recall") return `${m.from} recalled a message`;
    if (m.type === "edit") return `${m.from} edited a message`;
    const text = m.body.text ?? `[${m.type}]`;
    return m.conv.startsWith("g:") ? `${m.from}: ${text}` : text;
  }

  eventText(m) {
    const b = m.body || {};
    const users = (b.users || []).join(", ");
    switch (b.op) {
      case "create":
        return `${m.from} created the group ${b.name || ""}`.trim();
      case "add":
        return `${m.from} added ${users}`;
      case "remove":
        return `${m.from} removed ${users}`;
      case "leave":
        return `${m.from} left`;
      case "role":
        return `${m.from} made ${users} ${b.role}`;
      case "transfer":
        return `${m.from} handed the group to ${users}`;
      case "mute":
        return b.until ? `${m.from} muted ${users}` : `${m.from} unmuted ${users}`;
      case "mute_all":
        return b.on ? `${m.from} muted everyone` : `${m.from} unmuted everyone`;
      default:
        return `${m.from} changed the group`;
    }
  }

  renderChat() {
    const open = this.open;
    const isDraft = open.kind === "draft";
    const conv = isDraft ? null : open.conv;
    const v = conv ? this.c.state.convs.get(conv) : null;
    const isGroup = Boolean(conv && conv.startsWith("g:"));
    $("chat-title").textContent = isDraft ? open.to : v ? this.title(v) : conv;
    $("add-member").hidden = !isGroup;
    $("chat-sub").textContent = this.subtitle(open, v, isGroup);
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
    const items = [];
    if (!isDraft) {
      for (const m of this.shown(conv)) {
        if (m.type === "recall" || m.type === "edit") continue; // applied to their target
        items.push(this.renderMessage(m, v, isGroup));
      }
    }
    for (const p of this.c.pendingSends()) {
      const here = isDraft ? p.to === open.to && !p.conv : p.conv === conv && p.type !== "edit";
      if (here && p.type !== "recall") items.push(this.renderPending(p));
    }
    $("message-list").replaceChildren(...items);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  subtitle(open, v, isGroup) {
    if (open.kind === "draft") return "new chat";
    const t = this.typing.get(open.conv);
    if (t) return `${t.user} is typing…`;
    if (isGroup) {
      const info = this.groupInfo.get(open.conv);
      const n = (info && info.member_count) || (v && v.size) || 0;
      return n ? `${n} members` : "group";
    }
    if (v && v.peer) {
      const p = this.presence.get(v.peer);
      if (p && p.online) return "online";
      if (p && p.last_seen) return `last seen ${timeOf(p.last_seen)}`;
    }
    return "";
  }

  renderMessage(m, v, isGroup) {
    if (m.type === "group") {
      const li = el("li", "event", this.eventText(m));
      li.dataset.seq = String(m.seq);
      return li;
    }
    const mine = m.from === this.c.user;
    const li = el("li", `msg ${mine ? "mine" : "theirs"}`);
    li.dataset.seq = String(m.seq);
    if (isGroup && !mine) li.append(el("div", "from", m.from));
    let text;
    if (m.deleted) text = "(deleted)";
    else if (m.recalled) text = "(message recalled)";
    else text = m.body.text ?? `[${m.type}]`;
    const body = el("div", "body", text);
    if (m.recalled || m.deleted) body.classList.add("gone");
    li.append(body);
    const meta = el("div", "meta");
    if (m.edit_version && !m.recalled && !m.deleted) meta.append(el("span", "edited", "edited"));
    meta.append(el("span", "time", timeOf(m.ts)));
    if (mine) {
      if (isGroup) {
        const n = this.receipts.get(`${m.conv}:${m.seq}`) || 0;
        meta.append(el("span", "readby", `read by ${n}`));
      } else {
        meta.append(this.ticks(m, v));
      }
    }
    li.append(meta);
    if (mine && !m.recalled && !m.deleted && m.dev !== "server") {
      const actions = el("div", "actions");
      const edit = el("button", "link edit", "Edit");
      edit.type = "button";
      edit.onclick = () => this.startEditing(m);
      const recall = el("button", "link recall", "Recall");
      recall.type = "button";
      recall.onclick = () => this.recall(m);
      actions.append(edit, recall);
      li.append(actions);
    }
    return li;
  }

  ticks(m, v) {
    let state = "sent";
    let mark = "✓";
    if (v && m.seq <= v.peerReadSeq) {
      state = "read";
      mark = "✓✓";
    } else if (v && m.seq <= v.peerDeliveredSeq) {
      state = "delivered";
      mark = "✓✓";
    }
    const s = el("span", `ticks ${state}`, mark);
    s.dataset.state = state;
    s.title = state;
    return s;
  }

  renderPending(p) {
    const li = el("li", "msg mine pending");
    li.dataset.cid = p.cid;
    li.append(el("div", "body", p.body.text ?? `[${p.type}]`));
    const meta = el("div", "meta");
    const s = el("span", "ticks pending", "…");
    s.dataset.state = "pending";
    s.title = "sending";
    meta.append(s);
    li.append(meta);
    return li;
  }
}

let app = null;

function start(token) {
  app = new App(token);
  app.start();
  globalThis.tidingsApp = app; // for debugging in the console (and the end-to-end tests)
}

setMode("signin");
let saved = null;
try {
  saved = JSON.parse(sessionStorage.getItem(KEY) || "null");
} catch {
  saved = null;
}
if (saved && saved.token) start(saved.token);
else showAuth();
