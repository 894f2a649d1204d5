#!/usr/bin/env node
// SMTP submission peer for Postwire's end-to-end tests: the npm package `smtp-server`
// (nodemailer) on loopback, with TLS from a throw-away CA, PLAIN/LOGIN/XOAUTH2 and a recorder.
//
// Usage: node smtp-server.mjs [options]
//   --port N               SMTP port (default 0: any free port)
//   --control-port N       control API port (default 0)
//   --host H               listen address (default 127.0.0.1)
//   --secure               implicit TLS (port-465 style); default is STARTTLS (port-587 style)
//   --no-tls               plain text, no STARTTLS; AUTH allowed without TLS
//   --cert-out PATH        write the CA certificate (PEM) that signed the server certificate
//                          there, for clients to trust (default: a new temp dir); the server
//                          certificate names localhost, 127.0.0.1, ::1 and --name
//   --name NAME            server name in the greeting and certificate (default smtp.postwire.test)
//   --users u:p,u2:p2      accounts for PLAIN/LOGIN (the password is what follows the first ':')
//   --jwks-url URL         XOAUTH2: verify the bearer token (JWT signature against this JWKS,
//                          exp/nbf); the XOAUTH2 user must equal its preferred_username or email
//   --issuer ISS           XOAUTH2: also require this `iss`
//   --audience AUD         XOAUTH2: also require this `aud`
//   --xoauth2-failure M    how a rejected XOAUTH2 token is answered: `535` (default; 535 5.7.3
//                          like Microsoft 365) or `gmail` (334 + base64 JSON
//                          {"status":"400","schemes":"Bearer","scope":...}, then 535 5.7.8)
//   --no-auth              AUTH is optional: unauthenticated MAIL FROM is accepted
//   --size N               advertised SIZE limit; larger messages are refused with 552
//   --idle-timeout MS      close a connection idle this long with "421 Timeout" (default 60 s)
//   --no-pipelining        do not announce PIPELINING (RFC 2920) in the EHLO reply
//   --verbose              log the SMTP conversation to stderr
//   --exit-on-stdin-eof    exit when stdin closes (the parent test process went away)
//
// AUTH advertises PLAIN LOGIN XOAUTH2. With STARTTLS, AUTH before STARTTLS is refused (530).
//
// Ready line on stdout (one JSON line):
//   {"port":P,"control_port":C,"host":"127.0.0.1","tls":"starttls"|"implicit"|"none","cert_pem":PATH}
//
// Control API (JSON over HTTP on 127.0.0.1:control_port):
//   GET    /messages   accepted messages, oldest first: [{"id","from","to":[..],"auth_user",
//                      "auth_method","tls","helo","size","data" (utf-8, lossy),"data_base64",
//                      "received_at"}]
//   DELETE /messages   forget them
//   GET    /auth       every AUTH attempt: [{"method","username","ok","reason","at"}]
//   POST   /fail       {"code":421,"message":"...","count":2,"stage":"data"|"rcpt"|"mail"|"auth"|"connect"}
//                      answers the next `count` (default 1) transactions at that stage (default
//                      "data") with that reply instead of accepting; 421 closes the connection
//                      as real servers do. Rules queue up; each stage uses the oldest live one.
//   POST   /config     {"xoauth2_failure":"535"|"gmail", "revoked_until": <unix seconds>|null}
//                      revoked_until: XOAUTH2 tokens issued (JWT `iat`) at or before that time
//                      are refused, as a provider that revoked the user's sessions does
//   GET    /state      counters, config and pending failure rules
//   POST   /reset      messages, auth attempts, failure rules and counters cleared

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

import { createRemoteJWKSet, jwtVerify } from 'jose';
import selfsigned from 'selfsigned';
import { SMTPServer } from 'smtp-server';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'control-port': { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    secure: { type: 'boolean', default: false },
    'no-tls': { type: 'boolean', default: false },
    'cert-out': { type: 'string' },
    name: { type: 'string', default: 'smtp.postwire.test' },
    users: { type: 'string', default: '' },
    'jwks-url': { type: 'string' },
    issuer: { type: 'string' },
    audience: { type: 'string' },
    'xoauth2-failure': { type: 'string', default: '535' },
    'no-auth': { type: 'boolean', default: false },
    size: { type: 'string' },
    'idle-timeout': { type: 'string' },
    'no-pipelining': { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
    'exit-on-stdin-eof': { type: 'boolean', default: false },
  },
  strict: true,
});

const log = (...a) => console.error('[smtp-peer]', ...a);
const die = (msg) => {
  log(msg);
  process.exit(2);
};

