// The web client across failures: chatd killed with SIGKILL and restarted on the same port,
// a message typed while the server is down or the connection silent (and kept across a
// reload), a message sent while one reader is away, an acknowledgement lost on the wire, a
// store that refuses a write, a connection that goes silent without closing, and a node
// that closes every socket at once. Nothing may be lost and nothing may be shown or stored
// twice.

import { spawn } from 'node:child_process';
import path from 'node:path';
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Chatd, freePort, launchBrowser, msg, openPage, requireBinaries, shot, signIn, until, waitStatus,
} from './harness.mjs';

let chatd;
let browser;
const pages = [];

async function person(user, chat, setup) {
  const page = await openPage(browser, chatd.base);
  pages.push(page);
  if (setup) await setup(page);
  await signIn(page, user, chat);
  return page;
}

async function send(page, text) {
  await page.locator('#input').fill(text);
  await page.locator('#input').press('Enter');
}

const copies = (list, text) => list.filter((m) => m.message === text).length;

before(async () => {
  requireBinaries();
  chatd = new Chatd({ name: 'chatd-reconnect' });
  await chatd.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await chatd?.stop();
  for (const p of pages) assert.deepEqual(p.errors, [], 'no uncaught error in any page');
});

test('SIGKILL and a restart on the same port: reconnecting, then nothing lost or doubled',
  async () => {
    const alice = await person('alice', 'resume');
    const bob = await person('bob', 'resume');
    await send(alice, 'before the crash');
    await msg(bob, 'before the crash').waitFor();
    await send(bob, 'bob before the crash');
    await msg(alice, 'bob before the crash').waitFor();

    await chatd.kill('SIGKILL');
    await waitStatus(alice, 'reconnecting');
    await waitStatus(bob, 'reconnecting');

    // Typed while the server is gone: shown greyed as pending, kept for the reconnect.
    await send(alice, 'typed while offline');
    const pending = alice.locator('#pending li.msg.pending', { hasText: 'typed while offline' });
    await pending.waitFor();
    await pending.locator('.note', { hasText: 'waiting for the connection' }).waitFor();
    const opacity = await pending.locator('.bubble').evaluate((e) => getComputedStyle(e).opacity);
    assert.ok(Number(opacity) < 1, `a pending message is greyed (opacity ${opacity})`);
    await shot(alice, 'reconnecting');

    // Keep Alice away while Bob talks, so what he says must reach her through the replay.
    await alice.context().setOffline(true);
    await waitStatus(alice, 'offline');
    await chatd.start();
    await waitStatus(bob, 'connected');
    await send(bob, 'sent while alice was away');
    await msg(bob, 'sent while alice was away').waitFor();
    // An edit of a message Alice had already seen: older than her since=, so not replayed.
    const old = msg(bob, 'bob before the crash');
    const oldId = await old.getAttribute('data-id');
    await old.hover();
    await old.locator('button.edit').click();
    await bob.locator(`li[data-id="${oldId}"] .edit-form textarea`).fill('bob, edited meanwhile');
    await bob.locator(`li[data-id="${oldId}"] .edit-form textarea`).press('Enter');
    await msg(bob, 'bob, edited meanwhile').locator('.edited').waitFor();

    await alice.context().setOffline(false);
    await waitStatus(alice, 'connected');
    await msg(alice, 'sent while alice was away').waitFor();
    await msg(alice, 'bob, edited meanwhile').locator('.edited').waitFor();
    await msg(alice, 'typed while offline').waitFor();
    await pending.waitFor({ state: 'detached' });
    await msg(bob, 'typed while offline').waitFor();

    for (const p of [alice, bob]) {
      for (const t of ['before the crash', 'typed while offline', 'sent while alice was away']) {
        assert.equal(await msg(p, t).count(), 1, `one copy of "${t}" on the page`);
      }
    }
    // Alice's message is stored when she comes back, after Bob's; both pages show that order.
    const order = ['before the crash', 'bob, edited meanwhile', 'sent while alice was away',
      'typed while offline'];
    const history = await chatd.history(await chatd.token('alice'), 'resume');
    assert.deepEqual(history.map((m) => m.message), order);
    for (const p of [alice, bob]) {
      assert.deepEqual(await p.locator('#messages li.msg .text').allTextContents(), order);
    }
    await shot(alice, 'after-restart');
  });

