// The web client in a real Chromium against the real chatd: two people in one chat, edits and
// deletes, history after a reload, paging older messages, text that looks like markup, a phone
// sized screen, and sign-in with a pasted token on a server without dev tokens.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
  ARTIFACTS, CHATCTL, Chatd, ROOT, launchBrowser, msg, openPage, requireBinaries, shot, signIn,
  until, waitStatus,
} from './harness.mjs';

let chatd;
let browser;
const pages = [];

async function person(user, chat, opts) {
  const page = await openPage(browser, chatd.base, opts);
  pages.push(page);
  await signIn(page, user, chat);
  return page;
}

async function send(page, text) {
  await page.locator('#input').fill(text);
  await page.locator('#input').press('Enter');
}

before(async () => {
  requireBinaries();
  chatd = new Chatd({ name: 'chatd-chat' });
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

describe('two people in one chat', () => {
  let alice;
  let bob;

  test('a message from one appears at the other, acknowledged at the sender', async () => {
    alice = await person('alice', 'lobby');
    bob = await person('bob', 'lobby');
    await send(alice, 'hello bob');
    await msg(bob, 'hello bob').waitFor();
    assert.equal(await msg(bob, 'hello bob').locator('.author').textContent(), 'alice');
    // The sender's own copy leaves the pending list once the server echoes it.
    await msg(alice, 'hello bob').waitFor();
    await alice.locator('#pending li').first().waitFor({ state: 'detached' });
    await send(bob, 'hi alice, line one\nline two');
    await msg(alice, 'line two').waitFor();
    assert.equal(await msg(alice, 'line two').locator('.text').textContent(),
      'hi alice, line one\nline two', 'Shift+Enter would be a newline; the text keeps it');
    // The composer grows, but Enter sent it: it is empty again.
    assert.equal(await bob.locator('#input').inputValue(), '');
    await shot(alice, 'conversation');
  });

  test('Chromium negotiated permessage-deflate, and the events reached it compressed', async () => {
    const text = await (await fetch(`${chatd.base}/metrics`)).text();
    const metric = (name) => Number((text.match(new RegExp(`^${name} (\\S+)$`, 'm')) || [])[1]);
    const opened = metric('chat_websocket_opened_total');
    assert.ok(opened >= 2, `two pages connected (${opened})`);
    assert.equal(metric('chat_websocket_deflate_total'), opened,
      'every connection the web client opened negotiated permessage-deflate');
    assert.ok(metric('chat_deflate_deliveries_total') > 0, 'compressed frames were delivered');
    // and Chromium itself says so: the extension a WebSocket of the page negotiated
    const ext = await alice.evaluate(async () => {
      const r = await fetch('/api/dev/token', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ user: 'probe' }),
      });
      const { token } = await r.json();
      const ws = new WebSocket(`ws://${location.host}/ws/chat/lobby?token=${token}`);
      await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
      const got = ws.extensions;
      ws.close();
      return got;
    });
    assert.match(ext, /^permessage-deflate; server_no_context_takeover; client_no_context_takeover/);
  });

  test('Shift+Enter makes a newline instead of sending', async () => {
    await alice.locator('#input').fill('first');
    await alice.locator('#input').press('Shift+Enter');
    await alice.locator('#input').pressSequentially('second');
    assert.equal(await alice.locator('#input').inputValue(), 'first\nsecond');
    await alice.locator('#input').press('Enter');
    await msg(bob, 'second').waitFor();
    assert.equal(await msg(bob, 'second').locator('.text').textContent(), 'first\nsecond');
  });

  test('edit and delete show up on both sides', async () => {
    const id = await msg(alice, 'hello bob').getAttribute('data-id');
    const row = alice.locator(`#messages li.msg[data-id="${id}"]`);
    await row.hover();
    await row.locator('button.edit').click();
    const box = row.locator('.edit-form textarea');
    await box.fill('hello bob (fixed)');
    await box.press('Enter');
    await msg(bob, 'hello bob (fixed)').locator('.edited').waitFor();
    await msg(alice, 'hello bob (fixed)').locator('.edited').waitFor();
    assert.equal(await msg(bob, 'hello bob (fixed)').locator('.edited').textContent(), '(edited)');
    // Bob cannot edit or delete Alice's message: no buttons on it.
    assert.equal(await msg(bob, 'hello bob (fixed)').locator('.actions').count(), 0);

    const own = row;
    await own.hover();
    await own.locator('button.delete').click();
    await own.locator('button.delete', { hasText: 'Really delete?' }).click();
    const gone = (p) => p.locator(`#messages li.msg.deleted[data-id="${id}"]`);
    await gone(bob).waitFor();
    await gone(alice).waitFor();
    assert.equal(await gone(bob).locator('.text').textContent(), 'message deleted');
    assert.equal(await bob.locator('#messages', { hasText: 'hello bob' }).count(), 0,
      'the deleted text is nowhere on the other page');
    await shot(bob, 'edited-and-deleted');
  });

  test('a reload keeps the session and the history, edits and deletions included', async () => {
    await alice.reload();
    await waitStatus(alice, 'connected');
    assert.equal(await alice.locator('#who-name').textContent(), 'alice');
    await msg(alice, 'line two').waitFor();
    await alice.locator('#messages li.msg.deleted .text', { hasText: 'message deleted' }).waitFor();
    const texts = await alice.locator('#messages li.msg .text').allTextContents();
    assert.deepEqual(texts, ['message deleted', 'hi alice, line one\nline two', 'first\nsecond']);
    // The chat is in the URL and in the recent list.
    assert.match(alice.url(), /#\/chat\/lobby$/);
    await alice.locator('#recent a', { hasText: '#lobby' }).waitFor();
  });

  test('a chat id is validated, joined from the form and put in the URL', async () => {
    await alice.locator('#join-id').fill('not a valid id!');
    await alice.locator('#join-form button').click();
    await alice.locator('#join-error', { hasText: 'A chat id is' }).waitFor();
    assert.match(alice.url(), /#\/chat\/lobby$/, 'an invalid id does not navigate');
    await alice.locator('#join-id').fill('side.room-2');
    await alice.locator('#join-form button').click();
    await until(() => alice.url().endsWith('#/chat/side.room-2'), { what: 'the URL' });
    await waitStatus(alice, 'connected');
    await alice.locator('#history-state', { hasText: 'beginning of #side.room-2' }).waitFor();
    // the chats' names, newest first (a badge of unread messages may follow a name)
    assert.deepEqual(await alice.locator('#recent a').evaluateAll(
      (as) => as.map((a) => a.firstChild.textContent)), ['#side.room-2', '#lobby']);
    await alice.locator('#recent a', { hasText: '#lobby' }).click();
    await msg(alice, 'line two').waitFor();
    // The other shareable form, ?chat=, becomes the hash route.
    await alice.goto(`${chatd.base}/?chat=side.room-2`);
    await until(() => alice.url().endsWith('/#/chat/side.room-2'), { what: 'the hash route' });
    await alice.locator('#chat-title', { hasText: '#side.room-2' }).waitFor();
    await waitStatus(alice, 'connected');
    await alice.goto(`${chatd.base}/#/chat/lobby`);
    await waitStatus(alice, 'connected');
  });

  test('text that looks like markup is shown as text', async () => {
    const evil = ['<script>alert(1)</script>', '<img src=x onerror=alert(2)>',
      '<b>not bold</b> & "quotes"'];
    for (const t of evil) await send(bob, t);
    for (const t of evil) await msg(alice, t).last().waitFor();
    const texts = await alice.locator('#messages li.msg .text').allTextContents();
    assert.deepEqual(texts.slice(-3), evil);
    for (const p of [alice, bob]) {
      assert.equal(await p.locator('#messages img, #messages script, #messages b').count(), 0,
        'no element was injected');
    }
    // A sender name is text as well.
    const mallory = await person('<i>mallory</i>', 'lobby');
    await send(mallory, 'who am i');
    await msg(alice, 'who am i').waitFor();
    assert.equal(await msg(alice, 'who am i').locator('.author').textContent(), '<i>mallory</i>');
    assert.equal(await alice.locator('#messages i').count(), 0);
    // A long unbroken message wraps instead of widening the page.
    await send(bob, 'x'.repeat(3000));
    await msg(alice, 'xxxxxxxxxx').waitFor();
    const overflow = await alice.locator('#scroller')
      .evaluate((s) => s.scrollWidth - s.clientWidth);
    assert.equal(overflow, 0, 'no horizontal scrolling');
    assert.deepEqual(alice.dialogs, []);
    assert.deepEqual(bob.dialogs, []);
    await shot(alice, 'markup-as-text');
  });
});

describe('search', () => {
  test('finds the messages holding the words, shows markup as text, says when none match',
    async () => {
      const carol = await person('carol', 'finder');
      for (const t of ['the quick brown fox', 'a lazy dog', '<b>Quick</b> & sly']) {
        await send(carol, t);
        await msg(carol, t).waitFor();
      }
      await carol.locator('#search-q').fill('QUICK');
      await carol.locator('#search-q').press('Enter');
      await until(async () => (await carol.locator('#search-list li').count()) === 2,
        { what: 'two results' });
      assert.deepEqual(await carol.locator('#search-list li .text').allTextContents(),
        ['<b>Quick</b> & sly', 'the quick brown fox'], 'newest first, text as text');
      assert.equal(await carol.locator('#search-list b').count(), 0, 'nothing injected');
      assert.deepEqual(await carol.locator('#search-list li .text em').allTextContents(),
        ['Quick', 'quick'], 'the matched words highlighted, and nothing else');
      assert.match(await carol.locator('#search-state').textContent(), /^2 messages match/);
      assert.equal(await carol.locator('#search-more').isHidden(), true, 'nothing older');
      assert.equal(await carol.locator('#search-list .author').first().textContent(), 'carol');
      await shot(carol, 'search');

      await carol.locator('#search-q').fill('zebra');
      await carol.locator('#search-q').press('Enter');
      await until(async () => /^No messages match/.test(
        await carol.locator('#search-state').textContent()), { what: 'the no-match state' });
      assert.equal(await carol.locator('#search-list li').count(), 0);
      await carol.locator('#search-close').click();
      assert.equal(await carol.locator('#search').isHidden(), true);
      assert.equal(await carol.locator('#search-q').inputValue(), '');
    });

  test('searches every chat this person has open, and says which chat a hit is from',
    async () => {
      const gina = await person('gina', 'garden');
      await send(gina, 'tomatoes need sun');
      await msg(gina, 'tomatoes need sun').waitFor();
      await gina.locator('#join-id').fill('kitchen');
      await gina.locator('#join-id').press('Enter');
      await gina.locator('#chat-title', { hasText: 'kitchen' }).waitFor();
      await waitStatus(gina, 'connected');
      await send(gina, 'tomatoes <i>in</i> the sauce');
      await msg(gina, 'tomatoes <i>in</i> the sauce').waitFor();
      await send(gina, 'no vegetables here');
      await msg(gina, 'no vegetables here').waitFor();
      await gina.locator('#search-q').fill('tomatoes -sun');
      await gina.locator('#search-q').press('Enter');
      await until(async () => /^1 message matches/.test(
        await gina.locator('#search-state').textContent()), { what: 'one match' });
      await gina.locator('#search-q').fill('tomatoes');
      await gina.locator('#search-q').press('Enter');
      await until(async () => (await gina.locator('#search-list li').count()) === 2,
        { what: 'a hit from each chat' });
      assert.deepEqual(await gina.locator('#search-list li .text').allTextContents(),
        ['tomatoes <i>in</i> the sauce', 'tomatoes need sun']);
      assert.equal(await gina.locator('#search-list i').count(), 0, 'nothing injected');
      assert.deepEqual(await gina.locator('#search-list .chat-tag').allTextContents(),
        ['#garden'], 'a hit from another chat names it');
      assert.match(await gina.locator('#search-state').textContent(), /in 2 chats\.$/);
      await shot(gina, 'search-all-chats');
    });

  test('"Search older messages" goes on where one request stopped', async () => {
    // 40 long messages after the match: more text than one request of the scan backend
    // reads (2 MiB); a server of its own with --search scan (the FTS5 index needs no bound)
    const chatd = new Chatd({ name: 'chatd-scan', args: ['--search', 'scan'] });
    await chatd.start();
    try {
      const tok = (await (await fetch(chatd.base + '/api/dev/token', {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ user: 'dave' }),
      })).json()).token;
      const post = (message) => fetch(chatd.base + '/api/chats/haystack/messages', {
        method: 'POST', body: JSON.stringify({ message }),
        headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + tok },
      }).then((r) => assert.equal(r.status, 201));
      await post('the needle is here');
      for (let i = 0; i < 40; i++) await post(`hay ${i} ` + 'h'.repeat(60000));
      const erin = await openPage(browser, chatd.base);
      pages.push(erin);
      await signIn(erin, 'erin', 'haystack');
      await erin.locator('#search-q').fill('needle');
      await erin.locator('#search-q').press('Enter');
      await erin.locator('#search-more').waitFor();
      assert.match(await erin.locator('#search-state').textContent(),
        /^No messages match “needle” so far; older messages may match too\.$/);
      await erin.locator('#search-more').click();
      await erin.locator('#search-list li').first().waitFor();
      assert.deepEqual(await erin.locator('#search-list li .text').allTextContents(),
        ['the needle is here']);
      assert.equal(await erin.locator('#search-state').textContent(),
        '1 message matches “needle”.');
      assert.equal(await erin.locator('#search-more').isHidden(), true);
      await erin.locator('#search-q').press('Escape');
      assert.equal(await erin.locator('#search').isHidden(), true, 'Escape closes the results');
      await erin.context().close(); // before its server goes
    } finally {
      await chatd.stop();
    }
  });
});

