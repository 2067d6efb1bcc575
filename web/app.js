// The chat page: sign-in, the chat picker, history paging, the live message list and the
// composer. The one idea: every piece of user data reaches the page through textContent or
// an attribute, never as markup, and the list is keyed by message id so an event seen twice
// (history, replay, live, acknowledgement) only ever updates one row.

import { ChatConnection, idLess } from './connection.js';

const PAGE = 50;
const MAX_TEXT_BYTES = 60000;        // under the server's default 64 KiB frame limit
const CHAT_ID_RE = /^(?!\.\.?$)[A-Za-z0-9_.-]{1,128}$/;  // the server's rule: not . or ..
const $ = (id) => document.getElementById(id);

const el = {
  status: $('status'), who: $('who'), whoName: $('who-name'), signout: $('signout'),
  menu: $('menu'), signinView: $('signin-view'), signinForm: $('signin-form'),
  signinName: $('signin-name'), signinError: $('signin-error'), tokenForm: $('token-form'),
  tokenInput: $('token-input'), tokenError: $('token-error'), tokenLink: $('token-link'),
  chatView: $('chat-view'), joinForm: $('join-form'), joinId: $('join-id'),
  joinError: $('join-error'), recent: $('recent'), chat: $('chat'), empty: $('empty'),
  title: $('chat-title'), scroller: $('scroller'), historyState: $('history-state'),
  messages: $('messages'), pending: $('pending'), jump: $('jump'), composer: $('composer'),
  input: $('input'), announce: $('announce'), composerError: $('composer-error'),
  searchForm: $('search-form'), searchQ: $('search-q'), search: $('search'),
  searchState: $('search-state'), searchList: $('search-list'), searchMore: $('search-more'),
  searchClose: $('search-close'), online: $('online'), typing: $('typing'),
};

let session = loadSession();
let cur = null;                      // the joined chat, see join()

// ---- storage -----------------------------------------------------------------------------

function loadSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem('chat.session'));
    if (s && typeof s.user === 'string' && typeof s.token === 'string') return s;
  } catch { /* corrupt: sign in again */ }
  return null;
}

function recentChats() {
  try {
    const r = JSON.parse(localStorage.getItem('chat.recent'));
    return Array.isArray(r) ? r.filter((x) => typeof x === 'string' && CHAT_ID_RE.test(x)) : [];
  } catch { return []; }
}

function addRecent(id) {
  const r = [id, ...recentChats().filter((x) => x !== id)].slice(0, 12);
  try { localStorage.setItem('chat.recent', JSON.stringify(r)); } catch { /* full or off */ }
  renderRecent();
}

const outboxKey = (chatId) => `chat.outbox:${session.user}:${chatId}`;

function loadOutbox(chatId) {
  try {
    const o = JSON.parse(sessionStorage.getItem(outboxKey(chatId)));
    return Array.isArray(o) ? o.filter((f) => f && f.event === 'message:message' &&
      typeof f.client_id === 'string' && typeof f.message === 'string') : [];
  } catch { return []; }
}

function saveOutbox() {
  if (!cur || !cur.conn) return;
  const p = cur.conn.pendingMessages();
  try {
    if (p.length) sessionStorage.setItem(outboxKey(cur.id), JSON.stringify(p));
    else sessionStorage.removeItem(outboxKey(cur.id));
  } catch { /* storage full: the page still holds them */ }
}

// ---- time and small helpers --------------------------------------------------------------

const fmtTime = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const fmtDay = new Intl.DateTimeFormat(undefined,
  { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
const fmtFull = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });

function timeEl(iso) {
  const t = document.createElement('time');
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return t;
  t.dateTime = iso;
  t.title = fmtFull.format(d);
  t.textContent = d.toDateString() === new Date().toDateString() ? fmtTime.format(d)
                                                                  : fmtDay.format(d);
  return t;
}

function h(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(text, cls, label) {
  const b = h('button', cls, text);
  b.type = 'button';
  if (label) b.setAttribute('aria-label', label);
  return b;
}

// A stable colour per name (FNV-1a), one of 12 hues far enough apart to tell people apart.
function hue(name) {
  let x = 2166136261;
  for (const c of name) x = Math.imul(x ^ c.codePointAt(0), 16777619) >>> 0;
  return (x % 12) * 30;
}

function newClientId() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  const b = crypto.getRandomValues(new Uint8Array(12));
  return 'c-' + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function jwtSubject(token) {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    if (typeof claims.exp === 'number' && claims.exp * 1000 < Date.now()) return { expired: true };
    return typeof claims.sub === 'string' && claims.sub ? { sub: claims.sub } : null;
  } catch { return null; }
}

async function api(path, opts = {}) {
  const r = await fetch(path, {
    ...opts,
    headers: { Authorization: 'Bearer ' + session.token, ...(opts.headers || {}) },
  });
  if (!r.ok) {
    const err = new Error(`HTTP ${r.status}`);
    err.status = r.status;
    try { err.detail = (await r.json()).detail; } catch { /* not JSON */ }
    throw err;
  }
  return r.json();
}