test('an acknowledgement lost on the wire: resent with the same client_id, stored once',
  async () => {
    // Carol's first socket carries her message to the server, then loses the echo and closes
    // as if the node restarted (1012). Every frame the page sends is recorded per socket.
    const sent = [];
    let sockets = 0;
    const route = (page) => page.routeWebSocket(/\/ws\/chat\/acks/, (ws) => {
      const n = ++sockets;
      const server = ws.connectToServer();
      ws.onMessage((m) => {
        sent.push({ n, frame: JSON.parse(m) });
        server.send(m);
      });
      server.onMessage((m) => {
        if (n === 1 && m.includes('ack lost once')) {
          ws.close({ code: 1012, reason: 'test: the ack is lost' });
          server.close();
          return;
        }
        ws.send(m);
      });
    });
    const carol = await person('carol', 'acks', route);
    const dave = await person('dave', 'acks');
    await send(carol, 'ack lost once');
    await msg(dave, 'ack lost once').waitFor();
    await msg(carol, 'ack lost once').waitFor();
    await carol.locator('#pending li').first().waitFor({ state: 'detached' });
    await waitStatus(carol, 'connected');

    const first = sent.find((s) => s.n === 1 && s.frame.message === 'ack lost once');
    const again = sent.find((s) => s.n > 1 && s.frame.message === 'ack lost once');
    assert.ok(first && again, 'the message went out on the first socket and again after');
    assert.equal(again.frame.client_id, first.frame.client_id, 'the retry reuses the client_id');

    await send(carol, 'and life goes on');
    await msg(dave, 'and life goes on').waitFor();
    assert.equal(await msg(dave, 'ack lost once').count(), 1);
    assert.equal(await msg(carol, 'ack lost once').count(), 1);
    const history = await chatd.history(await chatd.token('carol'), 'acks');
    assert.equal(copies(history, 'ack lost once'), 1, 'stored exactly once');
    assert.equal(copies(history, 'and life goes on'), 1);
  });

test('the page connects to the node /api/connect names, and to its own host if that fails',
  async () => {
    const dead = await freePort();
    const lookup = (answer) => async (page) => {
      page.sockets = [];
      page.on('websocket', (ws) => page.sockets.push(new URL(ws.url()).host));
      await page.route('**/api/connect?*', (route) => {
        assert.equal(route.request().headers().authorization?.startsWith('Bearer '), true);
        route.fulfill({ json: { url: answer() } });
      });
    };
    // Frank is sent to this node under another name: the page must use the URL it is given.
    const frank = await person('frank', 'nodes', lookup(() => `ws://localhost:${chatd.port}`));
    assert.deepEqual(frank.sockets, [`localhost:${chatd.port}`]);
    // Erin is sent to a node that is gone: the next attempt goes to the page's own host.
    const erin = await person('erin', 'nodes', lookup(() => `ws://127.0.0.1:${dead}`));
    assert.deepEqual(erin.sockets, [`127.0.0.1:${dead}`, `127.0.0.1:${chatd.port}`]);
    await send(erin, 'found my way');
    await msg(frank, 'found my way').waitFor();
  });

