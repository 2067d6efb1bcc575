// One chat's live connection: asks /api/connect which node to use, resumes with ?since= the
// last id seen, reconnects with capped exponential backoff and jitter, and keeps every
// unacknowledged send in an outbox that is sent again, byte for byte, after each reconnect.
// The one idea: a send is done only when the server echoes it back; until then it is retried
// with the same client_id, and the server's dedup turns the retries into exactly one message.

const BACKOFF_START_MS = 250;
const BACKOFF_CAP_MS = 5000;
const CONNECT_LOOKUP_MS = 2000;
// A connection can die without a close (a laptop that slept, a network that drops packets):
// the browser would go on "sending" into it for minutes. After HEARTBEAT_MS without a frame
// from the server the page sends {"event":"ping"}; if nothing at all arrives within
// HEARTBEAT_TIMEOUT_MS after that, it gives the socket up and reconnects. (Tests shorten
// both through globalThis.CHAT_HEARTBEAT_MS and CHAT_HEARTBEAT_TIMEOUT_MS.)
const HEARTBEAT_MS = globalThis.CHAT_HEARTBEAT_MS || 25000;
const HEARTBEAT_TIMEOUT_MS = globalThis.CHAT_HEARTBEAT_TIMEOUT_MS || 10000;
// The backoff starts over only after a socket stayed open this long: a node that accepts and
// closes at once (restarting, overloaded) would otherwise be retried four times a second.
const STABLE_MS = 3000;
// The server closes a socket with 4001 at its token's exp unless the page sent it a newer
// token ({"event":"token:refresh"}). The page asks for one (hooks.refreshToken, the dev
// endpoint) a fifth of the token's remaining life before exp, between 1 s and 60 s ahead.
const REFRESH_LEAD_MIN_MS = 1000;
const REFRESH_LEAD_MAX_MS = 60000;
const REFRESH_RETRY_MS = 2000;
// Error codes of a refused token:refresh: the old deadline stands, the 4001 handles it.
const REFRESH_ERRORS = new Set(['bad_token', 'wrong_user', 'forbidden']);