// ---- sign-in -----------------------------------------------------------------------------

function showSignedIn() {
  const signedIn = !!session;
  el.signinView.hidden = signedIn;
  el.chatView.hidden = !signedIn;
  el.who.hidden = !signedIn;
  if (signedIn) {
    el.whoName.textContent = session.user;
    renderRecent();
    route();
  } else {
    leave();
    setStatus('', '');
    document.title = 'Scalable-Chat';
    el.signinName.focus();
  }
}

// dev: the token came from POST /api/dev/token, which can mint the next one before exp.
function signIn(user, token, dev = false) {
  session = { user, token, dev };
  sessionStorage.setItem('chat.session', JSON.stringify(session));
  el.signinError.textContent = el.tokenError.textContent = '';
  showSignedIn();
}

function signOut(reason) {
  sessionStorage.removeItem('chat.session');
  session = null;
  showSignedIn();
  if (reason) el.signinError.textContent = reason;
}

function showTokenForm() {
  el.tokenForm.hidden = false;
  el.tokenInput.focus();
}

el.signinForm.addEventListener('submit', async (e) => {
  e.preventDefault();
  const user = el.signinName.value.trim();
  if (!user || new TextEncoder().encode(user).length > 64 || /[\x00-\x1f\x7f]/.test(user)) {
    el.signinError.textContent = 'A name is 1 to 64 bytes, without control characters.';
    return;
  }
  el.signinError.textContent = '';
  try {
    const r = await fetch('/api/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(devTokenBody(user)),
    });
    if (r.status === 404 || r.status === 405) {
      el.signinError.textContent = 'This server does not issue tokens: paste one below.';
      showTokenForm();
      return;
    }
    const j = await r.json();
    if (!r.ok) throw new Error(j.detail || `HTTP ${r.status}`);
    signIn(j.user, j.token, true);
  } catch (err) {
    el.signinError.textContent = 'Sign-in failed: ' + err.message;
  }
});

// The dev endpoint's request; tests shorten the token's life through CHAT_DEV_TOKEN_TTL.
function devTokenBody(user) {
  const ttl = globalThis.CHAT_DEV_TOKEN_TTL;
  return Number.isInteger(ttl) ? { user, ttl } : { user };
}

// A new token for the same user from the dev endpoint (dev sign-in only), kept in the session
// so that REST calls and reconnects use it too. Null if it cannot be had.
async function refreshDevToken() {
  if (!session || !session.dev) return null;
  const user = session.user;
  const r = await fetch('/api/dev/token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(devTokenBody(user)),
  });
  if (!r.ok) return null;
  const j = await r.json();
  if (!session || session.user !== user || j.user !== user || typeof j.token !== 'string') {
    return null;
  }
  session.token = j.token;
  sessionStorage.setItem('chat.session', JSON.stringify(session));
  return j.token;
}

el.tokenLink.addEventListener('click', showTokenForm);

el.tokenForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const token = el.tokenInput.value.trim();
  const claims = jwtSubject(token);
  if (!claims) el.tokenError.textContent = 'That is not a token (expected a JWT with a "sub").';
  else if (claims.expired) el.tokenError.textContent = 'That token has expired.';
  else signIn(claims.sub, token);
});

el.signout.addEventListener('click', () => signOut(''));

// ---- chat picker and routing -------------------------------------------------------------

function chatFromUrl() {
  const m = /^#\/chat\/(.+)$/.exec(location.hash);
  if (!m) return null;
  try { return decodeURIComponent(m[1]); } catch { return m[1]; }
}

function chatHref(id) {
  return '#/chat/' + encodeURIComponent(id);
}

function renderRecent() {
  const items = recentChats().map((id) => {
    const li = h('li');
    const a = h('a', null, '#' + id);
    a.href = chatHref(id);
    if (cur && cur.id === id) a.setAttribute('aria-current', 'page');
    const n = unreadBadge(id);
    if (n) {
      const badge = h('span', 'badge', n);
      badge.setAttribute('aria-label', `${n} unread`);
      a.append(' ', badge);
    }
    li.append(a);
    return li;
  });
  el.recent.replaceChildren(...items);
  if (!items.length) el.recent.append(h('li', 'hint', 'Chats you join appear here.'));
}

function route() {
  if (!session) return;
  const id = chatFromUrl();
  if (id === null) {
    leave();
    return;
  }
  if (!CHAT_ID_RE.test(id)) {
    leave();
    el.joinError.textContent = 'A chat id is 1 to 128 of A-Z a-z 0-9 _ . - (not . or ..)';
    return;
  }
  if (!cur || cur.id !== id) join(id);
  setMenu(false);
}

el.joinForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const id = el.joinId.value.trim();
  if (!CHAT_ID_RE.test(id)) {
    el.joinError.textContent = 'A chat id is 1 to 128 of A-Z a-z 0-9 _ . - (not . or ..)';
    el.joinId.focus();
    return;
  }
  el.joinError.textContent = '';
  el.joinId.value = '';
  if (chatFromUrl() === id) route();
  else location.hash = chatHref(id);
});