describe('history paging', () => {
  test('scrolling up loads older pages and keeps the reading position', async () => {
    const token = await chatd.token('seeder');
    for (let i = 1; i <= 120; i++) {
      await chatd.post(token, 'archive', `seed ${String(i).padStart(3, '0')}`);
    }
    const page = await person('reader', 'archive');
    await msg(page, 'seed 120').waitFor();
    await page.locator('#history-state', { hasText: /^$/ }).waitFor();
    const first = await page.locator('#messages li.msg .text').first().textContent();
    assert.equal(first, 'seed 071', 'the first page is the newest 50');
    // The newest message is in view: the pane starts at the bottom.
    assert.ok(await msg(page, 'seed 120').isVisible());

    const anchor = msg(page, 'seed 071');
    // Scroll to the top and note where seed 071 is, in one go, before the next page can land.
    const top0 = await anchor.evaluate((e) => {
      document.getElementById('scroller').scrollTop = 0;
      return e.getBoundingClientRect().top;
    });
    await msg(page, 'seed 021').waitFor({ state: 'attached' });
    const top1 = await anchor.evaluate((e) => e.getBoundingClientRect().top);
    assert.ok(Math.abs(top1 - top0) < 2, `seed 071 stayed in place (${top0} -> ${top1})`);
    assert.ok(await page.locator('#scroller').evaluate((s) => s.scrollTop > 0));

    await page.locator('#scroller').evaluate((s) => { s.scrollTop = 0; });
    await msg(page, 'seed 001').waitFor({ state: 'attached' });
    await page.locator('#history-state', { hasText: 'This is the beginning of #archive' })
      .waitFor();
    const all = await page.locator('#messages li.msg .text').allTextContents();
    const seeds = Array.from({ length: 120 }, (_, i) => `seed ${String(i + 1).padStart(3, '0')}`);
    assert.deepEqual(all, seeds);
    await shot(page, 'history-top');
  });
});

