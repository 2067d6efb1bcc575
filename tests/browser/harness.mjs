// The browser suite's fixtures: the real chatd (started, killed, restarted on the same port),
// Debian's Chromium through playwright-core, and small REST and polling helpers.
// The one idea: nothing is faked; a test that cannot start chatd or Chromium fails loudly.

import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CHATD = path.join(ROOT, 'build/chatd');
export const CHATCTL = path.join(ROOT, 'build/chatctl');
export const ARTIFACTS = path.join(ROOT, 'test-artifacts/browser');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export function requireBinaries() {
  for (const f of [CHATD, CHROMIUM]) {
    if (!fs.existsSync(f)) {
      throw new Error(`${f} is missing: ${f === CHATD ? 'run `make` in ' + ROOT
                                                         : 'apt-get install -y chromium'}`);
    }
  }
  fs.mkdirSync(ARTIFACTS, { recursive: true });
}

// A port that is free now; chatd binds it itself, and binds it again after a restart.
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// If the runner dies mid-test, take every chatd down with it.
const running = new Set();
process.on('exit', () => { for (const p of running) p.kill('SIGKILL'); });

export class Chatd {
  // tls: {cert, key, ca} files: chatd serves HTTPS and WSS, checked against ca
  constructor({ dev = true, name = 'chatd', args = [], tls = null } = {}) {
    this.dev = dev;
    this.tls = tls;
    this.extraArgs = args; // more chatd flags, e.g. ['--search', 'scan']
    this.name = name;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-browser-'));
    // A fixed secret, so tokens stay valid across a restart (--dev alone would make a new one).
    this.secret = randomBytes(32).toString('hex');
    this.proc = null;
    this.starts = 0;
  }

  get base() { return `${this.tls ? 'https' : 'http'}://127.0.0.1:${this.port}`; }

  // /healthz answers 200 (over TLS verified against the test CA when tls is on)
  healthy() {
    if (!this.tls) return fetch(this.base + '/healthz').then((r) => r.ok);
    return new Promise((resolve, reject) => {
      https.get(this.base + '/healthz', { ca: fs.readFileSync(this.tls.ca) }, (res) => {
        res.resume();
        resolve(res.statusCode === 200);
      }).on('error', reject);
    });
  }

  async start() {
    if (!this.port) this.port = await freePort();
    const args = ['--port', String(this.port), '--host', '127.0.0.1',
      '--store', `sqlite:${path.join(this.dir, 'chat.db')}`, '--jwt-secret', this.secret,
      '--web-root', path.join(ROOT, 'web'), '--log-level', 'warn'];
    if (this.dev) args.unshift('--dev');
    if (this.tls) args.push('--tls-cert', this.tls.cert, '--tls-key', this.tls.key);
    args.push(...this.extraArgs);
    const log = fs.openSync(path.join(ARTIFACTS, `${this.name}.log`), this.starts ? 'a' : 'w');
    this.starts++;
    const proc = spawn(CHATD, args, { stdio: ['ignore', log, log] });
    fs.closeSync(log);
    this.proc = proc;
    running.add(proc);
    const exited = new Promise((resolve) => proc.once('exit', (code, sig) => {
      running.delete(proc);
      resolve({ code, sig });
    }));
    this.exited = exited;
    // Ready when /healthz answers; give up if the process dies first.
    const deadline = Date.now() + 10000;
    for (;;) {
      const dead = await Promise.race([exited, new Promise((r) => setTimeout(() => r(null), 50))]);
      if (dead) {
        throw new Error(`chatd exited during start (${JSON.stringify(dead)}); ` +
          `see ${ARTIFACTS}/${this.name}.log`);
      }
      try {
        if (await this.healthy()) return;
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) throw new Error('chatd did not answer /healthz within 10 s');
    }
  }

  async kill(signal = 'SIGKILL') {
    if (!this.proc) return;
    const p = this.proc;
    this.proc = null;
    p.kill(signal);
    await this.exited;
  }