function setMenu(open) {
  document.body.classList.toggle('menu-open', open);
  el.menu.setAttribute('aria-expanded', String(open));
}

el.menu.addEventListener('click', () => setMenu(!document.body.classList.contains('menu-open')));
el.recent.addEventListener('click', (e) => { if (e.target.closest('a')) setMenu(false); });
addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && document.body.classList.contains('menu-open')) {
    setMenu(false);
    el.menu.focus();
  }
});

addEventListener('hashchange', route);

// ---- connection state --------------------------------------------------------------------

const STATUS_TEXT = {
  connecting: 'connecting…', connected: 'connected', reconnecting: 'reconnecting…',
  offline: 'offline', disconnected: 'disconnected',
};

function setStatus(state, detail) {
  el.status.dataset.state = state || 'idle';
  el.status.textContent = STATUS_TEXT[state] || '';
  el.status.title = detail || '';
  el.chat.dataset.conn = state || 'idle';
  for (const li of el.pending.children) pendingNote(li);
}

// ---- the message list --------------------------------------------------------------------

function nearBottom() {
  const s = el.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function toBottom() {
  el.scroller.scrollTop = el.scroller.scrollHeight;
  el.jump.hidden = true;
}

// Inside the span of history this page holds, where an event about an unseen id belongs.
function inLoadedRange(id) {
  return cur.nextBefore === null || (cur.oldest !== null && idLess(cur.oldest, id));
}

function renderMessage(m, li) {
  const own = m.user_from === session.user;
  li.className = 'msg' + (own ? ' own' : '') + (m.deleted ? ' deleted' : '');
  li.dataset.id = m.message_id;
  const avatar = h('span', 'avatar', (m.user_from || '?').slice(0, 1).toUpperCase());
  avatar.setAttribute('aria-hidden', 'true');
  avatar.style.setProperty('--hue', hue(m.user_from || ''));
  const bubble = h('div', 'bubble');
  const meta = h('div', 'meta');
  meta.append(h('span', 'author', m.user_from), ' ', timeEl(m.created_at));
  if (m.edited_at && !m.deleted) {
    const ed = h('span', 'edited', '(edited)');
    ed.title = 'edited ' + fmtFull.format(new Date(m.edited_at));
    meta.append(' ', ed);
  }
  bubble.append(meta);
  if (m.deleted) {
    bubble.append(h('p', 'text', 'message deleted'));
  } else {
    const p = h('p', 'text', m.saving ?? m.message);
    if (m.saving !== undefined) p.classList.add('saving');
    bubble.append(p);
  }
  li.replaceChildren(avatar, bubble);
  if (own && !m.deleted) {
    const actions = h('div', 'actions');
    const edit = button('Edit', 'edit', 'Edit message');
    const del = button('Delete', 'delete', 'Delete message');
    edit.addEventListener('click', () => startEdit(li));
    del.addEventListener('click', () => askDelete(del, li));
    del.addEventListener('blur', () => resetDelete(del));
    actions.append(edit, del);
    li.append(actions);
  }
}

// Apply what an event or a history row says about a message. Later states win: a deletion is
// final, and an edit replaces the text only if it is not older than the one shown.
function upsert(m, { fromHistory = false } = {}) {
  const id = String(m.message_id);
  const deleted = m.deleted === true || !!m.deleted_at || m.event === 'message:delete';
  const have = cur.msgs.get(id);
  if (!have) {
    if (!fromHistory && m.event !== 'message:message' && !inLoadedRange(id)) return null;
    const rec = { message_id: id, user_from: m.user_from, message: deleted ? '' : m.message,
      created_at: m.created_at, edited_at: m.edited_at, deleted };
    const li = h('li');
    rec.li = li;
    cur.msgs.set(id, rec);
    renderMessage(rec, li);
    insertSorted(li, id);
    if (cur.oldest === null || idLess(id, cur.oldest)) cur.oldest = id;
    return rec;
  }
  if (have.deleted) return have;
  if (deleted) {
    Object.assign(have, { deleted: true, message: '', saving: undefined });
  } else if (m.edited_at && (!have.edited_at || have.edited_at <= m.edited_at)) {
    have.edited_at = m.edited_at;
    have.message = m.message;
    if (have.saving === m.message) have.saving = undefined;
  } else {
    return have;
  }
  if (have.li.classList.contains('editing') && !have.deleted) return have;
  renderMessage(have, have.li);
  return have;
}

function insertSorted(li, id) {
  const list = el.messages;
  let after = list.lastElementChild;
  // (the "New messages" line has no id: placeLine puts it back where it belongs)
  while (after && (!after.dataset.id || idLess(id, after.dataset.id))) {
    after = after.previousElementSibling;
  }
  if (after) after.after(li);
  else list.prepend(li);
}

function pendingNote(li) {
  const note = li.querySelector('.note');
  if (!note) return;
  if (li.classList.contains('failed')) return;
  note.textContent = el.status.dataset.state === 'connected'
    ? 'sending…' : 'not sent yet: waiting for the connection';
}

function showPending(frame) {
  const li = h('li', 'msg own pending');
  li.dataset.clientId = frame.client_id;
  const bubble = h('div', 'bubble');
  const meta = h('div', 'meta');
  meta.append(h('span', 'author', session.user), ' ', h('span', 'note'));
  bubble.append(meta, h('p', 'text', frame.message));
  li.append(bubble);
  el.pending.append(li);
  cur.pendingEls.set(frame.client_id, li);
  pendingNote(li);
}

function markFailed(clientId, detail) {
  const li = cur.pendingEls.get(clientId);
  if (!li) return;
  li.classList.add('failed');
  const note = li.querySelector('.note');
  note.textContent = 'not sent: ' + detail;
  if (cur.conn.outbox.has(clientId) && !li.querySelector('.retry')) {
    const retry = button('Retry', 'retry');
    retry.addEventListener('click', () => {
      li.classList.remove('failed');
      retry.remove();
      pendingNote(li);
      cur.conn.resend(clientId);
    });
    note.after(' ', retry);
  } else if (!cur.conn.outbox.has(clientId)) {
    const dismiss = button('Dismiss', 'retry');
    dismiss.addEventListener('click', () => {
      li.remove();
      cur.pendingEls.delete(clientId);
    });
    note.after(' ', dismiss);
  }
}

// ---- edit and delete ---------------------------------------------------------------------

function startEdit(li) {
  const rec = cur.msgs.get(li.dataset.id);
  if (!rec || rec.deleted || li.classList.contains('editing')) return;
  li.classList.add('editing');
  const text = li.querySelector('.text');
  const form = h('form', 'edit-form');
  const ta = h('textarea');
  ta.value = rec.saving ?? rec.message;
  ta.rows = Math.min(8, ta.value.split('\n').length + 1);
  ta.setAttribute('aria-label', 'Edit message');
  const save = h('button', 'save', 'Save');
  save.type = 'submit';
  const cancel = button('Cancel', 'cancel');
  const row = h('div', 'row');
  row.append(save, cancel);
  form.append(ta, row);
  text.replaceWith(form);
  li.querySelector('.actions')?.remove();
  const done = () => {
    li.classList.remove('editing');
    renderMessage(rec, li);
    li.querySelector('.edit')?.focus();
  };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = ta.value.trim();
    if (v && v !== (rec.saving ?? rec.message)) {
      if (new TextEncoder().encode(v).length > MAX_TEXT_BYTES) return;
      rec.saving = v;
      cur.conn.send({ event: 'message:edit', message: v, message_id: rec.message_id });
    }
    done();
  });
  cancel.addEventListener('click', done);
  ta.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    } else if (e.key === 'Escape') {
      done();
    }
  });
  ta.focus();
  ta.setSelectionRange(ta.value.length, ta.value.length);
}

