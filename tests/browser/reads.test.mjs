// Read positions in the web client, in a real Chromium against the real chatd: the recent
// list counts what came in a chat while the person was elsewhere, the chat opens with a "New
// messages" line above the first of them and reads them (the count goes away, on the server
// too), and a second tab of the same person clears its badge when the first one reads.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Chatd, launchBrowser, msg, openPage, requireBinaries, shot, signIn, until, waitStatus,
} from './harness.mjs';

let chatd;
let browser;
let bobToken;
let aliceToken;
const pages = [];

async function person(user, chat) {
  const page = await openPage(browser, chatd.base);
  pages.push(page);
  await signIn(page, user, chat);
  return page;
}

async function readPos(token, chat) {
  const r = await fetch(`${chatd.base}/api/chats/${chat}/read`,
    { headers: { Authorization: 'Bearer ' + token } });
  assert.equal(r.status, 200);
  return r.json();
}

function badge(page, chat) {
  return page.locator(`#recent a[href="#/chat/${chat}"] .badge`);
}

// What a hidden tab is: the page thinks so and hears about the change, as when the person
// switches to another tab (a headless browser keeps every page visible).
async function setVisible(page, visible) {
  await page.evaluate((v) => {
    Object.defineProperty(document, 'visibilityState',
      { configurable: true, get: () => (v ? 'visible' : 'hidden') });
    document.dispatchEvent(new Event('visibilitychange'));
  }, visible);
}

before(async () => {
  requireBinaries();
  chatd = new Chatd({ name: 'chatd-reads' });
  await chatd.start();
  browser = await launchBrowser();
  bobToken = await chatd.token('bob');
  aliceToken = await chatd.token('alice');
});

after(async () => {
  await browser?.close();
  await chatd?.stop();
  for (const p of pages) {
    assert.deepEqual(p.errors, [], 'no uncaught error in any page');
    assert.deepEqual(p.dialogs, [], 'no dialog opened in any page');
  }
});

describe('unread counts and the new-messages line', () => {
  let alice;
  const ids = {};

  test('a message seen in an open chat is read', async () => {
    alice = await person('alice', 'news');
    ids.n1 = (await chatd.post(bobToken, 'news', 'first news')).message_id;
    await msg(alice, 'first news').waitFor();
    await until(async () => (await readPos(aliceToken, 'news')).message_id === ids.n1,
      { what: 'the read position at the message seen' });
    assert.equal(await alice.locator('li.unread-line').count(), 0, 'nothing unread: no line');
  });

  test('the recent list counts what came while elsewhere', async () => {
    await alice.evaluate(() => { location.hash = '#/chat/lobby'; });
    await waitStatus(alice, 'connected');
    for (const n of ['n2', 'n3', 'n4']) {
      ids[n] = (await chatd.post(bobToken, 'news', `news ${n}`)).message_id;
    }
    const pos = await readPos(aliceToken, 'news');
    assert.deepEqual(pos, { chat_id: 'news', message_id: ids.n1, unread: 3, unread_capped: false });
    // the person comes back to the page later
    await alice.reload();
    await waitStatus(alice, 'connected');
    await until(async () => (await badge(alice, 'news').textContent()) === '3',
      { what: 'a badge of 3 on #news' });
    assert.equal(await badge(alice, 'news').getAttribute('aria-label'), '3 unread');
    assert.equal(await badge(alice, 'lobby').count(), 0, 'nothing unread in the open chat');
    await shot(alice, 'unread-badge');
  });

  test('opening the chat shows the line above the first unread and reads them', async () => {
    await alice.locator('#recent a[href="#/chat/news"]').click();
    await msg(alice, 'news n4').waitFor();
    const line = alice.locator('#messages li.unread-line');
    await line.waitFor();
    assert.equal(await line.textContent(), 'New messages');
    // right above n2, right below n1
    assert.equal(await line.evaluate((li) => li.nextElementSibling.dataset.id), ids.n2);
    assert.equal(await line.evaluate((li) => li.previousElementSibling.dataset.id), ids.n1);
    await until(async () => (await readPos(aliceToken, 'news')).message_id === ids.n4,
      { what: 'the position at the newest message' });
    assert.equal((await readPos(aliceToken, 'news')).unread, 0);
    await badge(alice, 'news').waitFor({ state: 'detached' });
    await shot(alice, 'unread-line');
  });

  test('a second tab clears its badge when the first one reads', async () => {
    const tab2 = await person('alice', 'news');
    await msg(tab2, 'news n4').waitFor();
    await setVisible(alice, false);
    await setVisible(tab2, false);
    ids.n5 = (await chatd.post(bobToken, 'news', 'news n5')).message_id;
    for (const tab of [alice, tab2]) {
      await msg(tab, 'news n5').waitFor();
      await until(async () => (await badge(tab, 'news').textContent()) === '1',
        { what: 'a badge of 1 on the open chat in a hidden tab' });
    }
    assert.match(await tab2.title(), /^\(1\) #news/);
    assert.equal((await readPos(aliceToken, 'news')).message_id, ids.n4, 'hidden: not read');
    // the person looks at the first tab: it reads, and the second, still hidden, follows
    await setVisible(alice, true);
    await badge(tab2, 'news').waitFor({ state: 'detached' });
    assert.doesNotMatch(await tab2.title(), /^\(/);
    assert.equal((await readPos(aliceToken, 'news')).message_id, ids.n5);
    // the hidden tab saw n5 arrive unseen: its line is above it
    const line = tab2.locator('#messages li.unread-line');
    assert.equal(await line.evaluate((li) => li.nextElementSibling.dataset.id), ids.n5);
  });
});
