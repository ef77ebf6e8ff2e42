#!/usr/bin/env node
/*
 * busd.js: a Node.js client of busd (built-in modules only).
 *
 * Library:
 *   const busd = require('./busd.js');
 *   await busd.send(message, { from: 'alice' });      // socket, else files
 *   const claims = await busd.fetch('bob', { max: 10, waitS: 5 });
 *   await busd.ack('bob', [], { receipts: claims.map((c) => c.receipt) });
 *
 * CLI:
 *   node busd.js send --from AGENT [--root DIR] [--no-socket] [--no-sync] [FILE|-]
 *   node busd.js fetch AGENT [--max N] [--wait S] [--root DIR]
 *   node busd.js ack AGENT [ID...] [--receipt R]...
 *   node busd.js ping
 *
 * The file protocol is docs/protocol.md (section 5); the socket speaks
 * JSON-RPC 2.0, one JSON object per line. See README.md beside this file.
 */
'use strict';

const fs = require('fs');
const path = require('path');
const net = require('net');
const crypto = require('crypto');
const os = require('os');

const AGENT_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;
const MESSAGE_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const RESERVED = new Set(['CON', 'PRN', 'AUX', 'NUL']);
for (let i = 1; i <= 9; i++) {
  RESERVED.add(`COM${i}`);
  RESERVED.add(`LPT${i}`);
}
const SUBDIRS = ['tmp', 'outbox', 'inbox', 'locks', 'processed', 'dlq', 'journal'];
const B36 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ';
const IS_WINDOWS = process.platform === 'win32';
const CONNECT_TIMEOUT_MS = 2000;

/** An error from busd or from this client; `reason` is a stable code. */
class BusdError extends Error {
  constructor(message, reason, { code = null, data = null } = {}) {
    super(message);
    this.name = 'BusdError';
    this.reason = reason; // e.g. "schema", "no_daemon", "invalid_name", "not_found"
    this.code = code; // the JSON-RPC error code, when the daemon answered
    this.data = data; // the JSON-RPC error data, when the daemon answered
  }
}

// ------------------------------------------------------------------ names

/** True when `name` is a valid agent id (docs/protocol.md, section 3). */
function isValidAgent(name) {
  if (typeof name !== 'string' || !AGENT_RE.test(name) || name.endsWith('.')) return false;
  return !RESERVED.has(name.split('.', 1)[0].toUpperCase());
}

function checkAgent(name) {
  if (!isValidAgent(name)) {
    throw new BusdError(
      `invalid agent id ${JSON.stringify(name)}: must match ${AGENT_RE.source}, ` +
        "not end with '.', and not be a Windows device name",
      'invalid_name',
    );
  }
  return name;
}

// ------------------------------------------------------------------ ids and clocks

// Wall-clock nanoseconds: Date.now() gives milliseconds, hrtime the rest.
const wallBaseNs = BigInt(Date.now()) * 1000000n;
const hrBase = process.hrtime.bigint();
function nowNs() {
  return wallBaseNs + (process.hrtime.bigint() - hrBase);
}

/** The 5-character process field of busd's ids.py (injective over Linux pids). */
function pidField(pid) {
  if (pid < 100000) return String(pid).padStart(5, '0');
  const n = pid - 100000;
  const lead = Math.floor(n / 36 ** 4) % 26;
  let rest = n % 36 ** 4;
  let digits = '';
  for (let i = 0; i < 4; i++) {
    digits = B36[rest % 36] + digits;
    rest = Math.floor(rest / 36);
  }
  return String.fromCharCode(65 + lead) + digits;
}

let lastTick = 0n;
let counter = -1;
/** A new id in busd's seed format MSG-YYYYMMDD-HHMMSS-NNNNNNNNN-PIDppppp-SSSS. */
function newMessageId() {
  const now = nowNs();
  if (now > lastTick) {
    lastTick = now;
    counter = 0;
  } else if (++counter >= 10000) {
    lastTick += 1n;
    counter = 0;
  }
  const secs = lastTick / 1000000000n;
  const frac = lastTick % 1000000000n;
  const stamp = new Date(Number(secs) * 1000).toISOString(); // 2026-11-21T21:45:25.000Z
  const day = stamp.slice(0, 10).replace(/-/g, '');
  const hms = stamp.slice(11, 19).replace(/:/g, '');
  const seq = String(counter).padStart(4, '0');
  return `MSG-${day}-${hms}-${String(frac).padStart(9, '0')}-PID${pidField(process.pid)}-${seq}`;
}

