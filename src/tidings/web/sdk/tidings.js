// Tidings JavaScript SDK: protocol v1 over WebSocket (JSON codec), as an ES module.
//
// The same behaviour as the Python SDK (src/tidings/client/sdk.py): one connection kept
// up with jittered exponential backoff, authentication with the device token, sends kept
// in an outbox and resent with the same client id until the server has stored them,
// per-conversation seq tracking with out-of-order pushes buffered for a short grace
// period and a sync when a gap persists, cumulative acks, and a local replica of the
// user's conversations (unread counts, read and delivered positions, settings, entries).
//
//   import { TidingsClient, login } from "/sdk/tidings.js";
//   const t = await login("", { user: "alice", password: "…", device: "tab-1" });
//   const c = new TidingsClient(wsUrl(), t.token, { tail: 50 });
//   c.addEventListener("message", (ev) => console.log(ev.detail.message));
//   await c.connect();
//   await c.send({ to: "bob", text: "hi" });
//
// docs/sdk-js.md documents every method and event.

export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL = "tidings.v1.json";
// Close codes after which reconnecting with the same token cannot help (protocol §13).
const FINAL_CODES = new Set([4002, 4003, 4004, 4010]);
const AMEND_TYPES = new Set(["recall", "edit"]);
const SERVER_DEVICE = "server";
const GROUP_EVENT = "group";
const encoder = new TextEncoder();

/** The server refused a request; `code` is from the protocol's error table. */
export class RequestError extends Error {
  constructor(err) {
    super(`${err.code}: ${err.message}`);
    this.name = "RequestError";
    this.code = err.code;
    this.retryable = Boolean(err.retryable);
    this.retryAfterMs = err.retry_after_ms ?? null;
  }
}

/** No connection to send a request on, or it broke before the answer came. */
export class ConnectionError extends Error {
  constructor(message) {
    super(message);
    this.name = "ConnectionError";
  }
}

