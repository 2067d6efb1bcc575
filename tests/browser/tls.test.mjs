// The web client over HTTPS and WSS in a real Chromium: chatd with --tls-cert/--tls-key, a
// certificate signed by a CA the test makes, that CA trusted by the browser (NSS database)
// so that the certificate is really verified. The page is served over https://, its socket
// goes to wss://, and two people talk through it; a browser that does not trust the CA
// refuses the page.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  Chatd, launchBrowser, makeTestPki, msg, openPage, requireBinaries, signIn,
} from './harness.mjs';

let chatd;
let browser;
let pkiDir;
const pages = [];

before(async () => {
  requireBinaries();
  pkiDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-browser-pki-'));
  const pki = makeTestPki(pkiDir);
  chatd = new Chatd({ name: 'chatd-tls', tls: pki });
  await chatd.start();
  browser = await launchBrowser({ trustCa: pki.ca });
});

after(async () => {
  await browser?.close();
  await chatd?.stop();
  if (pkiDir) fs.rmSync(pkiDir, { recursive: true, force: true });
  for (const p of pages) {
    assert.deepEqual(p.errors, [], 'no uncaught error in any page');
    assert.deepEqual(p.dialogs, [], 'no dialog opened in any page');
  }
});

test('over https the page talks through wss, verified against the test CA', async () => {
  assert.match(chatd.base, /^https:/);
  const sockets = [];
  const person = async (user) => {
    const page = await openPage(browser, chatd.base);
    pages.push(page);
    page.on('websocket', (ws) => sockets.push(ws.url()));
    await signIn(page, user, 'secure');
    return page;
  };
  const alice = await person('alice');
  const bob = await person('bob');
  await alice.locator('#input').fill('sealed');
  await alice.locator('#input').press('Enter');
  await msg(bob, 'sealed').waitFor();
  assert.ok(sockets.length >= 2, 'both pages opened a socket');
  for (const u of sockets) assert.match(u, /^wss:\/\/127\.0\.0\.1:\d+\/ws\/chat\/secure/);
});

test('a browser that does not trust the CA refuses the page', async () => {
  const plain = await launchBrowser();
  try {
    const page = await (await plain.newContext()).newPage();
    await assert.rejects(page.goto(chatd.base + '/'), /ERR_CERT_AUTHORITY_INVALID/);
  } finally {
    await plain.close();
  }
});