if (args.secure && args['no-tls']) die('--secure and --no-tls exclude each other');
const XOAUTH2_MODES = ['535', 'gmail'];
if (!XOAUTH2_MODES.includes(args['xoauth2-failure'])) die('--xoauth2-failure must be 535 or gmail');

const users = new Map();
for (const pair of args.users.split(',').filter(Boolean)) {
  const i = pair.indexOf(':');
  if (i <= 0) die(`--users: "${pair}" is not user:password`);
  users.set(pair.slice(0, i), pair.slice(i + 1));
}

const jwks = args['jwks-url'] ? createRemoteJWKSet(new URL(args['jwks-url'])) : null;

// ---------------------------------------------------------------------------------------------
// State

const state = {
  config: { xoauth2_failure: args['xoauth2-failure'] },
  messages: [],
  authAttempts: [],
  failRules: [], // {stage, code, message, remaining}
  counters: { connections: 0, transactions: 0, accepted: 0, rejected: 0 },
  nextId: 1,
};

const STAGES = ['connect', 'auth', 'mail', 'rcpt', 'data'];

// The oldest live rule of a stage, consumed once.
function takeRule(stage) {
  const rule = state.failRules.find((r) => r.stage === stage && r.remaining > 0);
  if (!rule) return null;
  rule.remaining -= 1;
  state.failRules = state.failRules.filter((r) => r.remaining > 0);
  state.counters.rejected += 1;
  const err = new Error(rule.message);
  err.responseCode = rule.code;
  return err;
}

function smtpError(code, message) {
  const err = new Error(message);
  err.responseCode = code;
  return err;
}

// ---------------------------------------------------------------------------------------------
// TLS: a throw-away CA and a server certificate signed by it.

async function makeCertificates() {
  const notBeforeDate = new Date(Date.now() - 24 * 3600 * 1000);
  const notAfterDate = new Date(Date.now() + 365 * 24 * 3600 * 1000);
  const base = { keyType: 'ec', curve: 'P-256', algorithm: 'sha256', notBeforeDate, notAfterDate };
  const ca = await selfsigned.generate([{ name: 'commonName', value: 'Postwire test peer CA' }], {
    ...base,
    extensions: [
      { name: 'basicConstraints', cA: true, critical: true },
      { name: 'keyUsage', keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
    ],
  });
  const altNames = [
    { type: 2, value: 'localhost' },
    { type: 7, ip: '127.0.0.1' },
    { type: 7, ip: '::1' },
  ];
  if (args.name !== 'localhost') altNames.push({ type: 2, value: args.name });
  const leaf = await selfsigned.generate([{ name: 'commonName', value: args.name }], {
    ...base,
    ca: { key: ca.private, cert: ca.cert },
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'keyUsage', digitalSignature: true, critical: true },
      { name: 'extKeyUsage', serverAuth: true },
      { name: 'subjectAltName', altNames },
    ],
  });
  return { caPem: ca.cert, certPem: leaf.cert, keyPem: leaf.private };
}

const tlsMode = args.secure ? 'implicit' : args['no-tls'] ? 'none' : 'starttls';
let certPath = null;
let tlsOptions = {};
if (tlsMode !== 'none') {
  const { caPem, certPem, keyPem } = await makeCertificates();
  if (args['cert-out']) {
    certPath = args['cert-out'];
  } else {
    const dir = mkdtempSync(join(tmpdir(), 'smtp-peer-'));
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
    certPath = join(dir, 'ca.pem');
  }
  writeFileSync(certPath, `${caPem.trim()}\n`);
  // The chain (server certificate + CA) so that clients can build the path from either.
  tlsOptions = { key: keyPem, cert: `${certPem.trim()}\n${caPem.trim()}\n` };
}

// ---------------------------------------------------------------------------------------------
// Authentication

function recordAuth(auth, ok, reason) {
  state.authAttempts.push({
    method: auth.method,
    username: auth.username ?? null,
    ok,
    reason: reason ?? null,
    at: new Date().toISOString(),
  });
}