function askDelete(btn, li) {
  if (!btn.classList.contains('confirm')) {
    btn.classList.add('confirm');
    btn.textContent = 'Really delete?';
    return;
  }
  const rec = cur.msgs.get(li.dataset.id);
  if (!rec) return;
  li.classList.add('deleting');
  cur.conn.send({ event: 'message:delete', message_id: rec.message_id });
}

function resetDelete(btn) {
  btn.classList.remove('confirm');
  btn.textContent = 'Delete';
}

// ---- history -----------------------------------------------------------------------------

async function fetchPage(before) {
  const q = `limit=${PAGE}` + (before ? `&before=${before}` : '');
  return api(`/api/chats/${encodeURIComponent(cur.id)}/messages?${q}`);
}

function historyState() {
  if (cur.nextBefore === null) el.historyState.textContent = `This is the beginning of #${cur.id}.`;
  else el.historyState.textContent = cur.loadingOlder ? 'Loading older messages…' : '';
}

// The newest page, before the socket opens; returns its ids (the cursors to resume after).
async function loadLatest(c) {
  const page = await fetchPage(null);
  if (cur !== c) throw Object.assign(new Error('left'), { status: 0 });
  c.nextBefore = page.next_before ?? null;
  for (const m of page.messages) upsert(m, { fromHistory: true });
  historyState();
  toBottom();
  fillViewport();
  return page.messages.map((m) => String(m.message_id));
}

async function loadOlder() {
  const c = cur;
  if (!c || c.loadingOlder || !c.nextBefore) return;
  c.loadingOlder = true;
  historyState();
  try {
    const page = await fetchPage(c.nextBefore);
    if (cur !== c) return;
    const s = el.scroller;
    const fromBottom = s.scrollHeight - s.scrollTop;
    for (const m of page.messages) upsert(m, { fromHistory: true });
    c.nextBefore = page.next_before ?? null;
    // Keep the message the reader is looking at where it was.
    s.scrollTop = s.scrollHeight - fromBottom;
  } catch (err) {
    if (cur === c) el.historyState.textContent = 'Could not load older messages: ' + err.message;
    if (err.status === 401) signOut('Your session has expired: sign in again.');
    return;
  } finally {
    c.loadingOlder = false;
  }
  historyState();
  fillViewport();
}