/** A fresh client message id: 32 random hex digits (also outside secure contexts). */
export function newCid() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** 64-bit ids travel as decimal strings; compare them as big integers. */
function big(id) {
  try {
    return BigInt(id || "0");
  } catch {
    return 0n;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The WebSocket URL of the server that served this page (or of `base`). */
export function wsUrl(base) {
  const u = new URL(base || globalThis.location.href);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  u.pathname = "/v1/ws";
  u.search = "";
  u.hash = "";
  return u.toString();
}

async function authCall(base, path, body) {
  const res = await fetch(new URL(path, base || globalThis.location.href), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const out = await res.json().catch(() => ({}));
  if (!res.ok) {
    throw new RequestError(out.error || { code: "internal", message: `HTTP ${res.status}` });
  }
  return out; // {token, user, device, platform, expires_ms}
}

/** Self-registration (standalone mode): a new user and a token for this device. */
export function register(base, { user, password, device, platform = "web", name }) {
  return authCall(base, "/v1/auth/register", { user, password, device, platform, name });
}

/** Password login: a token for this device. */
export function login(base, { user, password, device, platform = "web" }) {
  return authCall(base, "/v1/auth/login", { user, password, device, platform });
}

/** Revoke the token (its device is signed out). */
export async function logout(base, token) {
  await fetch(new URL("/v1/auth/logout", base || globalThis.location.href), {
    method: "POST",
    headers: { Authorization: `Bearer ${token}` },
  });
}

// ---------------------------------------------------------------------- local state
// A port of src/tidings/client/state.py: every rule is order-insensitive (running totals,
// positions that only move forward, idempotent deletions and recalls, edits carrying their
// version, settings carrying their change-log version), so a device converges whatever
// order pushes, sync answers and events reach it in.

/** Is `m` the entry by which `user` was removed from, or left, its group? */
export function endsMembership(m, user) {
  if (m.type !== GROUP_EVENT || m.deleted) return false;
  const op = m.body && m.body.op;
  if (op === "leave") return m.from === user;
  return op === "remove" && Array.isArray(m.body.users) && m.body.users.includes(user);
}

/** The seq a recall or edit entry changes (null for other entries). */
export function amendTarget(m) {
  if (!AMEND_TYPES.has(m.type)) return null;
  const seq = m.body && m.body.seq;
  return Number.isInteger(seq) ? seq : null;
}

/** The other member of a 1:1 conversation ("d:" + lo + "|" + hi of canonical ids). */
export function peerOf(conv, user) {
  if (!conv.startsWith("d:") || !user) return null;
  const [lo, hi] = conv.slice(2).split("|");
  if (lo === hi) return null; // notes to self: no peer, as the server's states say
  return lo === user ? hi : hi === user ? lo : null;
}

function tombstone(m) {
  return { ...m, body: {}, deleted: true, edit_version: 0, recalled: false };
}

/** One conversation as this user sees it. */
export class ConversationView {
  constructor(conv) {
    this.conv = conv;
    this.peer = null; // the other user of a 1:1 conversation
    this.title = ""; // a group's name
    this.size = 0; // a group's member count
    this.lastSeq = 0;
    this.last = null;
    this.total = 0; // counted entries up to lastSeq
    this.readSeq = 0;
    this.readN = 0; // counted entries up to readSeq
    this.peerReadSeq = 0;
    this.peerDeliveredSeq = 0;
    this.muted = false;
    this.pinned = false;
    this.draft = "";
    this.hiddenAt = -1; // hidden while no entry is newer than this seq
    this.settingsV = 0;
    this.deleted = new Set();
  }
  get unread() {
    return Math.max(0, this.total - this.readN);
  }
  get hidden() {
    return this.hiddenAt >= this.lastSeq;
  }
  get lastTs() {
    return this.last ? this.last.ts : 0;
  }
  get isGroup() {
    return this.conv.startsWith("g:");
  }
}

/** The device's replica of its user's conversations (`messages` when `keepMessages`). */
export class LocalState {
  constructor(user = "", keepMessages = true) {
    this.user = user;
    this.keepMessages = keepMessages;
    this.convs = new Map();
    this.messages = new Map(); // conv -> Map(seq -> message)
  }
  clear() {
    this.convs.clear();
    this.messages.clear();
  }
  drop(conv) {
    this.convs.delete(conv);
    this.messages.delete(conv);
  }
  view(conv) {
    let v = this.convs.get(conv);
    if (!v) {
      v = new ConversationView(conv);
      v.peer = peerOf(conv, this.user);
      this.convs.set(conv, v);
    }
    return v;
  }
  /** Pinned first, then newest activity first (as the server's `convs`). */
  conversationList(includeHidden = false) {
    const views = [...this.convs.values()].filter(
      (v) => v.lastSeq > 0 && (includeHidden || !v.hidden),
    );
    views.sort(
      (a, b) =>
        Number(b.pinned) - Number(a.pinned) ||
        b.lastTs - a.lastTs ||
        (a.conv < b.conv ? -1 : a.conv > b.conv ? 1 : 0),
    );
    return views;
  }
  /** Total unread over the conversations that are not muted. */
  get badge() {
    let n = 0;
    for (const v of this.convs.values()) if (!v.muted) n += v.unread;
    return n;
  }
  /** The entries held of `conv`, ascending by seq. */
  entries(conv) {
    const held = this.messages.get(conv);
    return held ? [...held.values()].sort((a, b) => a.seq - b.seq) : [];
  }

  applyMessage(m) {
    const v = this.view(m.conv);
    if ((m.n || 0) > v.total) v.total = m.n;
    const target = amendTarget(m);
    if (m.deleted) v.deleted.add(m.seq);
    else if (v.deleted.has(m.seq) || (target !== null && v.deleted.has(target))) m = tombstone(m);
    let held = null;
    if (this.keepMessages) {
      held = this.messages.get(m.conv);
      if (!held) this.messages.set(m.conv, (held = new Map()));
    }
    const old = held ? held.get(m.seq) : undefined;
    if (old && !m.deleted && (old.recalled || (old.edit_version || 0) > (m.edit_version || 0))) {
      // A copy older than what was applied here (a page fetched before an edit).
      m = { ...m, body: old.body, recalled: old.recalled, edit_version: old.edit_version };
    }
    if (m.seq >= v.lastSeq) {
      v.lastSeq = m.seq;
      v.last = m;
    }
    if (!AMEND_TYPES.has(m.type) && m.dev !== SERVER_DEVICE) {
      // Sending from a device moves the sender's read position to the entry.
      this._moved(v, m.from, m.seq, m.n || 0);
    }
    if (held) {
      held.set(m.seq, m);
      if (target !== null && !m.deleted) this._amend(m, target, held);
    }
  }

  _moved(v, by, seq, readN) {
    if (by === this.user) {
      if (seq > v.readSeq) v.readSeq = seq;
      if (readN !== null && readN > v.readN) v.readN = readN;
      if (v.conv === `d:${by}|${by}` && seq > v.peerReadSeq) v.peerReadSeq = seq;
    } else if (!v.isGroup) {
      if (seq > v.peerReadSeq) v.peerReadSeq = seq;
    }
    if (v.peerReadSeq > v.peerDeliveredSeq) v.peerDeliveredSeq = v.peerReadSeq;
  }

  _amend(e, targetSeq, held) {
    const target = held.get(targetSeq);
    if (e.type === "recall") {
      // A recall takes the content out of the edits made before it, too.
      for (const [seq, other] of held) {
        if (other.type === "edit" && !other.deleted && amendTarget(other) === targetSeq) {
          held.set(seq, { ...other, body: { seq: targetSeq } });
        }
      }
      if (target && !target.recalled && !target.deleted) {
        held.set(targetSeq, { ...target, body: {}, recalled: true });
      }
    } else if (target && target.recalled) {
      held.set(e.seq, { ...e, body: { seq: targetSeq } }); // no content survives a recall
    } else if (
      target &&
      !target.deleted &&
      (e.edit_version || 0) > (target.edit_version || 0)
    ) {
      held.set(targetSeq, { ...target, body: e.body.body || {}, edit_version: e.edit_version });
    }
    const v = this.view(e.conv);
    if (v.last && held.has(v.last.seq)) v.last = held.get(v.last.seq);
  }

  applyDeleted(conv, seqs) {
    const v = this.view(conv);
    for (const s of seqs) v.deleted.add(s);
    const gone = (m) => v.deleted.has(m.seq) || v.deleted.has(amendTarget(m));
    const held = this.messages.get(conv);
    if (held) {
      for (const [seq, m] of held) if (!m.deleted && gone(m)) held.set(seq, tombstone(m));
    }
    if (v.last && !v.last.deleted && gone(v.last)) v.last = tombstone(v.last);
  }

  applyRead(conv, by, seq, readN) {
    this._moved(this.view(conv), by, seq, readN ?? null);
  }

  applyDelivered(conv, by, seq) {
    const v = this.view(conv);
    if (by !== this.user && seq > v.peerDeliveredSeq) v.peerDeliveredSeq = seq;
  }

  applySettings(f) {
    const v = this.view(f.conv);
    const version = f.v || 0;
    if (version && version < v.settingsV) return; // older than what is applied
    v.settingsV = Math.max(v.settingsV, version);
    v.muted = Boolean(f.muted);
    v.pinned = Boolean(f.pinned);
    v.draft = f.draft || "";
    if (f.hidden) v.hiddenAt = Math.max(v.hiddenAt, f.hidden_at || v.lastSeq);
    else v.hiddenAt = -1;
  }

  /** A conversation's state (a `convs` item) as of change-log version `cv`. */
  applyState(item, cv) {
    const v = this.view(item.conv);
    if (item.peer) v.peer = item.peer;
    if (item.title) v.title = item.title;
    if (item.size) v.size = item.size;
    if (item.deleted && item.deleted.length) this.applyDeleted(item.conv, item.deleted);
    if (item.last) this.applyMessage(item.last);
    const n = item.n || 0;
    if (n > v.total) v.total = n;
    if ((item.read_seq || 0) > v.readSeq) v.readSeq = item.read_seq;
    const readN = n - (item.unread || 0); // the state's unread count is as of its last_seq
    if (readN > v.readN) v.readN = readN;
    if ((item.peer_read_seq || 0) > v.peerReadSeq) v.peerReadSeq = item.peer_read_seq;
    const delivered = Math.max(item.peer_delivered_seq || 0, v.peerReadSeq);
    if (delivered > v.peerDeliveredSeq) v.peerDeliveredSeq = delivered;
    if (cv >= v.settingsV) {
      v.settingsV = cv;
      v.muted = Boolean(item.muted);
      v.pinned = Boolean(item.pinned);
      v.draft = item.draft || "";
      if (item.hidden) v.hiddenAt = Math.max(v.hiddenAt, item.last_seq);
      else if (v.hiddenAt >= item.last_seq) v.hiddenAt = -1;
    }
  }
}

// ---------------------------------------------------------------------- the client

const DEFAULTS = {
  heartbeatMs: 0, // 0: the server's heartbeat_ms
  deadAfterMs: 0, // 0: 2 × heartbeat + 1 s without any frame
  gapGraceMs: 150,
  backoffMinMs: 50,
  backoffMaxMs: 5000,
  requestTimeoutMs: 15000,
  syncLimit: 200,
  tail: 0, // > 0: a conversation far behind syncs only its newest `tail` entries
  keepMessages: true,
  clientName: "tidings-js",
};

/**
 * One device's connection. `token` is a string or an async function returning one
 * (called on every connect). An expired or revoked token ends the client for good
 * (close 4002/4003): make a new client with a new token.
 * Events (CustomEvent, payload in `detail`): connected, disconnected, message, typing,
 * read, delivered, settings, deleted, states, presence, left, room, kicked, change.
 */
export class TidingsClient extends EventTarget {
  constructor(url, token, options = {}) {
    super();
    this.url = url;
    this._token = token;
    this.opts = { ...DEFAULTS, ...options };
    this.state = new LocalState("", this.opts.keepMessages);
    this.user = "";
    this.device = "";
    this.limits = null;
    this.since = "0"; // the wm of the last sync answer applied
    this.cv = 0; // the user change-log version applied
    this.held = new Map(); // conv -> highest seq held contiguously
    this.ready = false;
    this.connects = 0;
    this.syncAnswers = 0;
    this.rooms = new Set(); // live rooms joined (joined again after a reconnect)
    this._buffer = new Map(); // conv -> Map(seq -> [message, echo])
    this._outbox = new Map(); // cid -> pending send
    this._sendRids = new Map(); // request id -> pending send on the wire
    this._requests = new Map(); // request id -> {resolve, reject, timer}
    this._rid = 1;
    this._conn = null;
    this._running = false;
    this._closing = false;
    this._pausing = false;
    this._final = null;
    this._attempt = 0;
    this._retryTimer = null;
    this._ackDirty = new Set();
    this._ackScheduled = false;
    this._syncTask = null;
    this._wantSync = false;
    this._generation = 0; // bumped by reset(): older sync answers are dropped
    this._changeScheduled = false;
    this._readyWaiters = [];
    this._onOnline = () => this._retryNow();
    if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);
  }

  // ------------------------------------------------------------------ lifecycle

  /** Start connecting (and keep reconnecting); resolves once authenticated. */
  connect() {
    if (this._final) return Promise.reject(new ConnectionError("connection closed for good"));
    this._closing = false;
    if (!this._running) {
      this._running = true;
      this._open();
    }
    return this.waitReady();
  }

  /** Resolves when the connection is authenticated; rejects when it never will be. */
  waitReady(timeoutMs = 0) {
    if (this.ready) return Promise.resolve();
    if (this._final) return Promise.reject(new ConnectionError(this._final.reason));
    return new Promise((resolve, reject) => {
      const w = { resolve, reject, timer: null };
      if (timeoutMs) {
        w.timer = setTimeout(() => {
          this._readyWaiters = this._readyWaiters.filter((x) => x !== w);
          reject(new ConnectionError("not connected"));
        }, timeoutMs);
      }
      this._readyWaiters.push(w);
    });
  }

  /** Go offline but keep everything this device holds; `connect()` syncs the difference. */
  disconnect() {
    this._running = false;
    clearTimeout(this._retryTimer);
    this._rejectWaiters("disconnected");
    const conn = this._conn;
    if (conn) {
      this._pausing = true;
      try {
        conn.ws.close(1000, "bye");
      } catch {
        /* already closing */
      }
      this._ended(conn, 1000, "bye");
      this._pausing = false;
    }
  }

  /** Close for good: pending sends fail, no reconnect. */
  close() {
    this._closing = true;
    this._running = false;
    clearTimeout(this._retryTimer);
    this._final = this._final || { code: null, reason: "client closed", final: true };
    this._rejectWaiters("client closed");
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    const conn = this._conn;
    if (conn) {
      try {
        conn.ws.close(1000, "bye");
      } catch {
        /* already closing */
      }
      this._ended(conn, 1000, "client closed");
    }
    this._failOutbox(new ConnectionError("client closed"));
  }

  /** Drop the connection abruptly (no close handshake); the client reconnects by itself. */
  abortConnection() {
    const conn = this._conn;
    if (conn) {
      try {
        conn.ws.close();
      } catch {
        /* already closing */
      }
      this._ended(conn, null, "aborted");
    }
  }

  get unackedSends() {
    return this._outbox.size;
  }

  _open() {
    let ws;
    try {
      ws = new WebSocket(this.url, SUBPROTOCOL);
    } catch (e) {
      this._retryLater(false);
      return;
    }
    const conn = { ws, hello: null, authenticated: false, beat: null, lastRx: Date.now() };
    this._conn = conn;
    // The server speaks first; a server that does not is as good as dead.
    conn.beat = setTimeout(() => this.abortConnection(), this.opts.requestTimeoutMs);
    ws.onmessage = (ev) => this._onData(conn, ev.data);
    ws.onclose = (ev) => this._ended(conn, ev.code, ev.reason || "");
    ws.onerror = () => {}; // a close event follows
  }

  async _onServerHello(conn, hello) {
    clearTimeout(conn.beat);
    this.limits = hello.limits;
    const every = this.opts.heartbeatMs || hello.heartbeat_ms;
    const deadAfter = this.opts.deadAfterMs || every * 2 + 1000;
    conn.beat = setInterval(() => {
      if (Date.now() - conn.lastRx > deadAfter) this.abortConnection(); // half-open
      else if (this.ready) this._write({ t: "ping", id: this._rid++ });
    }, every);
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (e) {
      if (conn === this._conn) this.abortConnection();
      return;
    }
    if (conn !== this._conn) return; // it ended while the token was being fetched
    let ready;
    try {
      ready = await this._request(
        (id) => ({ t: "hello", v: PROTOCOL_VERSION, token, id, client: this.opts.clientName }),
        0,
        true,
      );
    } catch {
      return; // a refused hello is followed by the server's close
    }
    if (conn !== this._conn) return;
    conn.authenticated = true;
    conn.readyAt = Date.now();
    this.user = ready.user;
    this.device = ready.device;
    this.state.user = ready.user;
    this.connects += 1;
    this.ready = true;
    this._attempt = 0;
    for (const w of this._readyWaiters.splice(0)) {
      clearTimeout(w.timer);
      w.resolve();
    }
    this._emit("connected", { user: ready.user, device: ready.device, session: ready.session });
    for (const p of this._outbox.values()) p.rid = 0;
    this._pump();
    this.requestSync();
    for (const room of this.rooms) {
      this._request((id) => ({ t: "join", id, room })).then(
        (j) => this._emit("room", { room, msgs: [], likes: 0, dropped: 0, online: j.online }),
        (e) => {
          if (e instanceof RequestError) this.rooms.delete(room); // refused now: forget it
        },
      );
    }
  }

  _ended(conn, code, reason) {
    if (conn !== this._conn) return;
    this._conn = null;
    clearTimeout(conn.beat);
    clearInterval(conn.beat);
    conn.ws.onmessage = conn.ws.onclose = null;
    this.ready = false;
    this._failRequests();
    this._sendRids.clear();
    for (const p of this._outbox.values()) p.rid = 0;
    if (this._pausing) return;
    const final = FINAL_CODES.has(code) || this._closing;
    const ev = { code, reason, final };
    this._emit("disconnected", ev);
    if (final) {
      this._final = ev;
      this._running = false;
      this._failOutbox(new ConnectionError(`connection closed for good (${code})`));
      this._rejectWaiters(reason || String(code));
      return;
    }
    // A connection that dies right after `ready` (e.g. the server refusing what the
    // outbox sends) does not reset the backoff: no tight reconnect loop.
    this._retryLater(conn.authenticated && Date.now() - conn.readyAt > 2000);
  }

  _rejectWaiters(why) {
    for (const w of this._readyWaiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new ConnectionError(why));
    }
  }

  _retryLater(authenticated) {
    if (!this._running) return;
    this._attempt = authenticated ? 0 : this._attempt + 1;
    const o = this.opts;
    const delay = Math.min(o.backoffMaxMs, o.backoffMinMs * 2 ** Math.min(this._attempt, 16));
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      if (this._running && !this._conn) this._open();
    }, delay * (0.5 + Math.random() / 2));
  }

  /** The browser says the network is back: try now instead of waiting out the backoff. */
  _retryNow() {
    if (this._running && !this._conn) {
      clearTimeout(this._retryTimer);
      this._open();
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
    if (type !== "change" && !this._changeScheduled) {
      this._changeScheduled = true;
      queueMicrotask(() => {
        this._changeScheduled = false;
        this.dispatchEvent(new CustomEvent("change", { detail: null }));
      });
    }
  }

  _write(frame) {
    const conn = this._conn;
    if (conn && conn.ws.readyState === 1) conn.ws.send(JSON.stringify(frame));
  }

  _failOutbox(err) {
    for (const p of this._outbox.values()) p.reject(err);
    this._outbox.clear();
    this._sendRids.clear();
  }

  _failRequests() {
    const pending = [...this._requests.values()];
    this._requests.clear();
    for (const r of pending) {
      clearTimeout(r.timer);
      r.reject(new ConnectionError("connection lost"));
    }
  }

  // ------------------------------------------------------------------ requests

  async _request(make, retries = 5, beforeReady = false) {
    for (let attempt = 0; ; attempt++) {
      if (!this._conn || (!this.ready && !beforeReady)) throw new ConnectionError("not connected");
      const id = this._rid++;
      const answer = new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._requests.delete(id);
          reject(new ConnectionError("request timed out"));
        }, this.opts.requestTimeoutMs);
        this._requests.set(id, { resolve, reject, timer });
      });
      this._write(make(id));
      try {
        return await answer;
      } catch (e) {
        if (!(e instanceof RequestError) || !e.retryable || attempt >= retries) throw e;
        await sleep(e.retryAfterMs || 100);
      }
    }
  }

  _resolve(id, value) {
    const r = this._requests.get(id);
    if (r) {
      this._requests.delete(id);
      clearTimeout(r.timer);
      r.resolve(value);
    }
  }

  /**
   * Send a message and resolve with the `sent` answer once the server has stored it. The
   * send survives reconnects (resent with the same `cid`); it rejects with RequestError
   * when refused for good.
   */
  send({ to, conv, text, body, type = "text", cid, flags = 0, mentions = [], replyTo = null }) {
    if (this._final) return Promise.reject(new ConnectionError("connection closed for good"));
    const id = cid || newCid();
    const existing = this._outbox.get(id);
    if (existing) return existing.promise;
    const p = {
      cid: id,
      to: to ?? null,
      conv: conv ?? null,
      type,
      body: body ?? { text: text ?? "" },
      flags,
      mentions,
      replyTo,
      rid: 0,
    };
    p.promise = new Promise((resolve, reject) => {
      p.resolve = resolve;
      p.reject = reject;
    });
    this._outbox.set(id, p);
    this._pump();
    return p.promise;
  }

  /** The sends not yet stored (what a page could keep to resend after a reload). */
  pendingSends() {
    return [...this._outbox.values()].map((p) => ({
      cid: p.cid,
      to: p.to,
      conv: p.conv,
      type: p.type,
      body: p.body,
      flags: p.flags,
      mentions: p.mentions,
      replyTo: p.replyTo,
    }));
  }

  recall(conv, seq) {
    return this.send({ conv, type: "recall", body: { seq } });
  }

  edit(conv, seq, text, body) {
    return this.send({ conv, type: "edit", body: { seq, body: body ?? { text: text ?? "" } } });
  }

  _pump() {
    if (!this.ready) return;
    const limit = this.limits ? this.limits.max_inflight : 64;
    const maxFrame = this.limits ? this.limits.max_frame_bytes : 65536;
    for (const p of [...this._outbox.values()]) {
      if (this._sendRids.size >= limit) return;
      if (p.rid) continue;
      const f = { t: "send", id: this._rid, cid: p.cid, body: p.body, type: p.type };
      if (p.to !== null) f.to = p.to;
      if (p.conv !== null) f.conv = p.conv;
      if (p.flags) f.flags = p.flags;
      if (p.mentions.length) f.mentions = p.mentions;
      if (p.replyTo) f.reply_to = p.replyTo;
      const data = JSON.stringify(f);
      if (encoder.encode(data).length > maxFrame) {
        // The server would close the connection (1009) and the outbox would send it
        // again after every reconnect: refuse it here, for good.
        this._outbox.delete(p.cid);
        p.reject(new RequestError({ code: "too_large", message: "message too large" }));
        continue;
      }
      p.rid = this._rid++;
      this._sendRids.set(p.rid, p);
      this._conn.ws.send(data);
    }
  }

  /** A page of entries before `before` (0: the newest); they go into `state`. */
  async history(conv, before = 0, limit = 50) {
    const page = await this._request((id) => ({ t: "history", id, conv, before, limit }));
    for (const m of page.msgs) this.state.applyMessage(m);
    this._emit("history", page);
    return page;
  }

  async markRead(conv, seq) {
    const r = await this._request((id) => ({ t: "read", id, conv, seq }));
    this.state.applyRead(r.conv, r.by, r.seq, r.n);
    this._emit("read", r);
    return r;
  }

  async settings(conv, { muted, pinned, hidden, draft } = {}) {
    const r = await this._request((id) => ({ t: "settings", id, conv, muted, pinned, hidden, draft }));
    this.state.applySettings(r);
    this._emit("settings", r);
    return r;
  }

  async deleteForMe(conv, seqs) {
    const r = await this._request((id) => ({ t: "delete", id, conv, seqs }));
    this.state.applyDeleted(r.conv, r.seqs);
    this._emit("deleted", r);
    return r.seqs;
  }

  async presence(users) {
    return (await this._request((id) => ({ t: "presence", id, users }))).users;
  }

  async showPresence(visible) {
    await this._request((id) => ({ t: "privacy", id, presence: visible }));
  }

  /** The server's conversation list: {convs, badge}. */
  async conversations(limit = 50) {
    const r = await this._request((id) => ({ t: "convs", id, limit }));
    return { convs: r.convs, badge: r.badge };
  }

  /** Fire and forget; the server relays at most one per conversation per second. */
  typing(conv) {
    if (this.ready) this._write({ t: "typing", conv });
  }

  async block(user, on = true) {
    await this._request((id) => ({ t: "block", id, user, on }));
  }

  async blocked() {
    return (await this._request((id) => ({ t: "blocks", id }))).users;
  }

  async ping() {
    return this._request((id) => ({ t: "ping", id }));
  }

  // ------------------------------------------------------------------ groups

  /** Any group operation (protocol §16.1); a client id is chosen once, so a retry after
   * a throttling answer cannot apply it twice. */
  group(op, conv, fields = {}) {
    const cid = fields.cid || newCid();
    return this._request((id) => ({ t: "group", id, op, conv, ...fields, cid }));
  }

  createGroup(users, name, fields = {}) {
    return this.group("create", fields.conv, { users, name, ...fields });
  }

  addMembers(conv, users) {
    return this.group("add", conv, { users });
  }

  removeMembers(conv, users) {
    return this.group("remove", conv, { users });
  }

  leaveGroup(conv) {
    return this.group("leave", conv);
  }

  setRole(conv, users, role) {
    return this.group("role", conv, { users, role });
  }

  muteMembers(conv, users, durationMs) {
    return this.group("mute", conv, { users, duration_ms: durationMs });
  }

  groupInfo(conv) {
    return this.group("info", conv);
  }

  members(conv, cursor = "", limit = 100) {
    return this._request((id) => ({ t: "members", id, conv, cursor, limit }));
  }

  /** "Read by N" (and who, in small groups) for entries of `conv`. */
  async receipts(conv, seqs) {
    return (await this._request((id) => ({ t: "receipts", id, conv, seqs }))).receipts;
  }

  // ------------------------------------------------------------------ live rooms

  /** Enter a live room; its posts arrive as `room` events. Joined again after reconnects. */
  async joinRoom(room) {
    this.rooms.add(room); // joined again after a reconnect, unless left or refused
    try {
      return await this._request((id) => ({ t: "join", id, room }));
    } catch (e) {
      if (e instanceof RequestError) this.rooms.delete(room);
      throw e;
    }
  }

  /** Leave a room; while disconnected there is nothing to tell the server (the end of
   * the connection left it), and it is not joined again. */
  async leaveRoom(room) {
    this.rooms.delete(room);
    if (this.ready) await this._request((id) => ({ t: "leave", id, room }));
  }

  /** Post to a room: kind "chat", "gift" or "like" (at most once, by design). */
  async roomSend(room, kind = "chat", body = {}) {
    await this._request((id) => ({ t: "rsend", id, room, kind, body }), 0);
  }

  // ------------------------------------------------------------------ inbound

  _onData(conn, data) {
    if (conn !== this._conn) return;
    conn.lastRx = Date.now();
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (!conn.hello) {
      if (f.t !== "hello") {
        this.abortConnection();
        return;
      }
      conn.hello = f;
      this._onServerHello(conn, f);
      return;
    }
    switch (f.t) {
      case "push":
        this._onMessage(f.m, false);
        break;
      case "sent":
        this._onSent(f);
        break;
      case "error":
        this._onError(f);
        break;
      case "pong":
        if (big(f.wm) > big(this.since) || (f.cv || 0) > this.cv) this.requestSync();
        this._resolve(f.id, f);
        break;
      case "resync": // the server may have lost pushes to us: catch up
        this.requestSync();
        break;
      case "typing":
        this._emit("typing", { conv: f.conv, user: f.from });
        break;
      case "delivered":
        this.state.applyDelivered(f.conv, f.by, f.seq);
        this._emit("delivered", f);
        break;
      case "room":
        this._emit("room", f);
        break;
      case "kicked":
        this._emit("kicked", f);
        break;
      case "read":
      case "presence":
      case "deleted":
      case "settings":
        if (f.id) this._resolve(f.id, f);
        else this._onEvent(f);
        break;
      default:
        if (f.id) this._resolve(f.id, f); // ready, synced, page, ok, convs, group, ...
    }
  }

  _onEvent(f) {
    if (f.t === "read") this.state.applyRead(f.conv, f.by, f.seq, f.n);
    else if (f.t === "deleted") this.state.applyDeleted(f.conv, f.seqs);
    else if (f.t === "settings") this.state.applySettings(f);
    this._emit(f.t, f);
  }

  _onError(err) {
    const p = this._sendRids.get(err.id);
    if (p) {
      this._sendRids.delete(err.id);
      p.rid = 0;
      if (err.retryable) {
        setTimeout(() => this._pump(), err.retry_after_ms || 100);
      } else {
        this._outbox.delete(p.cid);
        p.reject(new RequestError(err));
        this._pump();
      }
      return;
    }
    const r = this._requests.get(err.id);
    if (r) {
      this._requests.delete(err.id);
      clearTimeout(r.timer);
      r.reject(new RequestError(err));
    } else if (!err.id) {
      this._emit("servererror", err);
    }
  }

  _onSent(s) {
    const p = this._sendRids.get(s.id);
    if (!p) return;
    this._sendRids.delete(s.id);
    this._outbox.delete(p.cid);
    const m = {
      conv: s.conv,
      seq: s.seq,
      mid: s.mid,
      from: this.user,
      dev: this.device,
      cid: s.cid,
      type: p.type,
      body: p.body,
      ts: s.ts,
      flags: p.flags,
      mentions: p.mentions,
      reply_to: p.replyTo,
      // A retried send answered `dup` reports the entry's edit version now, but this
      // copy has the original body: only an edit entry carries its version.
      edit_version: p.type === "edit" ? s.edit_version || 0 : 0,
      n: s.n || 0,
    };
    this._onMessage(m, true);
    p.resolve(s);
    this._pump();
  }

  /** An entry from a push or an own send (`live`), or from a sync answer. */
  _onMessage(m, echo, live = true) {
    const conv = m.conv;
    let held = this.held.get(conv) || 0;
    if (m.seq <= held) {
      if (!echo) this._markAck(conv); // a retransmission: ack again so it stops
      return;
    }
    if (m.seq !== held + 1) {
      let buf = this._buffer.get(conv);
      if (!buf) this._buffer.set(conv, (buf = new Map()));
      buf.set(m.seq, [m, echo]);
      if (buf.size > 1000) this.requestSync();
      else setTimeout(() => this._checkGap(conv), this.opts.gapGraceMs);
      return;
    }
    this._deliver(m, echo);
    held = m.seq;
    const buf = this._buffer.get(conv);
    if (buf) {
      while (buf.has(held + 1)) {
        const [nm, necho] = buf.get(held + 1);
        buf.delete(held + 1);
        this._deliver(nm, necho);
        held += 1;
      }
      for (const s of [...buf.keys()]) if (s <= held) buf.delete(s);
      if (!buf.size) this._buffer.delete(conv);
    }
    const view = this.state.convs.get(conv);
    const last = view ? view.last : null;
    if (live && last && endsMembership(last, this.user)) {
      this._write({ t: "ack", conv, seq: held }); // removed, or left on another device
      this._forget(conv);
      return;
    }
    this.held.set(conv, held);
    this._markAck(conv);
  }

  _deliver(m, echo) {
    this.state.applyMessage(m);
    this._emit("message", { message: m, echo });
  }

  _forget(conv) {
    this.state.drop(conv);
    this.held.delete(conv);
    this._buffer.delete(conv);
    this._emit("left", { conv });
  }

  _skipped(conv, base) {
    const buf = this._buffer.get(conv);
    if (!buf) return;
    for (const s of [...buf.keys()]) if (s <= base) buf.delete(s);
    if (!buf.size) this._buffer.delete(conv);
  }

  _checkGap(conv) {
    const buf = this._buffer.get(conv);
    if (buf && buf.size && Math.min(...buf.keys()) > (this.held.get(conv) || 0) + 1) {
      this.requestSync();
    }
  }

  _markAck(conv) {
    this._ackDirty.add(conv);
    if (!this._ackScheduled) {
      this._ackScheduled = true;
      queueMicrotask(() => this._flushAcks());
    }
  }

  _flushAcks() {
    this._ackScheduled = false;
    if (this.ready) {
      for (const conv of this._ackDirty) {
        this._write({ t: "ack", conv, seq: this.held.get(conv) || 0 });
      }
    }
    this._ackDirty.clear();
  }

  // ------------------------------------------------------------------ sync

  /** Catch up with the server (after every connect, on a gap, when pong.wm moved). */
  requestSync() {
    this._wantSync = true;
    if (this.ready && !this._syncTask) {
      this._syncTask = this._syncLoop().finally(() => {
        this._syncTask = null;
        if (this._wantSync && this.ready) this.requestSync();
      });
    }
  }

  async syncNow() {
    this.requestSync();
    while (this._syncTask) await this._syncTask;
  }

  /** Forget everything this device holds and, when connected, sync from scratch. */
  async reset() {
    this._wantSync = false;
    this._generation += 1; // an answer on its way was asked for with what is forgotten
    if (this._syncTask) await this._syncTask.catch(() => {});
    this.since = "0";
    this.cv = 0;
    this.held.clear();
    this._buffer.clear();
    this.state.clear();
    if (this.ready) await this.syncNow();
  }

  _haveRoom() {
    return (this.limits ? this.limits.max_frame_bytes : 65536) - 1024;
  }

  _haveSize(conv) {
    // An upper bound of one `have` entry: the id as a JSON string, a colon, 19 digits, a comma.
    return encoder.encode(JSON.stringify(conv)).length + 21;
  }

  _haveFor(convs) {
    let room = this._haveRoom();
    const out = {};
    for (const conv of convs) {
      const seq = this.held.get(conv);
      if (seq === undefined) continue;
      room -= this._haveSize(conv);
      if (room < 0) break;
      out[conv] = seq;
    }
    return out;
  }

  async _syncLoop() {
    try {
      while (this._wantSync) {
        this._wantSync = false;
        let listed = null;
        for (;;) {
          const since = this.since;
          let limit = this.opts.syncLimit;
          let have;
          if (listed) {
            have = this._haveFor(listed);
          } else {
            have = this._haveFor(this.held.keys());
            if (Object.keys(have).length < this.held.size) {
              // Too many conversations for one frame: ask which changed, then state those.
              have = {};
              limit = 0;
            }
          }
          const cv = this.cv;
          const tail = this.opts.tail;
          const gen = this._generation;
          const r = await this._request((id) => ({ t: "sync", id, since, have, limit, cv, tail }));
          if (gen !== this._generation) return;
          this.syncAnswers += 1;
          if (limit === 0) {
            listed = r.convs.map((c) => c.conv);
            if (!listed.length) break;
            continue;
          }
          listed = null;
          for (const conv of r.left || []) this._forget(conv);
          for (const c of r.convs) {
            if ((c.base || 0) > (this.held.get(c.conv) || 0)) {
              this.held.set(c.conv, c.base); // older entries skipped (tail): hold from here
              this._skipped(c.conv, c.base);
              this._emit("skipped", { conv: c.conv, base: c.base });
            }
          }
          const msgs = [...r.msgs].sort((a, b) =>
            a.conv === b.conv ? a.seq - b.seq : a.conv < b.conv ? -1 : 1,
          );
          for (const m of msgs) {
            this._onMessage(m, m.from === this.user && m.dev === this.device, false);
          }
          const states = r.states || [];
          for (const item of states) this.state.applyState(item, r.cv || 0);
          if (states.length) this._emit("states", { convs: states });
          const cvMoved = (r.cv || 0) > this.cv;
          this.cv = Math.max(this.cv, r.cv || 0);
          const wmMoved = big(r.wm) > big(since);
          if (wmMoved) this.since = r.wm;
          this._emit("synced", { complete: r.complete });
          if (r.complete || (!r.msgs.length && !wmMoved && !cvMoved)) break;
        }
      }
    } catch (e) {
      if (!(e instanceof ConnectionError) && !(e instanceof RequestError)) throw e;
    }
  }
}