  async stop() {
    if (this.proc) {
      const p = this.proc;
      const timer = setTimeout(() => p.kill('SIGKILL'), 5000);
      await this.kill('SIGTERM');
      clearTimeout(timer);
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  async token(user) {
    const r = await fetch(this.base + '/api/dev/token', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user }),
    });
    if (r.status !== 200) throw new Error(`dev token: HTTP ${r.status}`);
    return (await r.json()).token;
  }

  async post(token, chat, message, clientId) {
    const r = await fetch(`${this.base}/api/chats/${chat}/messages`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + token },
      body: JSON.stringify(clientId ? { message, client_id: clientId } : { message }),
    });
    if (r.status !== 201 && r.status !== 200) throw new Error(`post: HTTP ${r.status}`);
    return r.json();
  }

  // Every message of a chat, oldest first, walking the history pages.
  async history(token, chat) {
    const all = [];
    let before = null;
    do {
      const q = 'limit=200' + (before ? `&before=${before}` : '');
      const r = await fetch(`${this.base}/api/chats/${chat}/messages?${q}`,
        { headers: { Authorization: 'Bearer ' + token } });
      if (!r.ok) throw new Error(`history: HTTP ${r.status}`);
      const page = await r.json();
      all.push(...page.messages);
      before = page.next_before;
    } while (before);
    return all.reverse();
  }
}

// A test CA and a server certificate for 127.0.0.1 and localhost, made with the openssl CLI
// in dir: {ca, cert, key} paths.
export function makeTestPki(dir) {
  const run = (...a) => execFileSync('openssl', a, { cwd: dir, stdio: 'ignore' });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  run('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2',
    '-subj', '/CN=chat browser test CA');
  run('req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=localhost');
  fs.writeFileSync(path.join(dir, 'ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  run('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key',
    '-CAcreateserial', '-out', 'server.pem', '-days', '2', '-extfile', 'ext');
  return { ca: path.join(dir, 'ca.pem'), cert: path.join(dir, 'server.pem'),
    key: path.join(dir, 'server.key') };
}

// trustCa: a PEM CA file Chromium trusts as a root, the way a person or an administrator
// adds one on Linux: in the NSS database of the (here temporary) home directory, with
// certutil (libnss3-tools). Certificates are still verified: only that CA is added.
export async function launchBrowser({ trustCa = null } = {}) {
  let env;
  if (trustCa) {
    const home = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-browser-home-'));
    const db = path.join(home, '.pki/nssdb');
    fs.mkdirSync(db, { recursive: true });
    execFileSync('certutil', ['-d', 'sql:' + db, '-N', '--empty-password']);
    execFileSync('certutil', ['-d', 'sql:' + db, '-A', '-n', 'chat-test-ca', '-t', 'C,,',
      '-i', trustCa]);
    env = { ...process.env, HOME: home };
    process.on('exit', () => fs.rmSync(home, { recursive: true, force: true }));
  }
  return chromium.launch({
    executablePath: CHROMIUM,
    env,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

// A browser context for one person; it records dialogs and page errors for the assertions.
export async function openPage(browser, base, { viewport = { width: 1100, height: 700 },
  ...ctxOpts } = {}) {
  const context = await browser.newContext({ viewport, locale: 'en-GB', ...ctxOpts });
  context.setDefaultTimeout(10000);
  const page = await context.newPage();
  page.dialogs = [];
  page.errors = [];
  page.on('dialog', (d) => { page.dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  page.on('pageerror', (e) => page.errors.push(String(e)));
  page.base = base;
  return page;
}

// Sign in through the form and open a chat by its link.
export async function signIn(page, user, chat) {
  await page.goto(`${page.base}/${chat ? '#/chat/' + chat : ''}`);
  await page.locator('#signin-name').fill(user);
  await page.locator('#signin-form button[type=submit]').click();
  await page.locator('#who-name', { hasText: user }).waitFor();
  if (chat) await waitStatus(page, 'connected');
}

export async function waitStatus(page, text, timeout = 15000) {
  await page.locator('#status', { hasText: new RegExp('^' + text) }).waitFor({ timeout });
}

// The confirmed message rows whose text contains `text`.
export function msg(page, text) {
  return page.locator('#messages li.msg', { has: page.locator('.text', { hasText: text }) });
}

// Poll fn until it returns a truthy value (auto-waiting for things locators cannot express).
export async function until(fn, { timeout = 10000, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) { last = e; }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function shot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, name + '.png') });
}
