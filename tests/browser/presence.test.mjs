// Presence and typing in the web client, in a real Chromium against the real chatd: the
// chat shows who is online (and drops whoever closes their page), and typing in one page
// shows "alice is typing…" in the other until the message arrives.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Chatd, launchBrowser, msg, openPage, requireBinaries, signIn, until,
} from './harness.mjs';

let chatd;
let browser;
const pages = [];

async function person(user, chat) {
  const page = await openPage(browser, chatd.base);
  pages.push(page);
  await signIn(page, user, chat);
  return page;
}

before(async () => {
  requireBinaries();
  // no grace period: a closed page is a leave at once
  chatd = new Chatd({ name: 'chatd-presence', args: ['--presence-grace-ms', '0'] });
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

test('who is online, and who is typing', async () => {
  const alice = await person('alice', 'porch');
  await alice.locator('#online', { hasText: 'Online: alice' }).waitFor();
  const bob = await person('bob', 'porch');
  await bob.locator('#online', { hasText: 'Online: alice, bob' }).waitFor();
  await alice.locator('#online', { hasText: 'Online: alice, bob' }).waitFor();

  // alice types: bob sees it, alice does not see herself typing
  await alice.locator('#input').pressSequentially('hel');
  await bob.locator('#typing', { hasText: 'alice is typing…' }).waitFor();
  assert.equal(await alice.locator('#typing').textContent(), '');
  // her message ends it
  await alice.locator('#input').pressSequentially('lo');
  await alice.locator('#input').press('Enter');
  await msg(bob, 'hello').waitFor();
  await until(async () => (await bob.locator('#typing').textContent()) === '',
    { what: "bob's typing line to clear" });

  // bob closes his page: he leaves alice's list
  await bob.close();
  pages.splice(pages.indexOf(bob), 1);
  await alice.locator('#online', { hasText: /^Online: alice$/ }).waitFor();
});