test('a message typed while the connection is down survives a reload, then is sent once',
  async () => {
    // Gina's sockets go through a route that can turn them into black holes (nothing passes
    // either way, nothing closes) while the page itself still loads, so a reload is possible.
    // Her heartbeat gives a silent socket up within a second and tries another.
    let hole = false;
    const route = async (page) => {
      await page.addInitScript(() => {
        globalThis.CHAT_HEARTBEAT_MS = 300;
        globalThis.CHAT_HEARTBEAT_TIMEOUT_MS = 400;
      });
      await page.routeWebSocket(/\/ws\/chat\/reload-outbox/, (ws) => {
        const server = ws.connectToServer();
        ws.onMessage((m) => { if (!hole) server.send(m); });
        server.onMessage((m) => { if (!hole) ws.send(m); });
      });
    };
    const gina = await person('gina', 'reload-outbox', route);
    const hal = await person('hal', 'reload-outbox');
    await send(gina, 'gina is here');
    await msg(hal, 'gina is here').waitFor();

    hole = true;
    await send(gina, 'typed, then the tab reloaded');
    const pending = gina.locator('#pending li.msg.pending',
      { hasText: 'typed, then the tab reloaded' });
    await pending.waitFor();
    await waitStatus(gina, 'reconnecting');

    // The page is gone and comes back: the unsent message is still there, still pending.
    await gina.reload();
    await msg(gina, 'gina is here').waitFor();
    await pending.waitFor();
    await waitStatus(gina, 'reconnecting');
    assert.equal(await msg(hal, 'typed, then the tab reloaded').count(), 0);
    assert.equal(await msg(gina, 'typed, then the tab reloaded').count(), 0, 'not acknowledged');

    hole = false;
    await msg(gina, 'typed, then the tab reloaded').waitFor({ timeout: 30000 });
    await pending.waitFor({ state: 'detached' });
    await msg(hal, 'typed, then the tab reloaded').waitFor();
    for (const p of [gina, hal]) {
      assert.equal(await msg(p, 'typed, then the tab reloaded').count(), 1);
    }
    const history = await chatd.history(await chatd.token('gina'), 'reload-outbox');
    assert.equal(copies(history, 'typed, then the tab reloaded'), 1, 'stored exactly once');
  });

test('a store failure says so with Retry, and Retry sends it once the store is back',
  async () => {
    const ivy = await person('ivy', 'store-down');
    const jon = await person('jon', 'store-down');
    await send(ivy, 'before the lock');
    await msg(jon, 'before the lock').waitFor();

    // Another process takes the database's write lock and keeps it past chatd's 5 s busy
    // deadline: the append fails, and the sender is told so (error store_unavailable).
    const holder = spawn('python3', ['-c', `
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
`, path.join(chatd.dir, 'chat.db')], { stdio: ['pipe', 'pipe', 'inherit'] });
    try {
      await new Promise((resolve, reject) => {
        holder.stdout.on('data', (d) => { if (String(d).includes('locked')) resolve(); });
        holder.once('exit', (code) => reject(new Error(`the lock holder exited (${code})`)));
      });
      await send(ivy, 'stored on the second try');
      const failed = ivy.locator('#pending li.msg.failed', { hasText: 'stored on the second try' });
      await failed.waitFor({ timeout: 20000 });
      await failed.locator('.note', { hasText: /^not sent: / }).waitFor();
      assert.equal(await msg(jon, 'stored on the second try').count(), 0,
        'nothing that was not stored is delivered');
    } finally {
      holder.stdin.end();
      await new Promise((resolve) => (holder.exitCode !== null ? resolve()
        : holder.once('exit', resolve)));
    }

    await ivy.locator('#pending li.msg.failed button.retry', { hasText: 'Retry' }).click();
    await msg(ivy, 'stored on the second try').waitFor();
    await msg(jon, 'stored on the second try').waitFor();
    await ivy.locator('#pending li').first().waitFor({ state: 'detached' });
    assert.equal(await msg(ivy, 'stored on the second try').count(), 1);
    const history = await chatd.history(await chatd.token('ivy'), 'store-down');
    assert.equal(copies(history, 'stored on the second try'), 1, 'stored exactly once');
    assert.deepEqual(history.map((m) => m.message), ['before the lock', 'stored on the second try']);
  });

