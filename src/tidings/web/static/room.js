// The live room screen: a stand-in video (drawn on a canvas), danmaku flying over it,
// gifts, likes and the online count. Rooms are at most once by design: what arrives while
// the viewer is in the room is shown, nothing is kept.
const $ = (id) => document.getElementById(id);
const LANES = 8;
const FLIGHT_MS = 7000;
const MAX_ON_SCREEN = 60;

export class RoomView {
  constructor(client) {
    this.client = client;
    this.room = null;
    this.likes = 0;
    this.lane = 0;
    this.frame = 0;
    this.raf = 0;
    // Handlers as properties: the next signed-in app's view replaces them.
    $("room-composer").onsubmit = (ev) => {
      ev.preventDefault();
      this.post("chat", { text: $("room-text").value.trim() });
      $("room-text").value = "";
    };
    $("room-like").onclick = () => this.post("like", {});
    $("room-gift").onclick = () => this.post("gift", { gift: "rose" });
  }

  async enter(id) {
    const room = id.startsWith("r:") ? id : `r:${id}`;
    if (this.room && this.room !== room) this.stop();
    this.room = room;
    this.likes = 0;
    $("room-title").textContent = room.slice(2);
    $("room-likes").textContent = "0";
    $("danmaku").replaceChildren();
    $("gifts").replaceChildren();
    this.draw();
    const joined = await this.client.joinRoom(room);
    $("room-online").textContent = String(joined.online);
  }

  /** Leave the room and stop drawing (the screen is left). */
  stop() {
    cancelAnimationFrame(this.raf);
    this.raf = 0;
    if (this.room) this.client.leaveRoom(this.room).catch(() => {});
    this.room = null;
  }

  async post(kind, body) {
    if (!this.room || (kind === "chat" && !body.text)) return;
    try {
      await this.client.roomSend(this.room, kind, body);
    } catch (e) {
      this.fly(`(${e.code || "error"}: ${e.message})`, "system");
    }
  }

  onFrame(f) {
    if (f.room !== this.room) return;
    if (f.online) $("room-online").textContent = String(f.online);
    if (f.likes) {
      this.likes += f.likes;
      $("room-likes").textContent = String(this.likes);
    }
    for (const m of f.msgs || []) {
      if (m.kind === "chat") this.fly(`${m.from}: ${m.body.text ?? ""}`, "chat");
      else this.gift(m);
    }
  }

  gift(m) {
    const what = m.body.gift || m.body.text || "a gift";
    const text = m.kind === "admin" ? `Notice: ${m.body.text ?? ""}` : `★ ${m.from} sent ${what}`;
    this.fly(text, m.kind);
    const li = document.createElement("li");
    li.textContent = text;
    const list = $("gifts");
    list.prepend(li);
    while (list.children.length > 5) list.lastChild.remove();
  }

  fly(text, kind) {
    const layer = $("danmaku");
    while (layer.children.length >= MAX_ON_SCREEN) layer.firstChild.remove();
    const d = document.createElement("div");
    d.className = `danmaku ${kind}`;
    d.textContent = text;
    d.style.top = `${(this.lane % LANES) * (100 / LANES) + 2}%`;
    d.style.animationDuration = `${FLIGHT_MS + (this.lane % 3) * 800}ms`;
    this.lane += 1;
    d.addEventListener("animationend", () => d.remove());
    layer.append(d);
  }

  /** A moving gradient with a "LIVE" badge: the video a real app would play here. */
  draw() {
    const canvas = $("video");
    const ctx = canvas.getContext("2d");
    const step = () => {
      this.frame += 1;
      const t = this.frame / 120;
      const g = ctx.createLinearGradient(0, 0, canvas.width, canvas.height);
      g.addColorStop(0, `hsl(${(t * 40) % 360}, 60%, 30%)`);
      g.addColorStop(1, `hsl(${(t * 40 + 120) % 360}, 60%, 18%)`);
      ctx.fillStyle = g;
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      ctx.fillStyle = "#e53935";
      ctx.fillRect(16, 16, 64, 28);
      ctx.fillStyle = "#fff";
      ctx.font = "bold 18px sans-serif";
      ctx.fillText("LIVE", 26, 37);
      this.raf = requestAnimationFrame(step);
    };
    cancelAnimationFrame(this.raf);
    this.raf = requestAnimationFrame(step);
  }
}