describe('a phone-sized screen', () => {
  test('at 375x700 the composer and the messages are visible', async () => {
    const page = await person('phone', 'lobby',
      { viewport: { width: 375, height: 700 }, isMobile: true, hasTouch: true });
    await send(page, 'sent from a phone');
    await msg(page, 'sent from a phone').waitFor();
    for (const sel of ['#input', '#composer button', '#status', '#search-q']) {
      const b = await page.locator(sel).boundingBox();
      assert.ok(b && b.x >= 0 && b.y >= 0 && b.x + b.width <= 375 && b.y + b.height <= 700,
        `${sel} is inside the screen: ${JSON.stringify(b)}`);
    }
    assert.ok(await msg(page, 'sent from a phone').isVisible());
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 375, `no horizontal overflow (${width})`);
    // The sidebar is a drawer: closed over the chat, opened by the Chats button.
    assert.equal(await page.locator('#sidebar').isVisible(), false);
    await page.locator('#menu').click();
    await page.locator('#recent a', { hasText: '#lobby' }).waitFor();
    await shot(page, 'phone-drawer');
    await page.locator('#recent a', { hasText: '#lobby' }).click();
    assert.equal(await page.locator('#sidebar').isVisible(), false);
    await shot(page, 'phone');
  });
});

describe('a server without dev tokens', () => {
  let plain;
  before(async () => {
    plain = new Chatd({ dev: false, name: 'chatd-plain' });
    await plain.start();
  });
  after(async () => { await plain?.stop(); });

  test('the page asks for a token, and signs in with a pasted one', async () => {
    const page = await openPage(browser, plain.base);
    pages.push(page);
    await page.goto(`${plain.base}/#/chat/ops`);
    await page.locator('#signin-name').fill('carol');
    await page.locator('#signin-form button[type=submit]').click();
    await page.locator('#token-form').waitFor();
    await shot(page, 'token-sign-in');
    await page.locator('#token-input').fill('not.a.token');
    await page.locator('#token-form button[type=submit]').click();
    await page.locator('#token-error', { hasText: 'not a token' }).waitFor();
    const token = execFileSync(CHATCTL, ['token', '--user', 'carol', '--secret', plain.secret],
      { encoding: 'utf8' }).trim();
    await page.locator('#token-input').fill(token);
    await page.locator('#token-form button[type=submit]').click();
    await page.locator('#who-name', { hasText: 'carol' }).waitFor();
    await waitStatus(page, 'connected');
    assert.match(page.url(), /#\/chat\/ops$/, 'the shared link is joined after signing in');
    await send(page, 'token works');
    await msg(page, 'token works').waitFor();
    await page.locator('#signout').click();
    await page.locator('#signin-form').waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.getItem('chat.session')), null);
  });
});