/** RFC 3339 UTC timestamp with microseconds, as busd writes them. */
function nowRfc3339() {
  const ns = nowNs();
  const iso = new Date(Number(ns / 1000000n)).toISOString().slice(0, 19);
  const micros = String((ns % 1000000000n) / 1000n).padStart(6, '0');
  return `${iso}.${micros}Z`;
}

let lastArrival = 0n;
/** A 20-digit arrival key, strictly increasing within this process. */
function nextArrival() {
  const now = nowNs();
  lastArrival = now > lastArrival ? now : lastArrival + 1n;
  return String(lastArrival).padStart(20, '0');
}

// ------------------------------------------------------------------ discovery

/**
 * The bus root: `root`, else $BUSD_ROOT, else the nearest `.busd` directory in
 * the current directory or a parent, else `./.busd`. Returned absolute.
 */
function findRoot(root) {
  if (root) return path.resolve(root);
  if (process.env.BUSD_ROOT) return path.resolve(process.env.BUSD_ROOT);
  let dir = process.cwd();
  for (;;) {
    const candidate = path.join(dir, '.busd');
    if (isDir(candidate)) return candidate;
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  return path.resolve('.busd');
}

function isDir(p) {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/**
 * Where the daemon listens: $BUSD_SOCKET_PATH, else `<root>/busd.sock`, else
 * the path written in `<root>/busd.sock.path` (used when the root is too long
 * for a socket address). Null when none is there: no daemon.
 */
function findSocket(root) {
  if (process.env.BUSD_SOCKET_PATH) return process.env.BUSD_SOCKET_PATH;
  const direct = path.join(root, 'busd.sock');
  try {
    if (fs.statSync(direct).isSocket()) return direct;
  } catch {
    // not there: look for the indirection
  }
  try {
    const written = fs.readFileSync(path.join(root, 'busd.sock.path'), 'utf8').trim();
    if (written) return written;
  } catch {
    // no daemon advertised
  }
  return null;
}

// ------------------------------------------------------------------ the socket

/** One connection to the daemon: JSON-RPC 2.0 requests, one JSON object per line. */
class Client {
  /** `onNotification(method, params)` receives pushes (after `subscribe`). */
  constructor(socketPath, { onNotification = null } = {}) {
    this.socketPath = socketPath;
    this.onNotification = onNotification;
    this.sock = null;
    this.nextId = 1;
    this.pending = new Map();
    this.buf = '';
    this.closed = false;
  }

  /** Connect; rejects with reason `no_daemon` when nobody listens. */
  connect(timeoutMs = CONNECT_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path: this.socketPath });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new BusdError(`no answer from ${this.socketPath}`, 'no_daemon'));
      }, timeoutMs);
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        sock.on('error', (err) => this._fail(err));
        sock.on('close', () => this._fail(new Error('connection closed')));
        sock.on('data', (chunk) => this._data(chunk));
        this.sock = sock;
        resolve(this);
      });
      sock.once('error', (err) => {
        clearTimeout(timer);
        reject(new BusdError(`cannot connect to ${this.socketPath}: ${err.message}`, 'no_daemon'));
      });
    });
  }

  _data(chunk) {
    this.buf += chunk.toString('utf8');
    let nl;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      if (!line.trim()) continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        continue; // not ours to judge: the daemon only writes JSON
      }
      if (msg.id === undefined && msg.method) {
        if (this.onNotification) this.onNotification(msg.method, msg.params);
        continue;
      }
      const waiter = this.pending.get(msg.id);
      if (!waiter) continue;
      this.pending.delete(msg.id);
      clearTimeout(waiter.timer);
      if (msg.error) {
        const data = msg.error.data || {};
        waiter.reject(
          new BusdError(msg.error.message, data.reason || 'error', { code: msg.error.code, data }),
        );
      } else {
        waiter.resolve(msg.result);
      }
    }
  }

  _fail(err) {
    this.closed = true;
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new BusdError(`connection lost: ${err.message}`, 'connection_lost'));
    }
    this.pending.clear();
  }

  /** Call `method`; resolves with the result, rejects with a BusdError. */
  call(method, params = {}, options = {}) {
    return this.callRaw(method, JSON.stringify(params), options);
  }

  /** Like `call`, with `paramsText` already JSON (one line: no raw CR or LF). */
  callRaw(method, paramsText, { timeoutMs = 30000 } = {}) {
    if (!this.sock || this.closed) {
      return Promise.reject(new BusdError('not connected', 'connection_lost'));
    }
    if (/[\r\n]/.test(paramsText)) {
      return Promise.reject(new BusdError('params must be one line of JSON', 'invalid_params'));
    }
    const id = this.nextId++;
    const line = `{"jsonrpc":"2.0","id":${id},"method":${JSON.stringify(method)},"params":${paramsText}}\n`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new BusdError(`${method}: no answer in ${timeoutMs} ms`, 'timeout'));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.sock.write(line);
    });
  }

  close() {
    if (this.sock) this.sock.end();
    this.closed = true;
  }
}