// A short history does not fill the pane, so no scroll event would ever ask for more.
function fillViewport() {
  requestAnimationFrame(() => {
    if (cur && cur.nextBefore && el.scroller.scrollHeight <= el.scroller.clientHeight + 200) {
      loadOlder();
    }
  });
}

// After a reconnect, the newest page catches edits and deletes of messages older than since=.
async function refreshLatest(c) {
  try {
    const page = await fetchPage(null);
    if (cur !== c) return;
    const stick = nearBottom();
    for (const m of page.messages) upsert(m, { fromHistory: true });
    if (stick) toBottom();
    unreadChanged(c);
  } catch { /* the socket is the source of truth; this was a courtesy */ }
}

// Too much was missed for a replay: start over from the newest page, live from here on.
async function reloadHistory(c) {
  c.msgs.clear();
  c.oldest = null;
  c.nextBefore = undefined;
  el.messages.replaceChildren();
  try { await loadLatest(c); } catch { /* the next reconnect tries again */ }
  unreadChanged(c);
}

el.scroller.addEventListener('scroll', () => {
  if (el.scroller.scrollTop < 300) loadOlder();
  if (nearBottom()) el.jump.hidden = true;
  if (cur) maybeRead(cur);
}, { passive: true });

el.jump.addEventListener('click', toBottom);

// ---- events from the socket --------------------------------------------------------------

function onEvent(c, ev) {
  if (cur !== c) return;
  if (ev.chat_id && ev.chat_id !== c.id) return;
  if (ev.event === 'read') {
    onRead(c, ev);
    return;
  }
  if (ev.event === 'error') {
    if (ev.code === 'replay_too_large') reloadHistory(c);
    else if (ev.client_id && c.pendingEls.has(ev.client_id)) {
      markFailed(ev.client_id, ev.detail || ev.code);
    } else if (ev.message_id) {
      const rec = c.msgs.get(String(ev.message_id));
      if (rec) {
        rec.saving = undefined;
        rec.li.classList.remove('deleting');
        if (!rec.li.classList.contains('editing')) renderMessage(rec, rec.li);
      }
      el.composerError.textContent = ev.detail || ev.code;
    }
    saveOutbox();
    return;
  }
  if (onPresence(c, ev)) return;
  if (!['message:message', 'message:edit', 'message:delete'].includes(ev.event)) return;
  if (ev.event === 'message:message') stopTyping(c, ev.user_from);
  const stick = nearBottom();
  let mine = false;
  if (ev.event === 'message:message' && ev.client_id && ev.user_from === session.user) {
    const li = c.pendingEls.get(ev.client_id);
    if (li) {
      li.remove();
      c.pendingEls.delete(ev.client_id);
      mine = true;
    }
  }
  const isNew = !c.msgs.has(String(ev.message_id));
  const rec = upsert(ev);
  saveOutbox();
  if (!rec) return;
  if (stick || mine) toBottom();
  else if (isNew && ev.event === 'message:message') el.jump.hidden = false;
  if (isNew && ev.event === 'message:message' && ev.user_from !== session.user) {
    el.announce.textContent = `${ev.user_from}: ${ev.message}`;
  }
  unreadChanged(c);
}

// ---- who is online, who is typing -----------------------------------------------------------
// The connection asks for presence events (?presence=1) and the list on each open; typing
// shows for TYPING_SHOW_MS after the last typing event of a person (they come at most every
// 2 s while the person types) or until their message arrives.

const TYPING_SHOW_MS = 3500;
const TYPING_SEND_MS = 2000; // the server forwards at most one per 2 s anyway

const ONLINE_NAMES_MAX = 12; // a big room lists a few names and a count

function renderOnline(c) {
  const names = [...c.online].sort();
  const shown = names.slice(0, ONLINE_NAMES_MAX).join(', ');
  const more = names.length - ONLINE_NAMES_MAX;
  el.online.textContent = !names.length ? ''
    : `Online: ${shown}${more > 0 ? ` and ${more} more` : ''}`;
  el.online.title = `${names.length} online`;
}

function renderTyping(c) {
  const names = [...c.typing.keys()].filter((u) => u !== session.user).sort();
  el.typing.textContent = names.length === 0 ? ''
    : names.length === 1 ? `${names[0]} is typing…`
    : names.length <= 3 ? `${names.join(', ')} are typing…` : 'Several people are typing…';
}

function stopTyping(c, user) {
  const t = c.typing.get(user);
  if (t === undefined) return;
  clearTimeout(t);
  c.typing.delete(user);
  renderTyping(c);
}

// true if ev was a presence or typing event (handled here)
function onPresence(c, ev) {
  if (ev.event === 'presence' && Array.isArray(ev.users)) {
    c.online = new Set(ev.users);
  } else if (ev.event === 'presence:join' && typeof ev.user === 'string') {
    c.online.add(ev.user);
  } else if (ev.event === 'presence:leave' && typeof ev.user === 'string') {
    c.online.delete(ev.user);
    stopTyping(c, ev.user);
  } else if (ev.event === 'typing' && typeof ev.user_from === 'string') {
    clearTimeout(c.typing.get(ev.user_from));
    c.typing.set(ev.user_from, setTimeout(() => stopTyping(c, ev.user_from), TYPING_SHOW_MS));
    renderTyping(c);
    return true;
  } else {
    return false;
  }
  renderOnline(c);
  return true;
}