async function verifyXoauth2(auth) {
  if (!jwks) throw new Error('no --jwks-url: XOAUTH2 tokens cannot be verified');
  const opts = {};
  if (args.issuer) opts.issuer = args.issuer;
  if (args.audience) opts.audience = args.audience;
  const { payload } = await jwtVerify(auth.accessToken, jwks, opts);
  const revokedUntil = state.config.revoked_until;
  if (Number.isInteger(revokedUntil) && !(Number.isInteger(payload.iat) && payload.iat > revokedUntil)) {
    throw new Error(`token issued at ${payload.iat}, sessions revoked until ${revokedUntil}`);
  }
  const user = auth.username.toLowerCase();
  const names = [payload.preferred_username, payload.email]
    .filter((v) => typeof v === 'string')
    .map((v) => v.toLowerCase());
  if (!names.includes(user)) {
    throw new Error(`token is for ${names.join('/') || 'nobody'}, not ${auth.username}`);
  }
}

function onAuth(auth, session, callback) {
  const injected = takeRule('auth');
  if (injected) {
    recordAuth(auth, false, `injected ${injected.responseCode}`);
    return callback(injected);
  }
  const succeed = () => {
    recordAuth(auth, true);
    session.peerAuthMethod = auth.method;
    callback(null, { user: auth.username });
  };
  if (auth.method === 'PLAIN' || auth.method === 'LOGIN') {
    if (users.has(auth.username) && users.get(auth.username) === auth.password) return succeed();
    recordAuth(auth, false, 'bad username or password');
    return callback(smtpError(535, 'Authentication credentials invalid'));
  }
  if (auth.method === 'XOAUTH2') {
    verifyXoauth2(auth).then(succeed, (e) => {
      const reason = e?.code ? `${e.code}: ${e.message}` : String(e?.message ?? e);
      recordAuth(auth, false, reason);
      log(`XOAUTH2 rejected for ${auth.username}: ${reason}`);
      if (state.config.xoauth2_failure === 'gmail') {
        // smtp-server answers 334 <base64 JSON>, waits for the client's empty line, then 535.
        return callback(null, {
          data: { status: '400', schemes: 'Bearer', scope: 'https://mail.google.com/' },
        });
      }
      return callback(smtpError(535, 'Authentication unsuccessful [peer: token rejected]'));
    });
    return;
  }
  recordAuth(auth, false, 'unsupported method');
  callback(smtpError(504, `Unrecognized authentication type ${auth.method}`));
}

// ---------------------------------------------------------------------------------------------
// The SMTP server

const server = new SMTPServer({
  name: args.name,
  banner: 'Postwire test peer (smtp-server) ready',
  secure: tlsMode === 'implicit',
  ...tlsOptions,
  ...(tlsMode === 'none' ? { disabledCommands: ['STARTTLS'], allowInsecureAuth: true } : {}),
  authMethods: ['PLAIN', 'LOGIN', 'XOAUTH2'],
  authOptional: args['no-auth'],
  hideENHANCEDSTATUSCODES: false,
  disableReverseLookup: true,
  ...(args.size ? { size: Number.parseInt(args.size, 10), rejectOversized: true } : {}),
  ...(args['idle-timeout'] ? { socketTimeout: Number.parseInt(args['idle-timeout'], 10) } : {}),
  hidePIPELINING: args['no-pipelining'],
  logger: args.verbose
    ? {
        info: (...a) => log(...a.filter((x) => typeof x !== 'object')),
        debug: (...a) => log(...a.filter((x) => typeof x !== 'object')),
        error: (...a) => log(...a.filter((x) => typeof x !== 'object')),
      }
    : false,

  onConnect(session, callback) {
    state.counters.connections += 1;
    callback(takeRule('connect'));
  },

  onAuth,

  onMailFrom(address, session, callback) {
    state.counters.transactions += 1;
    session.peerTxFailed = null;
    callback(takeRule('mail'));
  },

  onRcptTo(address, session, callback) {
    // A transaction picked for a RCPT failure refuses all its recipients.
    if (!session.peerTxFailed) session.peerTxFailed = takeRule('rcpt');
    callback(session.peerTxFailed);
  },

  onData(stream, session, callback) {
    const chunks = [];
    stream.on('data', (c) => chunks.push(c));
    stream.on('error', (e) => callback(e));
    stream.on('end', () => {
      const injected = takeRule('data');
      if (injected) return callback(injected);
      if (stream.sizeExceeded) return callback(smtpError(552, 'Message exceeds fixed maximum message size'));
      const raw = Buffer.concat(chunks);
      const id = state.nextId++;
      state.messages.push({
        id,
        from: session.envelope.mailFrom ? session.envelope.mailFrom.address : null,
        to: session.envelope.rcptTo.map((r) => r.address),
        auth_user: session.user || null,
        auth_method: session.user ? (session.peerAuthMethod ?? null) : null,
        tls: !!session.secure,
        helo: session.hostNameAppearsAs ?? null,
        size: raw.length,
        data: raw.toString('utf8'),
        data_base64: raw.toString('base64'),
        received_at: new Date().toISOString(),
      });
      state.counters.accepted += 1;
      callback(null, `Queued as peer-${id}`);
    });
  },
});