// The exp claim of a JWT in milliseconds, 0 if it has none (or cannot be read: the server
// decides anyway).
export function tokenExpMs(token) {
  try {
    const b64 = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(new TextDecoder().decode(
      Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : 0;
  } catch { return 0; }
}

export function idLess(a, b) {
  // Ids are decimal strings of 64-bit numbers: compare by length first, then digit by digit.
  return a.length !== b.length ? a.length < b.length : a < b;
}

function ownBase() {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
}

// The least-loaded node's WebSocket base URL when the server knows one, else this page's host.
async function resolveBase(chatId, token) {
  try {
    const r = await fetch('/api/connect?chat_id=' + encodeURIComponent(chatId), {
      headers: { Authorization: 'Bearer ' + token },
      signal: AbortSignal.timeout(CONNECT_LOOKUP_MS),
    });
    if (r.ok) {
      const j = await r.json();
      if (typeof j.url === 'string' && /^wss?:\/\/[^/?#\s]+\/?$/.test(j.url)) {
        let url = j.url.replace(/\/$/, '');
        if (location.protocol === 'https:') url = url.replace(/^ws:/, 'wss:');
        return { base: url, viaLookup: true };
      }
    }
  } catch { /* no lookup service, or this node is down: try our own host */ }
  return { base: ownBase(), viaLookup: false };
}

export class ChatConnection {
  // hooks: prepare() -> ids already shown, onEvent(ev), onState(state, detail), onOpen(isReconnect),
  // onAuthError(status), and optionally refreshToken() -> a new token or null (dev mode)
  constructor({ chatId, user, token, since, outbox, hooks }) {
    this.chatId = chatId;
    this.user = user;
    this.token = token;
    this.since = since;              // highest message id seen, '0' for an empty chat
    // The newest id seen from each origin node (bits 12..21 of an id). Each node delivers its
    // own messages in id order, but messages of different nodes interleave: resuming with one
    // cursor per node cannot pass over a message another node still had in flight.
    this.cursors = new Map();
    this.hooks = hooks;
    // key -> frame exactly as sent: client_id for a message, 'e:'/'d:' + id for edit/delete.
    this.outbox = new Map(outbox ? outbox.map((f) => [f.client_id, f]) : []);
    this.ws = null;
    this.attempt = 0;
    this.timer = 0;
    this.stopped = false;
    this.everOpened = false;
    this.skipLookup = false;
    this.waiting = false;            // parked in a backoff timer or for the network
    this.beat = 0;                   // the heartbeat interval of the open socket
    this.lastRx = 0;                 // when its last frame arrived
    this.pingSent = 0;               // when the unanswered ping went out, 0 if none
    this.prepared = false;           // hooks.prepare() (the first history page) succeeded
    this.refreshTimer = 0;           // asks for a new token before exp (see planRefresh)
    this.onOnline = () => this.retryNow();
    addEventListener('online', this.onOnline);
    addEventListener('offline', this.onOnline);
  }

  seen(id) {
    if (idLess(this.since, id)) this.since = id;
    const node = Number((BigInt(id) >> 12n) & 1023n);
    const had = this.cursors.get(node);
    if (!had || idLess(had, id)) this.cursors.set(node, id);
  }

  sinceParam() {
    return this.cursors.size ? [...this.cursors.values()].join(',') : this.since;
  }

  state(s, detail = '') {
    this.hooks.onState(s, detail);
  }

  async connect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.waiting = false;
    if (!navigator.onLine) {
      this.waiting = true;
      this.state('offline', 'no network');
      return;
    }
    this.state(this.everOpened ? 'reconnecting' : 'connecting');
    if (!this.prepared) {
      // The first page of history comes before the socket, so since= joins it without a gap.
      try {
        const ids = await this.hooks.prepare();
        for (const id of ids || []) this.seen(id);
        this.prepared = true;
      } catch (err) {
        if (this.stopped) return;
        if (err.status === 401 || err.status === 403) {
          this.stop();
          this.hooks.onAuthError(err.status);
        } else {
          this.schedule(false);
        }
        return;
      }
      if (this.stopped) return;
    }
    // A node named by the lookup that just failed may still be listed: go to our own host once.
    const found = this.skipLookup ? { base: ownBase(), viaLookup: false }
                                  : await resolveBase(this.chatId, this.token);
    if (this.stopped) return;
    const url = `${found.base}/ws/chat/${encodeURIComponent(this.chatId)}` +
      `?token=${encodeURIComponent(this.token)}&since=${this.sinceParam()}&presence=1`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      this.skipLookup = found.viaLookup;
      this.schedule(false);
      return;
    }
    this.ws = ws;
    let opened = 0; // performance.now() when it opened
    ws.onopen = () => {
      opened = performance.now();
      this.watch(ws);
      const again = this.everOpened;
      this.everOpened = true;
      this.skipLookup = false;
      this.state('connected');
      this.planRefresh(ws);
      for (const frame of this.outbox.values()) ws.send(JSON.stringify(frame));
      this.hooks.onOpen(again);
    };
    ws.onmessage = (e) => {
      this.lastRx = performance.now();
      this.pingSent = 0;
      let ev;
      try { ev = JSON.parse(e.data); } catch { return; }
      if (!ev || typeof ev !== 'object' || ev.event === 'pong') return;
      if (ev.event === 'token:refreshed') { this.planRefresh(ws); return; }
      if (ev.event === 'error' && REFRESH_ERRORS.has(ev.code)) {
        console.warn('token refresh refused:', ev.code, ev.detail);
        return;
      }
      this.settle(ev);
      this.hooks.onEvent(ev);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this.beat);
      clearTimeout(this.refreshTimer);
      if (this.stopped) return;
      if (!opened) {
        this.skipLookup = found.viaLookup;
        this.checkRefusal();
        return;
      }
      if (performance.now() - opened >= STABLE_MS) this.attempt = 0;
      if (e.code === 4001) { this.reconnectExpired(); return; }
      // 1008 (policy, slow consumer) and application codes: our fault or a refusal; wait the
      // longest. 1000/1001/1006/1011/1012: the node went away or restarts; come back soon.
      const polite = e.code === 1008 || (e.code >= 4000 && e.code < 5000) ||
        e.code === 1002 || e.code === 1003 || e.code === 1007 || e.code === 1009;
      if (e.code === 4401 || e.code === 4403) {
        this.stop();
        this.hooks.onAuthError(e.code - 4000);
        return;
      }
      this.schedule(polite);
    };
  }

  // The heartbeat of an open socket (see HEARTBEAT_MS).
  watch(ws) {
    clearInterval(this.beat);
    const opened = performance.now();
    this.lastRx = opened; // monotonic: a clock stepped after a resume is no silence
    this.pingSent = 0;
    this.beat = setInterval(() => {
      if (this.ws !== ws) { clearInterval(this.beat); return; }
      const now = performance.now();
      if (this.pingSent && now - this.pingSent >= HEARTBEAT_TIMEOUT_MS) {
        // Dead without a close: forget it (its close, if it ever comes, is not ours to
        // handle) and connect again; the outbox goes out on the new socket.
        clearInterval(this.beat);
        this.ws = null;
        ws.onclose = null;
        ws.onmessage = null;
        try { ws.close(); } catch { /* already closing */ }
        if (now - opened >= STABLE_MS) this.attempt = 0;
        this.schedule(false);
      } else if (!this.pingSent && now - this.lastRx >= HEARTBEAT_MS) {
        this.pingSent = now;
        ws.send('{"event":"ping"}');
      }
    }, Math.max(100, Math.min(HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS) / 4));
  }

  // Ask for a new token before this socket's token expires and hand it to the server. Without
  // hooks.refreshToken (a pasted token) nothing can be done: the server closes with 4001.
  planRefresh(ws) {
    clearTimeout(this.refreshTimer);
    const exp = tokenExpMs(this.token);
    if (!this.hooks.refreshToken || !exp) return;
    const left = exp - Date.now();
    const lead = Math.min(REFRESH_LEAD_MAX_MS, Math.max(REFRESH_LEAD_MIN_MS, left / 5));
    const delay = Math.min(2 ** 31 - 1, Math.max(0, left - lead));
    this.refreshTimer = setTimeout(async () => {
      if (this.ws !== ws) return;
      let token = null;
      try { token = await this.hooks.refreshToken(); } catch { /* retried below */ }
      if (this.ws !== ws || this.stopped) return;
      if (!token) {
        if (Date.now() < exp) {
          this.refreshTimer = setTimeout(() => this.planRefresh(ws), REFRESH_RETRY_MS);
        }
        return;
      }
      this.token = token; // also what a reconnect uses
      ws.send(JSON.stringify({ event: 'token:refresh', token }));
    }, delay);
  }

  // Closed with 4001 (token expired): reconnect at once, with a new token if one can be had.
  // With none, the old token's handshake is refused (401) and checkRefusal signs out.
  async reconnectExpired() {
    if (this.hooks.refreshToken) {
      try {
        const token = await this.hooks.refreshToken();
        if (token) this.token = token;
      } catch { /* connect with what we have */ }
    }
    if (!this.stopped) this.connect();
  }

  // A handshake that never opened: the browser hides its HTTP status, so ask the REST API
  // with the same token whether it is the token (401/403) or just the network.
  async checkRefusal() {
    let status = 0;
    try {
      const r = await fetch(`/api/chats/${encodeURIComponent(this.chatId)}/messages?limit=1`, {
        headers: { Authorization: 'Bearer ' + this.token },
        signal: AbortSignal.timeout(CONNECT_LOOKUP_MS),
      });
      status = r.status;
    } catch { /* unreachable: keep trying */ }
    if (this.stopped) return;
    if (status === 401 || status === 403) {
      this.stop();
      this.hooks.onAuthError(status);
      return;
    }
    this.schedule(false);
  }

  schedule(polite) {
    if (this.stopped) return;
    const exp = Math.min(BACKOFF_CAP_MS, BACKOFF_START_MS * 2 ** this.attempt);
    const ceiling = polite ? BACKOFF_CAP_MS : exp;
    // Equal jitter: never less than half the step, so a crowd spreads out but still backs off.
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this.attempt++;
    this.state(navigator.onLine ? 'reconnecting' : 'offline',
      `retrying in ${(delay / 1000).toFixed(1)} s`);
    this.waiting = true;
    this.timer = setTimeout(() => this.connect(), delay);
  }

  retryNow() {
    if (this.stopped || !this.waiting) return;
    this.attempt = 0;
    this.connect();
  }

  // Remove from the outbox what this event acknowledges or refuses for good.
  settle(ev) {
    if (ev.message_id) this.seen(String(ev.message_id));
    if (ev.event === 'message:message' && ev.client_id && ev.user_from === this.user) {
      this.outbox.delete(ev.client_id);
    } else if (ev.event === 'message:edit') {
      const f = this.outbox.get('e:' + ev.message_id);
      if (f && f.message === ev.message) this.outbox.delete('e:' + ev.message_id);
    } else if (ev.event === 'message:delete') {
      this.outbox.delete('e:' + ev.message_id);
      this.outbox.delete('d:' + ev.message_id);
    } else if (ev.event === 'error') {
      if (ev.message_id && ev.code !== 'store_unavailable') {
        this.outbox.delete('e:' + ev.message_id);
        this.outbox.delete('d:' + ev.message_id);
      }
      if (ev.client_id && ev.code === 'bad_request') this.outbox.delete(ev.client_id);
    }
  }

  // Queue and, if connected, send. Edits and deletes are keyed by message so a newer edit
  // replaces an older unsent one.
  send(frame) {
    let key = frame.client_id;
    if (frame.event === 'message:edit') key = 'e:' + frame.message_id;
    if (frame.event === 'message:delete') {
      this.outbox.delete('e:' + frame.message_id);
      key = 'd:' + frame.message_id;
    }
    this.outbox.set(key, frame);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  // Send a frame that needs no retry if the socket is down (a read position: the next one
  // after the reconnect says as much; presence:get and typing). true if it went out.
  sendNow(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // Send an unacknowledged message again now (the user asked to retry after a store error).
  resend(clientId) {
    const f = this.outbox.get(clientId);
    if (f && this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(f));
  }

  pendingMessages() {
    return [...this.outbox.values()].filter((f) => f.event === 'message:message');
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.beat);
    clearTimeout(this.refreshTimer);
    removeEventListener('online', this.onOnline);
    removeEventListener('offline', this.onOnline);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = null;
      ws.close(1000);
    }
  }
}