test('a connection that goes silent without closing is found by the heartbeat and replaced',
  async () => {
    // Kate's first socket turns into a black hole (nothing passes either way, nothing
    // closes), as after a laptop sleeps or a network drops its packets. Her page pings when
    // the server has been quiet for 400 ms and gives up 600 ms after an unanswered ping.
    const frames = [];
    let sockets = 0;
    let hole = false;
    const route = async (page) => {
      await page.addInitScript(() => {
        globalThis.CHAT_HEARTBEAT_MS = 400;
        globalThis.CHAT_HEARTBEAT_TIMEOUT_MS = 600;
      });
      await page.routeWebSocket(/\/ws\/chat\/heartbeat/, (ws) => {
        const n = ++sockets;
        const server = ws.connectToServer();
        ws.onMessage((m) => {
          frames.push({ n, frame: JSON.parse(m) });
          if (!(hole && n === 1)) server.send(m);
        });
        server.onMessage((m) => {
          if (!(hole && n === 1)) ws.send(m);
        });
      });
    };
    const kate = await person('kate', 'heartbeat', route);
    const leo = await person('leo', 'heartbeat');
    await send(kate, 'kate is here');
    await msg(leo, 'kate is here').waitFor();
    // While the server answers, pings come back as pongs and nothing else happens.
    // Three pings in a row on the first socket: each was answered in time, or the page
    // would have given the socket up 600 ms after the first.
    await until(() => frames.filter((f) => f.n === 1 && f.frame.event === 'ping').length >= 3,
      { what: 'three pings on the healthy socket' });
    await waitStatus(kate, 'connected');
    assert.equal(sockets, 1, 'no reconnect while pongs come back');

    hole = true;
    await send(kate, 'sent into the void');
    await until(() => sockets >= 2, { what: 'a second socket after the silence' });
    await waitStatus(kate, 'connected');
    await msg(leo, 'sent into the void').waitFor();
    await msg(kate, 'sent into the void').waitFor();
    await kate.locator('#pending li').first().waitFor({ state: 'detached' });
    assert.equal(await msg(leo, 'sent into the void').count(), 1);
    assert.equal(await msg(kate, 'sent into the void').count(), 1);
    assert.equal(await kate.locator('#messages li.msg').count(), 2, 'no pong shown as a message');
    const history = await chatd.history(await chatd.token('kate'), 'heartbeat');
    assert.equal(copies(history, 'sent into the void'), 1, 'stored exactly once');
  });

test('a node that accepts and closes at once is retried with a growing backoff', async () => {
  // Mia's route answers every new socket itself and closes it with 1012 at once (a node that
  // restarts in a loop). Each of those sockets did open, but none stayed: the backoff must
  // keep growing instead of starting over four times a second.
  let flap = false;
  let live = null;
  let flaps = 0;
  const route = (page) => page.routeWebSocket(/\/ws\/chat\/flap/, (ws) => {
    if (flap) {
      // Opened (a route that does not connect to the server answers the handshake itself),
      // then closed a moment later.
      flaps++;
      setTimeout(() => ws.close({ code: 1012, reason: 'test: restarting' }), 50);
      return;
    }
    live = ws;
    ws.connectToServer();
  });
  const mia = await person('mia', 'flap', route);
  const ned = await person('ned', 'flap');
  flap = true;
  await live.close({ code: 1012, reason: 'test: restarting' });
  await new Promise((r) => setTimeout(r, 2500));
  // 125-250, 250-500, 500-1000, 1000-2000 ms: at most five tries in 2.5 s (ten or more
  // without the backoff).
  assert.ok(flaps >= 2 && flaps <= 5, `${flaps} sockets in 2.5 s`);
  flap = false;
  await waitStatus(mia, 'connected', 30000);
  await send(mia, 'back after the flapping');
  await msg(ned, 'back after the flapping').waitFor();
});