server.on('error', (e) => log('smtp error:', e.message));

// ---------------------------------------------------------------------------------------------
// Control API

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('error', reject);
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8').trim();
      if (!raw) return resolve({});
      try {
        const v = JSON.parse(raw);
        if (v === null || typeof v !== 'object') reject(new Error('body must be a JSON object'));
        else resolve(v);
      } catch (e) {
        reject(e);
      }
    });
  });
}

async function handleControl(req, res) {
  const path = new URL(req.url ?? '/', 'http://peer.invalid').pathname.replace(/\/+$/, '') || '/';
  const route = `${req.method} ${path}`;
  let body = {};
  if (req.method === 'POST' || req.method === 'PUT') {
    try {
      body = await readJson(req);
    } catch (e) {
      return sendJson(res, 400, { error: `bad JSON: ${e.message}` });
    }
  }
  switch (route) {
    case 'GET /messages':
      return sendJson(res, 200, state.messages);
    case 'DELETE /messages':
      state.messages = [];
      return sendJson(res, 200, { deleted: true });
    case 'GET /auth':
      return sendJson(res, 200, state.authAttempts);
    case 'POST /fail': {
      const code = body.code;
      if (!Number.isInteger(code) || code < 400 || code > 599) {
        return sendJson(res, 400, { error: 'code must be an SMTP error code (4xx/5xx)' });
      }
      const stage = body.stage ?? 'data';
      if (!STAGES.includes(stage)) return sendJson(res, 400, { error: `stage must be one of ${STAGES.join(', ')}` });
      const count = body.count ?? 1;
      if (!Number.isInteger(count) || count < 1) return sendJson(res, 400, { error: 'count must be >= 1' });
      const message =
        typeof body.message === 'string' && body.message
          ? body.message
          : code < 500
            ? 'Temporary failure (injected by the test)'
            : 'Permanent failure (injected by the test)';
      const rule = { stage, code, message, remaining: count };
      state.failRules.push(rule);
      return sendJson(res, 200, rule);
    }
    case 'POST /config': {
      if ('xoauth2_failure' in body) {
        const m = String(body.xoauth2_failure);
        if (!XOAUTH2_MODES.includes(m)) return sendJson(res, 400, { error: 'xoauth2_failure must be 535 or gmail' });
        state.config.xoauth2_failure = m;
      }
      if ('revoked_until' in body) {
        const t = body.revoked_until;
        if (t !== null && !Number.isInteger(t)) return sendJson(res, 400, { error: 'revoked_until must be unix seconds or null' });
        state.config.revoked_until = t;
      }
      return sendJson(res, 200, state.config);
    }
    case 'GET /':
    case 'GET /state':
      return sendJson(res, 200, {
        config: state.config,
        counters: state.counters,
        messages: state.messages.length,
        fail_rules: state.failRules,
        tls: tlsMode,
      });
    case 'POST /reset':
      state.messages = [];
      state.authAttempts = [];
      state.failRules = [];
      state.counters = { connections: 0, transactions: 0, accepted: 0, rejected: 0 };
      state.config = { xoauth2_failure: args['xoauth2-failure'] };
      return sendJson(res, 200, { reset: true });
    default:
      return sendJson(res, 404, { error: `no control route ${route}` });
  }
}

const control = createServer((req, res) => {
  handleControl(req, res).catch((e) => {
    log('control error:', e);
    if (!res.headersSent) sendJson(res, 500, { error: String(e?.message ?? e) });
  });
});

const listen = (srv, port) =>
  new Promise((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(port, args.host, () => resolve(srv.server ? srv.server.address().port : srv.address().port));
  });

let smtpPort;
let controlPort;
try {
  smtpPort = await listen(server, Number.parseInt(args.port, 10));
  controlPort = await listen(control, Number.parseInt(args['control-port'], 10));
} catch (e) {
  die(`cannot listen: ${e.message}`);
}

process.stdout.write(
  JSON.stringify({ port: smtpPort, control_port: controlPort, host: args.host, tls: tlsMode, cert_pem: certPath }) +
    '\n',
);
log(`SMTP (${tlsMode}) on ${args.host}:${smtpPort}, control on http://${args.host}:${controlPort}`);

const stop = () => {
  control.close();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 500).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (args['exit-on-stdin-eof']) {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