function clearPresence(c) {
  if (c) for (const t of c.typing.values()) clearTimeout(t);
  el.online.textContent = '';
  el.typing.textContent = '';
}

function typed() {
  const c = cur;
  if (!c || !c.conn || !el.input.value.trim()) return;
  const now = performance.now();
  if (now - c.typingSent < TYPING_SEND_MS) return;
  if (c.conn.sendNow({ event: 'typing' })) c.typingSent = now;
}

// ---- read positions ----------------------------------------------------------------------
// The server keeps, per chat, the newest message this person has read (GET .../read and the
// read event, which every tab of this person in the chat receives). The open chat: a "New
// messages" line above the first message from someone else after the position the chat had
// when it was opened (or when a message first arrived unseen), a badge counting what came
// unseen, and a read sent, at most one a second, whenever the newest message is on screen in
// a visible tab. The other chats of the recent list: their counts, asked of the server when
// the list is drawn, when the tab comes back into view and every 30 s.

const READ_EVERY_MS = 1000;
const UNREAD_POLL_MS = 30000;
const unreadCounts = new Map(); // chat id -> badge text for the chats not open here

function laterId(a, b) {
  if (!a) return b;
  if (!b) return a;
  return idLess(a, b) ? b : a;
}

async function loadReadPos(c) {
  try {
    const r = await api(`/api/chats/${encodeURIComponent(c.id)}/read`);
    if (cur !== c) return;
    c.readPos = laterId(c.readPos, r.message_id ? String(r.message_id) : null);
    c.readAsked = laterId(c.readAsked, c.readPos);
    if (!c.readLoaded) c.lineAfter = c.readPos;
    c.readLoaded = true;
  } catch {
    // no line this time; reads still go out (the first acknowledgement brings the position)
    if (cur === c) c.readLoaded = true;
  }
}

// Messages from others after the read position, of those this page holds: with older
// history not loaded yet and the position before it, there may be more ('+').
function localUnread(c) {
  let n = 0;
  for (const rec of c.msgs.values()) {
    if (!rec.deleted && rec.user_from !== session.user &&
        (!c.readPos || idLess(c.readPos, rec.message_id))) n++;
  }
  const more = c.nextBefore && c.readPos && c.oldest && idLess(c.readPos, c.oldest);
  return n ? String(n) + (more ? '+' : '') : '';
}

function unreadBadge(id) {
  if (cur && cur.id === id) return cur.readLoaded ? localUnread(cur) : '';
  return unreadCounts.get(id) || '';
}

function placeLine(c) {
  let line = el.messages.querySelector('li.unread-line');
  let first = null;
  if (c.lineAfter) {
    for (const li of el.messages.querySelectorAll('li.msg')) {
      if (idLess(c.lineAfter, li.dataset.id) && !li.classList.contains('own')) {
        first = li;
        break;
      }
    }
  }
  if (!first) {
    line?.remove();
    return;
  }
  if (!line) {
    line = h('li', 'unread-line', 'New messages');
    line.setAttribute('role', 'separator');
  }
  if (first.previousElementSibling !== line) first.before(line);
}

// Something changed what is unread here: a message, a read, the list loaded.
function unreadChanged(c) {
  if (cur !== c) return;
  // a message from someone else that arrives unseen, with no line shown: the line goes
  // above it
  if (!c.lineAfter && c.readLoaded && localUnread(c) && !seeing()) c.lineAfter = c.readPos || '0';
  placeLine(c);
  const n = c.readLoaded ? localUnread(c) : '';
  document.title = (n ? `(${n}) ` : '') + `#${c.id} · Scalable-Chat`;
  renderRecent();
  maybeRead(c);
}

function seeing() {
  return document.visibilityState === 'visible' && nearBottom();
}

// The newest message is on screen: tell the server (at most once per READ_EVERY_MS; the
// last one waits for the end of the interval, so the final position always goes out).
function maybeRead(c) {
  if (cur !== c || !c.readLoaded || !seeing()) return;
  const rows = el.messages.querySelectorAll('li.msg');
  const newest = rows.length ? rows[rows.length - 1].dataset.id : null;
  if (!newest || (c.readAsked && !idLess(c.readAsked, newest))) return;
  const wait = c.readAt + READ_EVERY_MS - performance.now();
  if (wait > 0) {
    if (!c.readTimer) c.readTimer = setTimeout(() => { c.readTimer = 0; maybeRead(c); }, wait);
    return;
  }
  if (c.conn.sendNow({ event: 'read', message_id: newest })) {
    c.readAsked = newest;
    c.readAt = performance.now();
  }
}

// The position moved (this tab's read acknowledged, or another tab's): the badge follows.
function onRead(c, ev) {
  if (ev.user_from && ev.user_from !== session.user) return;
  c.readPos = laterId(c.readPos, String(ev.message_id));
  c.readAsked = laterId(c.readAsked, c.readPos);
  unreadChanged(c);
}

