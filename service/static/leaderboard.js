/*
 * <score-leaderboard>: the live top-N of a score-service, as one self-contained element.
 *
 *   <script src="https://scores.example.com/static/leaderboard.js" defer></script>
 *   <score-leaderboard limit="5"></score-leaderboard>
 *
 * Attributes (all optional):
 *   server     the service's base URL (default: where this script was loaded from)
 *   limit      how many rows to show (default: all the server sends, SCORE_TOP_N)
 *   heading    the title (default "Leaderboard")
 *   theme      "dark" (default) or "light"
 *   transport  "ws" (default; falls back to SSE if WebSockets never open) or "sse"
 *   from-query read the attributes above from the page's query string (the /embed page)
 *
 * The first frame of a connection is the whole current top-N, so a new or reconnecting
 * element is always whole; after that, one frame per change. Versions only grow: a frame
 * older than the one shown (a lagging server after a reconnect) is ignored.
 */
(() => {
  "use strict";

  const SCRIPT = document.currentScript;
  const DEFAULT_SERVER = SCRIPT && SCRIPT.src ? new URL(SCRIPT.src, location.href).origin : location.origin;
  const OPTIONS = ["server", "limit", "heading", "theme", "transport"];
  const RETRY_BASE_MS = { 1001: 250, 1013: 2000 }; // going away: soon; try again later: not soon
  const RETRY_MAX_MS = 15000;
  const WS_FAILURES_BEFORE_SSE = 3;
  const FORMAT = new Intl.NumberFormat();
  const REDUCED_MOTION = window.matchMedia("(prefers-reduced-motion: reduce)");

  const STYLE = `
    :host { display: block; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
      --bg: linear-gradient(165deg, #1b2138 0%, #10142a 100%); --fg: #eef1fb; --muted: #8d96b8;
      --row: rgba(255,255,255,.04); --row-border: rgba(255,255,255,.06); --badge: rgba(255,255,255,.09);
      --up: #3ddc97; --down: #ff6b81; --new: #7aa2ff; --glow: rgba(255, 196, 61, .28);
      --shadow: 0 18px 50px rgba(4, 6, 20, .45); color-scheme: dark; }
    :host([theme="light"]) { --bg: linear-gradient(165deg, #ffffff 0%, #f3f5fc 100%); --fg: #161a2e;
      --muted: #69708f; --row: rgba(20,30,80,.035); --row-border: rgba(20,30,80,.07);
      --badge: rgba(20,30,80,.08); --up: #0f9d63; --down: #d83a56; --new: #3b63d9;
      --glow: rgba(255, 176, 32, .30); --shadow: 0 14px 40px rgba(30, 40, 90, .12); color-scheme: light; }
    .card { background: var(--bg); color: var(--fg); border-radius: 18px; padding: 22px 22px 14px;
      box-shadow: var(--shadow); border: 1px solid var(--row-border); }
    header { display: flex; align-items: center; justify-content: space-between; gap: 12px; margin-bottom: 16px; }
    h2 { margin: 0; font-size: 20px; font-weight: 700; letter-spacing: -.01em; }
    .sub { color: var(--muted); font-size: 13px; margin-top: 2px; }
    .status { display: inline-flex; align-items: center; gap: 7px; font-size: 12px; font-weight: 600;
      text-transform: uppercase; letter-spacing: .06em; color: var(--muted); padding: 5px 10px;
      border-radius: 999px; background: var(--row); border: 1px solid var(--row-border); white-space: nowrap; }
    .dot { width: 8px; height: 8px; border-radius: 50%; background: #f0b429; }
    .status[data-state="live"] { color: var(--up); }
    .status[data-state="live"] .dot { background: var(--up); animation: pulse 2s infinite; }
    .status[data-state="offline"] .dot { background: var(--down); }
    @keyframes pulse { 0% { box-shadow: 0 0 0 0 rgba(61,220,151,.55); } 70% { box-shadow: 0 0 0 8px rgba(61,220,151,0); }
      100% { box-shadow: 0 0 0 0 rgba(61,220,151,0); } }
    ol { list-style: none; margin: 0; padding: 0; display: grid; gap: 6px; }
    li { position: relative; display: grid; grid-template-columns: 34px 34px minmax(0, 1fr) auto auto;
      align-items: center; gap: 12px; padding: 9px 14px 9px 10px; border-radius: 12px; background: var(--row);
      border: 1px solid var(--row-border); overflow: hidden; }
    li[data-rank="1"] { background: linear-gradient(90deg, rgba(255,196,61,.16), var(--row) 65%); }
    li[data-rank="2"] { background: linear-gradient(90deg, rgba(190,200,222,.13), var(--row) 65%); }
    li[data-rank="3"] { background: linear-gradient(90deg, rgba(214,140,90,.14), var(--row) 65%); }
    .glow { position: absolute; inset: 0; background: var(--glow); opacity: 0; pointer-events: none; }
    .rank { width: 30px; height: 30px; border-radius: 50%; display: grid; place-items: center;
      font-weight: 700; font-size: 14px; background: var(--badge); font-variant-numeric: tabular-nums; }
    li[data-rank="1"] .rank { background: linear-gradient(145deg, #ffd75e, #e7a21f); color: #3a2500; }
    li[data-rank="2"] .rank { background: linear-gradient(145deg, #eef2fa, #a9b4c8); color: #262c3a; }
    li[data-rank="3"] .rank { background: linear-gradient(145deg, #f0b083, #b8693a); color: #351707; }
    .avatar { width: 32px; height: 32px; border-radius: 10px; display: grid; place-items: center;
      font-weight: 700; font-size: 14px; color: #fff; text-transform: uppercase; }
    .name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
    .move { font-size: 12px; font-weight: 700; min-width: 34px; text-align: right; opacity: 0;
      font-variant-numeric: tabular-nums; }
    .move.up { color: var(--up); } .move.down { color: var(--down); } .move.new { color: var(--new); }
    .score { font-weight: 700; font-size: 16px; font-variant-numeric: tabular-nums; text-align: right; min-width: 64px; }
    .empty { color: var(--muted); text-align: center; padding: 28px 0 22px; }
    footer { display: flex; justify-content: space-between; color: var(--muted); font-size: 12px; margin-top: 12px; }
    :host([compact]) .card { padding: 14px 14px 10px; border-radius: 14px; }
    :host([compact]) li { padding: 6px 10px 6px 8px; }
    @media (max-width: 420px) { li { grid-template-columns: 30px 0 minmax(0, 1fr) auto auto; gap: 8px; }
      .avatar { visibility: hidden; width: 0; } }
  `;

  const TEMPLATE = `
    <div class="card" part="card">
      <header>
        <div><h2 part="heading"></h2><div class="sub"></div></div>
        <span class="status" role="status" data-state="connecting"><span class="dot"></span><span class="label">Connecting</span></span>
      </header>
      <ol part="list"></ol>
      <div class="empty" hidden>No scores yet. The first points will appear here.</div>
      <footer><span class="updated"></span><span class="via"></span></footer>
    </div>`;

  function versionKey(version) {
    const [ms, seq] = String(version).split("-");
    return [Number(ms) || 0, Number(seq) || 0];
  }

  function olderThan(a, b) {
    const [am, as] = versionKey(a);
    const [bm, bs] = versionKey(b);
    return am < bm || (am === bm && as < bs);
  }

  function hue(text) {
    let h = 0;
    for (const ch of text) h = (h * 31 + ch.codePointAt(0)) % 360;
    return h;
  }

  class ScoreLeaderboard extends HTMLElement {
    constructor() {
      super();
      this.attachShadow({ mode: "open" }).innerHTML = `<style>${STYLE}</style>${TEMPLATE}`;
      const $ = (selector) => this.shadowRoot.querySelector(selector);
      this.list = $("ol");
      this.empty = $(".empty");
      this.status = $(".status");
      this.statusLabel = $(".status .label");
      this.updated = $(".updated");
      this.via = $(".via");
      this.rowsById = new Map();
      this.version = null;
      this.conn = null;
      this.timer = null;
      this.attempt = 0;
      this.wsFailures = 0;
      this.onOnline = () => this.reconnectNow();
    }

    connectedCallback() {
      if (this.hasAttribute("from-query")) {
        const query = new URLSearchParams(location.search);
        for (const name of OPTIONS) if (query.has(name)) this.setAttribute(name, query.get(name));
        if (query.has("compact")) this.setAttribute("compact", "");
      }
      const heading = this.getAttribute("heading") || "Leaderboard";
      this.shadowRoot.querySelector("h2").textContent = heading;
      this.list.setAttribute("aria-label", heading);
      this.stopped = false;
      window.addEventListener("online", this.onOnline);
      this.connect();
    }

    disconnectedCallback() {
      this.stopped = true;
      window.removeEventListener("online", this.onOnline);
      clearTimeout(this.timer);
      this.drop();
    }

    get server() {
      return new URL(this.getAttribute("server") || DEFAULT_SERVER, location.href);
    }

    connect() {
      if (this.stopped) return;
      this.setStatus(this.attempt ? "reconnecting" : "connecting");
      const sse = this.getAttribute("transport") === "sse" || !("WebSocket" in window)
        || this.wsFailures >= WS_FAILURES_BEFORE_SSE;
      try {
        if (sse) this.connectSse();
        else this.connectWs();
      } catch (error) { // a URL or policy the browser refuses: count it, keep trying
        this.conn = null;
        if (!sse) this.wsFailures += 1;
        this.retry(0);
      }
    }

    connectWs() {
      const url = new URL("/api/v1/leaderboard/ws", this.server);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(url);
      let opened = false;
      ws.onopen = () => { opened = true; this.wsFailures = 0; };
      ws.onmessage = (event) => this.receive(event.data, "WebSocket");
      ws.onclose = (event) => {
        if (this.conn !== ws) return;
        this.conn = null;
        if (!opened) this.wsFailures += 1;
        this.retry(event.code);
      };
      this.conn = ws;
    }

    connectSse() {
      const source = new EventSource(new URL("/api/v1/leaderboard/stream", this.server));
      source.onmessage = (event) => this.receive(event.data, "SSE");
      source.onerror = () => {
        if (this.conn !== source) return;
        // CONNECTING: EventSource reconnects by itself (sending Last-Event-ID); CLOSED: it
        // gave up (a 503 or 403), so we retry with our own backoff.
        if (source.readyState === EventSource.CLOSED) {
          this.conn = null;
          this.retry(0);
        } else {
          this.setStatus("reconnecting");
        }
      };
      this.conn = source;
    }

    drop() {
      if (this.conn) {
        const conn = this.conn;
        this.conn = null;
        conn.close();
      }
    }

    reconnectNow() {
      if (this.conn || this.stopped) return;
      clearTimeout(this.timer);
      this.connect();
    }

    retry(code) {
      if (this.stopped) return;
      const base = RETRY_BASE_MS[code] || 500;
      const delay = Math.min(RETRY_MAX_MS, base * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt = Math.min(this.attempt + 1, 8);
      this.setStatus(this.attempt > 3 ? "offline" : "reconnecting");
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.connect(), delay);
    }

    setStatus(state) {
      const labels = { live: "Live", connecting: "Connecting", reconnecting: "Reconnecting", offline: "Offline" };
      this.status.dataset.state = state;
      this.statusLabel.textContent = labels[state];
      this.dataset.state = state;
    }

    receive(data, transport) {
      let frame;
      try {
        frame = JSON.parse(data);
      } catch {
        return;
      }
      if (!frame || frame.type !== "leaderboard" || !Array.isArray(frame.top)) return;
      this.attempt = 0;
      this.setStatus("live");
      this.via.textContent = transport;
      if (this.version !== null && olderThan(frame.version, this.version)) return;
      const first = this.version === null;
      this.version = frame.version;
      this.dataset.version = frame.version;
      this.updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      this.render(frame.top, first);
    }

    makeRow(userId) {
      const li = document.createElement("li");
      li.dataset.user = userId;
      li.innerHTML = `<span class="glow"></span><span class="rank"></span><span class="avatar"></span>
        <span class="name"></span><span class="move"></span><span class="score"></span>`;
      li.querySelector(".name").textContent = userId;
      li.querySelector(".name").title = userId;
      const avatar = li.querySelector(".avatar");
      avatar.textContent = [...userId][0] || "?";
      const h = hue(userId);
      avatar.style.background = `linear-gradient(145deg, hsl(${h} 70% 58%), hsl(${(h + 40) % 360} 65% 42%))`;
      return li;
    }

    render(top, first) {
      const limit = parseInt(this.getAttribute("limit"), 10);
      const entries = limit > 0 ? top.slice(0, limit) : top;
      const animate = !first && !REDUCED_MOTION.matches;
      const before = new Map();
      if (animate) for (const [id, li] of this.rowsById) before.set(id, li.getBoundingClientRect().top);

      const shown = new Set();
      entries.forEach((entry, index) => {
        let li = this.rowsById.get(entry.user_id);
        const fresh = !li;
        if (fresh) {
          li = this.makeRow(entry.user_id);
          this.rowsById.set(entry.user_id, li);
        }
        const oldRank = fresh ? null : Number(li.dataset.rank);
        const oldScore = fresh ? null : Number(li.dataset.score);
        li.dataset.rank = entry.rank;
        li.dataset.score = entry.score;
        li.querySelector(".rank").textContent = entry.rank;
        li.querySelector(".score").textContent = FORMAT.format(entry.score);
        if (animate) {
          if (fresh) this.badge(li, "new", "NEW");
          else if (entry.rank < oldRank) this.badge(li, "up", `▲${oldRank - entry.rank}`);
          else if (entry.rank > oldRank) this.badge(li, "down", `▼${entry.rank - oldRank}`);
          if (!fresh && entry.score !== oldScore) {
            li.querySelector(".glow").animate([{ opacity: 1 }, { opacity: 0 }], { duration: 1400, easing: "ease-out" });
          }
        }
        if (this.list.children[index] !== li) this.list.insertBefore(li, this.list.children[index] || null);
        shown.add(entry.user_id);
      });
      for (const [id, li] of this.rowsById) {
        if (!shown.has(id)) {
          this.rowsById.delete(id);
          li.remove();
        }
      }
      this.empty.hidden = entries.length > 0;
      const size = limit > 0 ? Math.min(limit, top.length) : top.length;
      this.shadowRoot.querySelector(".sub").textContent = size ? `Top ${size} · live` : "Live";
      if (animate) this.slide(before);
    }

    badge(li, kind, text) {
      const move = li.querySelector(".move");
      move.className = `move ${kind}`;
      move.textContent = text;
      move.getAnimations().forEach((a) => a.cancel());
      move.animate([{ opacity: 1 }, { opacity: 1, offset: 0.75 }, { opacity: 0 }], { duration: 3500, fill: "forwards" });
    }

    // FLIP: every row starts where it was and slides to its new place.
    slide(before) {
      for (const [id, li] of this.rowsById) {
        const top = before.get(id);
        if (top === undefined) {
          li.animate([{ opacity: 0, transform: "translateY(10px) scale(.98)" }, { opacity: 1, transform: "none" }],
            { duration: 450, easing: "ease-out" });
          continue;
        }
        const dy = top - li.getBoundingClientRect().top;
        if (dy) {
          li.animate([{ transform: `translateY(${dy}px)` }, { transform: "none" }],
            { duration: 550, easing: "cubic-bezier(.2,.8,.2,1)" });
        }
      }
    }
  }

  if (!customElements.get("score-leaderboard")) customElements.define("score-leaderboard", ScoreLeaderboard);
})();
