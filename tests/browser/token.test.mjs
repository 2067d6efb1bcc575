// Token expiry in a real Chromium against the real chatd: in dev mode the page asks the dev
// endpoint for a new token before exp and hands it to the open socket (token:refresh), so the
// same socket outlives several token lifetimes; with a pasted token it cannot refresh, so at
// exp the server closes with 4001, the reconnect is refused, and the person is signed out.
// Tokens live TTL seconds (the page asks for that through CHAT_DEV_TOKEN_TTL).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Chatd, launchBrowser, msg, openPage, requireBinaries, signIn, until, waitStatus,
} from './harness.mjs';

const TTL = 4;
// exp, plus the server's sweep period (at most 5 s), plus slack for a loaded machine
const PAST_EXP_MS = (TTL + 15) * 1000;

let chatd;
let browser;
const pages = [];

before(async () => {
  requireBinaries();
  chatd = new Chatd({ name: 'chatd-token' });
  await chatd.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await chatd?.stop();
  for (const p of pages) {
    assert.deepEqual(p.errors, [], 'no uncaught error in any page');
    assert.deepEqual(p.dialogs, [], 'no dialog opened in any page');
  }
});

// A page whose sockets and their frames are recorded.
async function watchedPage(init) {
  const page = await openPage(browser, chatd.base);
  pages.push(page);
  await page.addInitScript(init.fn, init.arg);
  page.sockets = [];
  page.on('websocket', (ws) => {
    const s = { url: ws.url(), sent: [], received: [], closed: false };
    page.sockets.push(s);
    ws.on('framesent', (f) => s.sent.push(String(f.payload)));
    ws.on('framereceived', (f) => s.received.push(String(f.payload)));
    ws.on('close', () => { s.closed = true; });
  });
  return page;
}

function events(frames, name) {
  return frames.map((f) => { try { return JSON.parse(f); } catch { return {}; } })
    .filter((e) => e.event === name);
}

test('dev mode: the page refreshes its token on the open socket and stays connected past exp',
  async () => {
    const page = await watchedPage({
      fn: (ttl) => { globalThis.CHAT_DEV_TOKEN_TTL = ttl; }, arg: TTL,
    });
    await signIn(page, 'tara', 'refresh');
    const first = page.sockets[0];
    const payload = new URL(first.url).searchParams.get('token').split('.')[1];
    const firstExp = JSON.parse(Buffer.from(payload, 'base64url').toString()).exp;
    // Several refreshes: the socket outlives the first token by more than a sweep period.
    await until(() => Date.now() / 1000 > firstExp + 6 &&
      events(first.received, 'token:refreshed').some((e) => e.exp > firstExp + 2 * TTL),
    { timeout: PAST_EXP_MS + 3 * TTL * 1000, what: 'refreshes past exp' });
    assert.equal(page.sockets.length, 1, 'the same socket all along: no 4001, no reconnect');
    assert.equal(first.closed, false);
    assert.ok(events(first.sent, 'token:refresh').length >= 2);
    assert.deepEqual(events(first.received, 'error'), [], 'no refresh was refused');
    await waitStatus(page, 'connected');
    await page.locator('#input').fill('still here after exp');
    await page.locator('#input').press('Enter');
    await msg(page, 'still here after exp').waitFor();
    // The page keeps the newest token: REST calls and a reload use it.
    const token = await page.evaluate(
      () => JSON.parse(sessionStorage.getItem('chat.session')).token);
    const history = await chatd.history(token, 'refresh');
    assert.ok(history.some((m) => m.message === 'still here after exp'));
  });

test('a pasted token cannot be refreshed: closed with 4001 at exp, then signed out', async () => {
  const r = await fetch(chatd.base + '/api/dev/token', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user: 'uma', ttl: TTL }),
  });
  const { token } = await r.json();
  // signed in with a pasted token: no dev flag in the session, so the page cannot mint one
  const page = await watchedPage({
    fn: (t) => sessionStorage.setItem('chat.session', JSON.stringify({ user: 'uma', token: t })),
    arg: token,
  });
  const closes = [];
  await page.exposeFunction('recordClose', (code, reason) => closes.push([code, reason]));
  await page.addInitScript(() => {
    const Native = WebSocket;
    globalThis.WebSocket = class extends Native {
      constructor(...a) {
        super(...a);
        this.addEventListener('close', (e) => globalThis.recordClose(e.code, e.reason));
      }
    };
  });
  await page.goto(`${chatd.base}/#/chat/expiring`);
  await waitStatus(page, 'connected');
  await page.locator('#signin-error', { hasText: 'sign in again' })
    .waitFor({ timeout: PAST_EXP_MS + 10000 });
  assert.deepEqual(closes[0], [4001, 'token expired']);
  assert.equal(events(page.sockets[0].sent, 'token:refresh').length, 0);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('chat.session')), null);
});