/** Run `fn(client)` on a fresh connection to the daemon of `opts.root`. */
async function withClient(opts, fn) {
  const root = findRoot(opts.root);
  const sockPath = opts.socketPath || findSocket(root);
  if (!sockPath) throw new BusdError(`no daemon socket for the bus at ${root}`, 'no_daemon');
  const client = await new Client(sockPath).connect();
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

// ------------------------------------------------------------------ messages

const BOM = '\ufeff';

/**
 * Normalise `message` (object, JSON text, Markdown front matter text, or a
 * Buffer of either) and make sure it has a message_id and created_at.
 * Returns { id, text, line, markdown }: `text` is what a file holds, `line`
 * the same JSON on one line for the socket (null for Markdown).
 */
function prepare(message) {
  if (Buffer.isBuffer(message)) message = message.toString('utf8');
  if (typeof message === 'string') {
    const body = message.startsWith(BOM) ? message.slice(1) : message;
    if (/^---\r?\n/.test(body)) return prepareMarkdown(body);
    let obj;
    try {
      obj = JSON.parse(body);
    } catch (err) {
      throw new BusdError(`the message is not valid JSON: ${err.message}`, 'invalid_json');
    }
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
      throw new BusdError('the message must be a JSON object', 'schema');
    }
    const add = {};
    if (!('message_id' in obj)) add.message_id = newMessageId();
    if (!('created_at' in obj)) add.created_at = nowRfc3339();
    let text;
    if (obj.message_id === null || obj.created_at === null) {
      // null means absent: rewrite the whole object with the fields set.
      text = JSON.stringify(fill(obj));
    } else {
      // Keep the producer's bytes (numbers stay exact), inserting what is missing.
      const inserted = JSON.stringify(add).slice(1, -1);
      const open = body.indexOf('{');
      const rest = body.slice(open + 1);
      const sep = inserted && Object.keys(obj).length ? ',' : '';
      text = body.slice(0, open + 1) + inserted + sep + rest;
    }
    const id = add.message_id || obj.message_id;
    // A raw CR or LF can only be whitespace in valid JSON: flattening keeps the meaning.
    return { id: checkId(id), text, line: text.replace(/[\r\n]/g, ' ').trim(), markdown: false };
  }
  if (message === null || typeof message !== 'object' || Array.isArray(message)) {
    throw new BusdError('the message must be an object, a JSON text or a Buffer', 'schema');
  }
  const obj = fill({ ...message });
  const text = JSON.stringify(obj);
  return { id: checkId(obj.message_id), text, line: text, markdown: false };
}

function fill(obj) {
  if (obj.message_id === undefined || obj.message_id === null) obj.message_id = newMessageId();
  if (obj.created_at === undefined || obj.created_at === null) obj.created_at = nowRfc3339();
  return obj;
}

function checkId(id) {
  if (typeof id !== 'string' || !MESSAGE_ID_RE.test(id)) {
    throw new BusdError(
      `invalid message_id ${JSON.stringify(id)}: must match ${MESSAGE_ID_RE.source}`,
      'schema',
    );
  }
  return id;
}