describe('a refused token', () => {
  test('signs the person out with a reason instead of retrying', async () => {
    const page = await openPage(browser, chatd.base);
    pages.push(page);
    await page.addInitScript(() => {
      sessionStorage.setItem('chat.session', JSON.stringify({ user: 'eve', token: 'a.b.c' }));
    });
    const sockets = [];
    page.on('websocket', (ws) => sockets.push(ws.url()));
    await page.goto(`${chatd.base}/#/chat/lobby`);
    await page.locator('#signin-error', { hasText: 'sign in again' }).waitFor();
    assert.equal(await page.locator('#chat-view').isVisible(), false);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('chat.session')), null);
    assert.deepEqual(sockets, [], 'no socket is opened with a token the API refused');
    // Signing in again lands in the chat of the link.
    await page.locator('#signin-name').fill('eve');
    await page.locator('#signin-form button[type=submit]').click();
    await waitStatus(page, 'connected');
    await page.locator('#chat-title', { hasText: '#lobby' }).waitFor();
  });
});

describe('page weight', () => {
  test('every request goes to chatd; bytes and load time are reported', async (t) => {
    const token = await chatd.token('visitor');
    const page = await openPage(browser, chatd.base);
    pages.push(page);
    await page.addInitScript((session) => {
      sessionStorage.setItem('chat.session', session);
    }, JSON.stringify({ user: 'visitor', token }));
    const urls = [];
    const assets = {};
    page.on('request', (r) => urls.push(r.url()));
    page.on('websocket', (ws) => urls.push(ws.url()));
    page.on('response', async (r) => {
      if (!new URL(r.url()).pathname.startsWith('/api/')) {
        assets[new URL(r.url()).pathname] = (await r.body()).length;
      }
    });
    await page.goto(`${chatd.base}/#/chat/lobby`);
    await waitStatus(page, 'connected');
    await page.waitForLoadState('load');
    const origin = new URL(chatd.base).host;
    for (const u of urls) assert.equal(new URL(u).host, origin, `${u} is served by chatd`);
    for (const f of ['/', '/app.js', '/connection.js', '/style.css', '/favicon.svg']) {
      assert.ok(assets[f] > 0, `${f} was loaded`);
    }
    const timing = await page.evaluate(() => {
      const nav = performance.getEntriesByType('navigation')[0];
      const conn = performance.getEntriesByName('chat-connected')[0];
      return { domContentLoaded: Math.round(nav.domContentLoadedEventEnd),
        load: Math.round(nav.loadEventEnd), connected: Math.round(conn.startTime) };
    });
    const total = Object.values(assets).reduce((a, b) => a + b, 0);
    const report = { assets, totalBytes: total, ms: timing };
    t.diagnostic(`page assets ${total} bytes (${JSON.stringify(assets)})`);
    t.diagnostic(`cold load: DOMContentLoaded ${timing.domContentLoaded} ms, load ` +
      `${timing.load} ms, history shown and socket open ${timing.connected} ms`);
    fs.writeFileSync(path.join(ARTIFACTS, 'load.json'), JSON.stringify(report, null, 2));
  });
});