async function refreshUnread() {
  if (!session) return;
  const ids = recentChats().filter((id) => !cur || id !== cur.id);
  await Promise.all(ids.map(async (id) => {
    try {
      const r = await api(`/api/chats/${encodeURIComponent(id)}/read`);
      unreadCounts.set(id, r.unread ? String(r.unread) + (r.unread_capped ? '+' : '') : '');
    } catch { unreadCounts.delete(id); } // e.g. a chat this token may not read
  }));
  if (session) renderRecent();
}

document.addEventListener('visibilitychange', () => {
  if (document.visibilityState !== 'visible') return;
  if (cur) maybeRead(cur);
  refreshUnread();
});
setInterval(refreshUnread, UNREAD_POLL_MS);

// ---- joining a chat ----------------------------------------------------------------------

function leave() {
  if (cur && cur.conn) cur.conn.stop();
  clearPresence(cur);
  if (cur) clearTimeout(cur.readTimer);
  cur = null;
  closeSearch();
  el.messages.replaceChildren();
  el.pending.replaceChildren();
  el.chat.hidden = true;
  el.empty.hidden = false;
  el.menu.hidden = true;
  el.jump.hidden = true;
  setStatus('', '');
  if (session) {
    renderRecent();
    refreshUnread();
  }
}

function join(id) {
  leave();
  const c = {
    id, msgs: new Map(), pendingEls: new Map(), oldest: null, nextBefore: undefined,
    loadingOlder: false, conn: null, online: new Set(), typing: new Map(), typingSent: -1e9,
    readPos: null, readAsked: null, readAt: 0, readTimer: 0, lineAfter: null, readLoaded: false,
  };
  cur = c;
  addRecent(id);
  el.chat.hidden = false;
  el.empty.hidden = true;
  el.menu.hidden = false;
  el.title.textContent = '#' + id;
  el.input.placeholder = `Message #${id}`;
  el.historyState.textContent = 'Loading…';
  el.composerError.textContent = '';
  document.title = `#${id} · Scalable-Chat`;
  const outbox = loadOutbox(id);
  c.conn = new ChatConnection({
    chatId: id, user: session.user, token: session.token, since: '0', outbox,
    hooks: {
      prepare: async () => {
        const [ids] = await Promise.all([loadLatest(c), loadReadPos(c)]);
        unreadChanged(c);
        return ids;
      },
      refreshToken: session.dev ? refreshDevToken : undefined,
      onEvent: (ev) => onEvent(c, ev),
      onState: (s, d) => { if (cur === c) setStatus(s, d); },
      onOpen: (again) => {
        // For the load-time measurement: navigation start to history shown and socket open.
        if (!performance.getEntriesByName('chat-connected').length) {
          performance.mark('chat-connected');
        }
        if (again && cur === c) refreshLatest(c);
        if (cur === c) c.conn.sendNow({ event: 'presence:get' });
        c.readAsked = c.readPos; // a read in flight on the old socket may be lost
        maybeRead(c);
      },
      onAuthError: (status) => {
        if (cur !== c) return;
        if (status === 401) signOut('Your token was refused (expired?): sign in again.');
        else {
          setStatus('disconnected', 'not allowed');
          el.historyState.textContent = `Your token does not allow chat #${id}.`;
        }
      },
    },
  });
  for (const f of outbox) showPending(f);
  c.conn.connect();
  if (matchMedia('(hover: hover)').matches) el.input.focus();
}

// ---- search ------------------------------------------------------------------------------
// One search covers every chat this person has open (the current one and the recent list)
// through GET /api/search. An answer may hold few matches and still say where to go on
// (next_before: with the scan backend a request reads a bounded slice of each chat);
// "Search older" asks for that.

let search = null; // { chats, q, nextBefore, found, busy }

// The panel takes room from the message list: a reader at the bottom stays at the bottom.
function keepBottom(change) {
  const atBottom = nearBottom();
  change();
  if (atBottom) toBottom();
}

function closeSearch() {
  search = null;
  keepBottom(() => { el.search.hidden = true; });
  el.searchList.replaceChildren();
  el.searchQ.value = '';
}

// The chats claim of our token, if it has one (for choosing what to search, not for trust:
// the server checks the token).
function tokenChats() {
  try {
    const part = session.token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(new TextDecoder().decode(
      Uint8Array.from(atob(part), (c) => c.charCodeAt(0))));
    return Array.isArray(claims.chats) ? claims.chats : null;
  } catch { return null; }
}

function searchChats() {
  const allowed = tokenChats();
  const ids = [cur.id, ...recentChats().filter((x) => x !== cur.id)];
  return ids.filter((x) => !allowed || allowed.includes(x)).slice(0, 32);
}

const ENTITIES = { '&amp;': '&', '&lt;': '<', '&gt;': '>', '&quot;': '"', '&#39;': "'" };