/** Front matter: find msg_id/message_id and ts/created_at; insert missing ones. */
function prepareMarkdown(text) {
  const lines = text.split('\n');
  let close = -1;
  for (let i = 1; i < lines.length; i++) {
    if (lines[i] === '---' || lines[i] === '---\r') {
      close = i;
      break;
    }
  }
  if (close < 0) throw new BusdError('the front matter has no closing --- line', 'schema');
  let id = null;
  let hasTs = false;
  for (const line of lines.slice(1, close)) {
    const m = /^(msg_id|message_id)[ \t]*:(.*)$/.exec(line);
    if (m) {
      if (id !== null) throw new BusdError('message_id appears more than once', 'schema');
      id = m[2]
        .replace(/\r$/, '')
        .replace(/[ \t]+#.*$/, '')
        .trim()
        .replace(/^(["'])(.*)\1$/, '$2');
    }
    if (/^(ts|created_at)[ \t]*:/.test(line)) hasTs = true;
  }
  const extra = [];
  if (id === null) {
    id = newMessageId();
    extra.push(`message_id: "${id}"`);
  }
  if (!hasTs) extra.push(`created_at: "${nowRfc3339()}"`);
  if (extra.length) lines.splice(1, 0, ...extra);
  return { id: checkId(id), text: lines.join('\n'), line: null, markdown: true };
}

// ------------------------------------------------------------------ files

function fsyncPath(p) {
  if (IS_WINDOWS) return; // directories cannot be fsynced there, nor need to be
  const fd = fs.openSync(p, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Publish `data` into `outbox/<from>/` with the file protocol: write
 * tmp/<unique>, fsync, link (never replaces) to `<arrival>-<id>.json`, unlink
 * the tmp name, fsync the directory. Returns the published path.
 */
function publishFile(root, from, id, data, { fsync = true } = {}) {
  for (const sub of SUBDIRS) {
    if (!isDir(path.join(root, sub))) {
      throw new BusdError(`no bus at ${root} (run \`busd init ${root}\`)`, 'not_found');
    }
  }
  const tmp = path.join(
    root,
    'tmp',
    `node-${process.pid}-${crypto.randomBytes(8).toString('hex')}-${nowNs()}.tmp`,
  );
  const fd = fs.openSync(tmp, 'wx', 0o600);
  try {
    try {
      let off = 0;
      while (off < data.length) off += fs.writeSync(fd, data, off, data.length - off);
      if (fsync) fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    const outbox = path.join(root, 'outbox', from);
    if (!isDir(outbox)) {
      try {
        fs.mkdirSync(outbox, { mode: 0o700 });
      } catch (err) {
        if (err.code !== 'EEXIST') throw err;
      }
      if (fsync) fsyncPath(path.join(root, 'outbox'));
    }
    for (let attempt = 0; ; attempt++) {
      const dest = path.join(outbox, `${nextArrival()}-${id}.json`);
      try {
        fs.linkSync(tmp, dest); // fails with EEXIST instead of replacing
      } catch (err) {
        if (err.code === 'EEXIST' && attempt < 100) continue;
        throw err;
      }
      fs.unlinkSync(tmp);
      if (fsync) fsyncPath(outbox);
      return dest;
    }
  } catch (err) {
    try {
      fs.unlinkSync(tmp);
    } catch {
      // already gone
    }
    throw err;
  }
}

// ------------------------------------------------------------------ the API

/**
 * Send one message as agent `from`. Tries the daemon's socket first
 * (`publish`, answered once the message is journaled and fsynced); when no
 * daemon answers, falls back to the file protocol (durable in the outbox,
 * routed when a daemon or `busd send`/`recv` next runs).
 *
 * The message_id (and created_at) is set here before anything is sent, so a
 * file fallback after a lost connection is dropped by busd as a duplicate,
 * never delivered twice.
 *
 * Options: root, from (required), socket (default true; false = files only),
 * socketPath, fsync (default true, files only).
 * Resolves { message_id, via: 'socket' | 'file', duplicate?, path? }.
 */
async function send(message, opts = {}) {
  const from = checkAgent(opts.from);
  const root = findRoot(opts.root);
  const prepared = prepare(message);
  const sockPath = opts.socket === false ? null : opts.socketPath || findSocket(root);
  if (sockPath && !prepared.markdown) {
    let client = null;
    try {
      client = await new Client(sockPath).connect();
      const params = `{"message":${prepared.line},"sender":${JSON.stringify(from)}}`;
      const result = await client.callRaw('publish', params, { timeoutMs: 30000 });
      return { message_id: result.message_id, duplicate: result.duplicate, via: 'socket' };
    } catch (err) {
      // The daemon refused the message (it is in the DLQ now): report that.
      // Anything else (no daemon, connection lost, timeout): use the files.
      if (!(err instanceof BusdError) || err.code !== null) throw err;
    } finally {
      if (client) client.close();
    }
  }
  const dest = publishFile(root, from, prepared.id, Buffer.from(prepared.text, 'utf8'), {
    fsync: opts.fsync !== false,
  });
  return { message_id: prepared.id, via: 'file', path: dest };
}

/**
 * Claim up to `max` messages of `agentId`, waiting up to `waitS` seconds for
 * the first. Resolves a list of { message, delivery_count, lease_expires_at,
 * receipt }. Ack each one (by its receipt) before its lease expires, or it
 * comes back; the receipt of a delivery handed out again is refused with
 * reason `stale_receipt` and never settles the newer one.
 */
function fetch(agentId, opts = {}) {
  checkAgent(agentId);
  const max = opts.max || 1;
  const waitS = opts.waitS || 0;
  return withClient(opts, async (c) => {
    const result = await c.call(
      'fetch',
      { agent_id: agentId, max, wait_s: waitS },
      { timeoutMs: (waitS + 30) * 1000 },
    );
    return result.messages;
  });
}

/**
 * Acknowledge claimed messages of `agentId`: `ids` are message ids (each means
 * "its current claim"), `opts.receipts` name single deliveries. Resolves how
 * many were acked; rejects with reason `stale_receipt` (nothing settled) when
 * a receipt names a delivery that was handed out again.
 */
function ack(agentId, ids, opts = {}) {
  checkAgent(agentId);
  const params = { agent_id: agentId, message_ids: ids || [] };
  // Only when given: a daemon that predates receipts refuses the field.
  if (opts.receipts && opts.receipts.length) params.receipts = opts.receipts;
  return withClient(opts, async (c) => {
    const result = await c.call('ack', params);
    return result.acked;
  });
}

/** `{receipt}` when `opts.receipt` is given, else `{message_id: id}`. */
function claimName(id, opts) {
  if (opts.receipt) return { receipt: opts.receipt };
  if (typeof id !== 'string') throw new BusdError('name a message id or a receipt', 'invalid_params');
  return { message_id: id };
}

/** Put a claimed message back (after `delayS` seconds); `opts.receipt` names one delivery. */
function nack(agentId, id, opts = {}) {
  checkAgent(agentId);
  const params = { agent_id: agentId, ...claimName(id, opts), delay_s: opts.delayS || 0 };
  return withClient(opts, (c) => c.call('nack', params));
}

/** Move a claim's lease to `leaseS` seconds from now; resolves the new expiry (RFC 3339). */
function extend(agentId, id, leaseS, opts = {}) {
  checkAgent(agentId);
  const params = { agent_id: agentId, ...claimName(id, opts), lease_s: leaseS };
  return withClient(opts, async (c) => (await c.call('extend', params)).lease_expires_at);
}

/** The daemon's version, pid and uptime. */
function ping(opts = {}) {
  return withClient(opts, (c) => c.call('ping'));
}

// ------------------------------------------------------------------ CLI

const USAGE = `usage:
  node busd.js send --from AGENT [--root DIR] [--no-socket] [--no-sync] [FILE|-]
  node busd.js fetch AGENT [--max N] [--wait SECONDS] [--root DIR]
  node busd.js ack AGENT [ID...] [--receipt R]... [--root DIR]
  node busd.js ping [--root DIR]

send prints the message_id; fetch prints one JSON object per claimed message
({"message", "delivery_count", "lease_expires_at", "receipt"}); ack prints
"acked N" (a receipt settles that delivery; a stale one fails with exit 65).
Exit codes: 0 ok, 1 other error, 64 usage, 65 invalid message or stale receipt,
66 unreadable input, 69 no bus or no daemon, 74 I/O error.`;

const EXIT = { usage: 64, data: 65, noinput: 66, unavailable: 69, io: 74 };

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = { positional: [] };
  const valued = new Set(['--root', '--from', '--max', '--wait', '--receipt']);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      opts.positional.push(...argv.slice(i + 1));
      break;
    }
    const eq = arg.indexOf('=');
    const name = arg.startsWith('--') && eq > 0 ? arg.slice(0, eq) : arg;
    if (valued.has(name)) {
      let value;
      if (name !== arg) value = arg.slice(eq + 1);
      else if (i + 1 < argv.length) value = argv[++i];
      else throw new UsageError(`${name} needs a value`);
      if (name === '--receipt') (opts.receipts = opts.receipts || []).push(value);
      else opts[name.slice(2)] = value;
    } else if (arg === '--no-socket' || arg === '--no-sync') {
      opts[arg.slice(2)] = true;
    } else if (arg === '-h' || arg === '--help') {
      opts.help = true;
    } else if (arg.startsWith('-') && arg !== '-') {
      throw new UsageError(`unknown option ${arg}`);
    } else {
      opts.positional.push(arg);
    }
  }
  return opts;
}

function positiveNumber(value, name, integer) {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || (integer && (!Number.isInteger(n) || n < 1))) {
    throw new UsageError(`${name} must be a ${integer ? 'positive integer' : 'number >= 0'}`);
  }
  return n;
}

function exitCodeFor(err) {
  if (err instanceof UsageError) return EXIT.usage;
  if (!(err instanceof BusdError)) {
    if (err && typeof err.code === 'string') return EXIT.io; // an fs error (ENOSPC, EACCES...)
    return 1;
  }
  if (err.reason === 'invalid_name') return EXIT.usage;
  if (err.reason === 'stale_receipt') return EXIT.data; // that delivery was handed out again
  if (['no_daemon', 'not_found', 'connection_lost'].includes(err.reason)) return EXIT.unavailable;
  const dataReasons = [
    'schema',
    'invalid_json',
    'invalid_utf8',
    'too_large',
    'unsupported_schema_version',
    'unroutable',
    'not_a_regular_file',
  ];
  if (dataReasons.includes(err.reason)) return EXIT.data;
  return 1;
}

async function main(argv) {
  const [command, ...rest] = argv;
  if (!command || command === '-h' || command === '--help') {
    process.stdout.write(USAGE + '\n');
    return command ? 0 : EXIT.usage;
  }
  const opts = parseArgs(rest);
  if (opts.help) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const common = { root: opts.root };
  if (command === 'send') {
    if (!opts.from) throw new UsageError('send needs --from AGENT');
    if (opts.positional.length > 1) throw new UsageError('send takes one FILE (or -)');
    const file = opts.positional[0] || '-';
    let data;
    try {
      data = fs.readFileSync(file === '-' ? 0 : file);
    } catch (err) {
      process.stderr.write(`busd.js: cannot read ${file}: ${err.message}\n`);
      return EXIT.noinput;
    }
    const result = await send(data, {
      ...common,
      from: opts.from,
      socket: !opts['no-socket'],
      fsync: !opts['no-sync'],
    });
    process.stdout.write(result.message_id + '\n');
    return 0;
  }
  if (command === 'fetch') {
    if (opts.positional.length !== 1) throw new UsageError('fetch takes one AGENT');
    const max = opts.max === undefined ? 1 : positiveNumber(opts.max, '--max', true);
    const waitS = opts.wait === undefined ? 0 : positiveNumber(opts.wait, '--wait', false);
    const claims = await fetch(opts.positional[0], { ...common, max, waitS });
    for (const claim of claims) process.stdout.write(JSON.stringify(claim) + '\n');
    return 0;
  }
  if (command === 'ack') {
    const receipts = opts.receipts || [];
    if (opts.positional.length < 1 || (opts.positional.length < 2 && !receipts.length)) {
      throw new UsageError('ack takes AGENT and at least one ID or --receipt');
    }
    const [agent, ...ids] = opts.positional;
    const n = await ack(agent, ids, { ...common, receipts });
    process.stdout.write(`acked ${n}\n`);
    return 0;
  }
  if (command === 'ping') {
    process.stdout.write(JSON.stringify(await ping(common)) + '\n');
    return 0;
  }
  throw new UsageError(`unknown command ${command}`);
}

module.exports = {
  BusdError,
  Client,
  ack,
  extend,
  fetch,
  findRoot,
  findSocket,
  isValidAgent,
  nack,
  newMessageId,
  pidField,
  ping,
  publishFile,
  send,
};

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err) => {
      const msg = err instanceof UsageError ? `${err.message}\n${USAGE}` : err.message;
      process.stderr.write(`busd.js: ${msg}\n`);
      process.exitCode = exitCodeFor(err);
    },
  );
}