// The README's picture: a desktop-sized conversation. Written to docs/ only when asked, so a
// test run does not touch committed files.
describe('screenshot for the README', () => {
  test('a realistic conversation', async () => {
    const tokens = {};
    const say = async (user, text) => {
      tokens[user] ??= await chatd.token(user);
      return chatd.post(tokens[user], 'design-review', text);
    };
    await say('maria',
      'Morning! The new onboarding flow is live on staging.');
    await say('dmitri', 'Nice. Does it keep the chat history when you switch devices?');
    await say('maria',
      'Yes: it resumes from the last message you saw.\nNothing is shown twice.');
    const oops = await say('dmitri', 'Did the copy review happen?');
    await say('alice', 'Great work. Can we also try it on two phones at once?');
    await say('dmitri', 'On it. I will open two browsers side by side.');
    await say('maria',
      'Copy review notes are in the design doc, section 3.');
    const page = await openPage(browser, chatd.base, { reducedMotion: 'reduce' });
    pages.push(page);
    await page.addInitScript(() => {
      if (!localStorage.getItem('chat.recent')) {
        localStorage.setItem('chat.recent', JSON.stringify(['general', 'bench', 'releases']));
      }
    });
    await signIn(page, 'alice', 'design-review');
    await send(page, 'Thanks both! Shall we demo it on Friday?');
    await msg(page, 'demo it on Friday').waitFor();
    // One edited and one deleted message, as a real conversation has.
    const dm = await person('dmitri', 'design-review');
    const row = dm.locator(`#messages li.msg[data-id="${oops.message_id}"]`);
    await row.hover();
    await row.locator('button.edit').click();
    await row.locator('.edit-form textarea').fill('Did the copy review happen on Monday?');
    await row.locator('.edit-form textarea').press('Enter');
    await msg(page, 'review happen on Monday?').locator('.edited').waitFor();
    await send(dm, 'Friday works for me.');
    await msg(page, 'Friday works').waitFor();
    await send(dm, 'wrong window, sorry');
    const gone = msg(dm, 'wrong window');
    const goneId = await gone.getAttribute('data-id');
    await gone.hover();
    await gone.locator('button.delete').click();
    await gone.locator('button.delete').click();
    await page.locator(`#messages li.msg.deleted[data-id="${goneId}"]`).waitFor();
    await page.locator('#input').fill('I will book the big room.');
    const mine = msg(page, 'demo it on Friday');
    await mine.hover();
    await until(() => mine.locator('.actions').evaluate((e) => getComputedStyle(e).opacity === '1'),
      { what: 'the hover buttons' });
    const file = process.env.UPDATE_SCREENSHOT ? path.join(ROOT, 'docs/screenshot.png')
                                               : path.join(ARTIFACTS, 'readme.png');
    await page.screenshot({ path: file });
  });
});