// The server's highlight is the text HTML-escaped, with the matched words in <em></em>.
// It is never parsed as HTML here: split at our two tags, every piece becomes a text node
// (its five entities decoded), the matches <em> elements we create ourselves.
function highlightNodes(hl) {
  const out = [];
  let inEm = false;
  for (const piece of hl.split(/(<em>|<\/em>)/)) {
    if (piece === '<em>') { inEm = true; continue; }
    if (piece === '</em>') { inEm = false; continue; }
    if (!piece) continue;
    const text = piece.replace(/&(?:amp|lt|gt|quot|#39);/g, (e) => ENTITIES[e]);
    out.push(inEm ? h('em', 'hit', text) : document.createTextNode(text));
  }
  return out;
}

function searchRow(m) {
  const li = h('li');
  li.dataset.id = m.message_id;
  li.dataset.chat = m.chat_id;
  const meta = h('div', 'meta');
  meta.append(h('span', 'author', m.user_from), ' ', timeEl(m.created_at));
  if (m.chat_id !== cur?.id) {
    const a = h('a', 'chat-tag', '#' + m.chat_id);
    a.href = chatHref(m.chat_id);
    meta.append(' ', a);
  }
  const text = h('p', 'text');
  if (typeof m.highlight === 'string') text.append(...highlightNodes(m.highlight));
  else text.textContent = m.message;
  li.append(meta, text);
  return li;
}

function searchStateText() {
  const n = search.found;
  const found = n === 0 ? 'No messages match'
    : n === 1 ? '1 message matches' : `${n} messages match`;
  const where = search.nextBefore ? ' so far; older messages may match too.' : '.';
  const chats = search.chats.length === 1 ? '' : ` in ${search.chats.length} chats`;
  return `${found} “${search.q}”${chats}${where}`;
}

async function runSearch() {
  const s = search;
  if (!s || s.busy || !cur) return;
  s.busy = true;
  el.searchMore.disabled = true;
  el.searchState.textContent = 'Searching…';
  const params = new URLSearchParams({ q: s.q, limit: '20', chats: s.chats.join(',') });
  if (s.nextBefore) params.set('before', s.nextBefore); // null until a first answer
  try {
    let r;
    try {
      r = await api(`/api/search?${params}`);
    } catch (err) {
      // A chat of the recent list that this token may not read: search the open one only.
      if (err.status !== 403 || s.chats.length === 1 || s.nextBefore) throw err;
      s.chats = [cur.id];
      params.set('chats', cur.id);
      r = await api(`/api/search?${params}`);
    }
    if (search !== s) return; // closed or replaced meanwhile
    for (const m of r.messages) el.searchList.append(searchRow(m));
    s.found += r.messages.length;
    s.nextBefore = r.next_before;
    el.searchState.textContent = searchStateText();
    el.searchMore.hidden = !s.nextBefore;
  } catch (err) {
    if (search === s) el.searchState.textContent = 'Search failed: ' + (err.detail || err.message);
    if (err.status === 401) signOut('Your session has expired: sign in again.');
  } finally {
    s.busy = false;
    if (search === s) el.searchMore.disabled = false;
  }
}

el.searchForm.addEventListener('submit', (e) => {
  e.preventDefault();
  const q = el.searchQ.value.trim();
  if (!cur || !q) { closeSearch(); return; }
  search = { chats: searchChats(), q, nextBefore: null, found: 0, busy: false };
  el.searchList.replaceChildren();
  el.searchMore.hidden = true;
  keepBottom(() => { el.search.hidden = false; });
  runSearch();
});
el.searchMore.addEventListener('click', runSearch);
el.searchClose.addEventListener('click', () => { closeSearch(); el.searchQ.focus(); });
el.search.addEventListener('keydown', (e) => {
  if (e.key === 'Escape') { closeSearch(); el.searchQ.focus(); }
});
el.searchQ.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && search) { e.preventDefault(); closeSearch(); }
});

// ---- the composer ------------------------------------------------------------------------

function sendText() {
  if (!cur) return;
  const text = el.input.value.trim();
  if (!text) return;
  if (new TextEncoder().encode(text).length > MAX_TEXT_BYTES) {
    el.composerError.textContent = `That message is too long (over ${MAX_TEXT_BYTES} bytes).`;
    return;
  }
  el.composerError.textContent = '';
  const frame = { event: 'message:message', message: text, client_id: newClientId() };
  cur.conn.send(frame);
  saveOutbox();
  showPending(frame);
  el.input.value = '';
  grow();
  toBottom();
}

function grow() {
  el.input.style.height = 'auto';
  el.input.style.height = Math.min(el.input.scrollHeight, 200) + 'px';
}

el.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  sendText();
  el.input.focus();
});

el.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendText();
  }
});

el.input.addEventListener('input', grow);
el.input.addEventListener('input', typed);

// ---- start -------------------------------------------------------------------------------

{
  // ?chat=general is the other shareable form: turn it into the hash route.
  const q = new URLSearchParams(location.search).get('chat');
  if (q && !location.hash) history.replaceState(null, '', location.pathname + chatHref(q));
}
showSignedIn();
document.body.dataset.ready = '1';
