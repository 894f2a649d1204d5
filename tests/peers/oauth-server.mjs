#!/usr/bin/env node
// OAuth 2.0 / OpenID Connect peer for Postwire's end-to-end tests.
//
// The real protocol work (authorize redirect, PKCE S256 check, token endpoint, signed JWTs,
// JWKS, discovery) is done by the npm package `oauth2-mock-server`. This file puts a strict
// front on it, because the package alone accepts any code and any refresh token:
//
//   GET  /authorize  needs client_id, redirect_uri, response_type=code and a PKCE challenge
//                    with code_challenge_method=S256; redirects at once (no user step) with
//                    code + state; the nonce goes into the ID token.
//   POST /token      authorization_code: the code must have been issued here, unused, unexpired
//                    (10 min), for the same client_id and redirect_uri, with a code_verifier
//                    that matches the challenge. refresh_token: ROTATION, every success issues
//                    a new refresh token and the one presented is spent; a spent, revoked or
//                    unknown refresh token gets 400 {"error":"invalid_grant"}. Other grant
//                    types: 400 unsupported_grant_type.
//   POST /revoke     RFC 7009: revokes the refresh token given as `token`.
//   GET  /jwks, /.well-known/openid-configuration, /userinfo: as the package serves them.
//
// Access tokens and ID tokens are RS256 JWTs signed with the key published at /jwks, with
// iss = http://127.0.0.1:PORT, sub, preferred_username, email, exp (access token: now +
// expires_in), aud (access token: the configured audience; ID token: the client_id).
//
// Control API (JSON over HTTP, same port, under /__control):
//   GET    /__control/state            config, counters, number of live refresh tokens
//   GET    /__control/issued           {"refresh_tokens": [..], "tokens": [..]}: every refresh token
//                                        and access/ID token issued so far (secret-leak tests)
//   GET    /__control/counters         {"token": {"authorization_code": n, "refresh_token": n, ...},
//                                        "token_total": n, "authorize": n, "token_failures_injected": n}
//   POST   /__control/config           partial update of {"expires_in": int|null (null: field left
//                                        out of token responses), "expires_in_as_string": bool,
//                                        "username": str, "email": str|null (null: = username),
//                                        "audience": str, "token_delay_ms": int}
//   POST   /__control/revoke-all       every refresh token issued so far is revoked
//   POST   /__control/token-failures   {"count": n|null, "status": 503, "error": str?,
//                                        "error_description": str?}: the next n token calls
//                                        (null or absent: every call until cleared/reset) fail
//                                        with that status and OAuth error (default
//                                        temporarily_unavailable), e.g. 400 invalid_grant with
//                                        "AADSTS700082: The refresh token has expired..." as
//                                        Microsoft Entra ID answers
//   DELETE /__control/token-failures   stop failing
//   POST   /__control/deny-authorize   {"error": "access_denied", "count": 1}: the next authorize
//                                        redirects with that error instead of a code
//   POST   /__control/mint-refresh-tokens  {"client_id": str, "scope": str, "count": n (1..100000)}:
//                                        n active refresh tokens, as if n users had authorized
//                                        (benchmarks seed grants with them; counts no token call)
//   POST   /__control/reset            config back to the command-line values, counters to zero,
//                                        injected failures cleared (issued tokens stay valid)
//
// Usage: node oauth-server.mjs [--port N] [--host 127.0.0.1] [--username U] [--email E]
//                              [--expires-in SECONDS] [--audience AUD] [--exit-on-stdin-eof]
// When listening it prints ONE line on stdout:
//   {"issuer":"http://127.0.0.1:PORT","port":PORT,"control":"http://127.0.0.1:PORT/__control"}
// Logs go to stderr.

import { createHash, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import { OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    username: { type: 'string', default: 'sender@tenant.example' },
    email: { type: 'string' },
    'expires-in': { type: 'string', default: '3600' },
    audience: { type: 'string', default: 'https://smtp.postwire.test' },
    'exit-on-stdin-eof': { type: 'boolean', default: false },
  },
  strict: true,
});

const CODE_TTL_SECONDS = 600;
const log = (...a) => console.error('[oauth-peer]', ...a);

function defaultConfig() {
  return {
    expires_in: Number.parseInt(args['expires-in'], 10),
    expires_in_as_string: false,
    username: args.username,
    email: args.email ?? null,
    audience: args.audience,
    token_delay_ms: 0,
  };
}

const state = {
  config: defaultConfig(),
  counters: freshCounters(),
  // token failures: null = none; {remaining: n|null, status}
  tokenFailure: null,
  // authorize denials: {remaining: n, error}
  denyAuthorize: null,
  // code -> {clientId, redirectUri, challenge, scope, username, email, issuedAt, used}
  codes: new Map(),
  // refresh token -> {status: 'active'|'used'|'revoked', grant: {clientId, scope, username, email}}
  refreshTokens: new Map(),
  // every access and ID token issued (for tests that check no token leaks into logs)
  issued: [],
};

function freshCounters() {
  return { token: {}, token_total: 0, authorize: 0, token_failures_injected: 0 };
}

// ---------------------------------------------------------------------------------------------
// The package's issuer and service (its express app), behind our own HTTP server.

const issuer = new OAuth2Issuer();
await issuer.keys.generate('RS256');
const service = new OAuth2Service(issuer);

const subjectOf = (username) =>
  'sub-' + createHash('sha256').update(username.toLowerCase()).digest('hex').slice(0, 24);

// Claims of every token: the grant being served is attached to the request as `req.peer`.
service.on('beforeTokenSigning', (token, req) => {
  const grant = req.peer?.grant;
  if (!grant) return;
  const p = token.payload;
  const isAccessToken = 'scope' in p && 'amr' in p;
  p.sub = subjectOf(grant.username);
  p.preferred_username = grant.username;
  p.email = grant.email ?? grant.username;
  if (isAccessToken) {
    p.aud = state.config.audience;
    p.azp = grant.clientId;
    p.client_id = grant.clientId;
    p.scope = grant.scope;
    p.jti = randomUUID();
    p.exp = p.iat + (state.config.expires_in ?? 3600);
  } else {
    p.email_verified = true;
    p.aud = grant.clientId;
  }
});

service.on('beforeResponse', (response, req) => {
  const peer = req.peer;
  if (!peer || response.statusCode !== 200) return;
  const body = response.body;
  if (body.refresh_token) {
    state.refreshTokens.set(body.refresh_token, { status: 'active', grant: peer.grant });
  }
  for (const k of ['access_token', 'id_token']) if (body[k]) state.issued.push(body[k]);
  body.scope = peer.grant.scope;
  const e = state.config.expires_in;
  if (e === null) delete body.expires_in;
  else body.expires_in = state.config.expires_in_as_string ? String(e) : e;
});

service.on('beforeAuthorizeRedirect', (redirect, req) => {
  const pending = req.peer?.pendingCode;
  const code = redirect.url.searchParams.get('code');
  if (pending && code) state.codes.set(code, { ...pending, issuedAt: Date.now(), used: false });
});

// ---------------------------------------------------------------------------------------------
// Helpers

function sendJson(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Cache-Control': 'no-store',
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

const oauthError = (res, status, error, description) =>
  sendJson(res, status, { error, error_description: description });

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > 1 << 20) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function redirectWithError(res, redirectUri, error, description, stateParam) {
  const url = new URL(redirectUri);
  url.searchParams.set('error', error);
  url.searchParams.set('error_description', description);
  if (stateParam) url.searchParams.set('state', stateParam);
  res.writeHead(302, { Location: url.href, 'Content-Length': 0 });
  res.end();
}

// RFC 6749 §2.3.1: client_id:client_secret, each form-urlencoded, in HTTP Basic.
function basicClientId(req) {
  const h = req.headers.authorization;
  if (!h || !/^basic /i.test(h)) return undefined;
  const decoded = Buffer.from(h.slice(6).trim(), 'base64').toString('utf8');
  const i = decoded.indexOf(':');
  const id = i < 0 ? decoded : decoded.slice(0, i);
  try {
    return decodeURIComponent(id.replace(/\+/g, ' '));
  } catch {
    return id;
  }
}

const s256 = (verifier) => createHash('sha256').update(verifier).digest('base64url');

// ---------------------------------------------------------------------------------------------
// /authorize

function handleAuthorize(req, res, url) {
  state.counters.authorize += 1;
  const q = url.searchParams;
  const redirectUri = q.get('redirect_uri');
  let redirectOk = false;
  try {
    redirectOk = !!redirectUri && !!new URL(redirectUri);
  } catch {
    redirectOk = false;
  }
  if (!redirectOk) return oauthError(res, 400, 'invalid_request', 'redirect_uri missing or invalid');
  const clientId = q.get('client_id');
  if (!clientId) return oauthError(res, 400, 'invalid_request', 'client_id missing');
  const st = q.get('state') ?? undefined;
  if (q.get('response_type') !== 'code') {
    return redirectWithError(res, redirectUri, 'unsupported_response_type', 'only response_type=code', st);
  }
  const challenge = q.get('code_challenge');
  if (!challenge || q.get('code_challenge_method') !== 'S256') {
    return redirectWithError(res, redirectUri, 'invalid_request', 'PKCE with code_challenge_method=S256 is required', st);
  }
  if (state.denyAuthorize && state.denyAuthorize.remaining > 0) {
    const { error } = state.denyAuthorize;
    state.denyAuthorize.remaining -= 1;
    if (state.denyAuthorize.remaining <= 0) state.denyAuthorize = null;
    return redirectWithError(res, redirectUri, error, 'The user or administrator has not consented', st);
  }
  const username = q.get('login_hint') || state.config.username;
  req.peer = {
    pendingCode: {
      clientId,
      redirectUri,
      challenge,
      scope: q.get('scope') ?? '',
      username,
      email: q.get('login_hint') ? null : state.config.email,
    },
  };
  service.requestHandler(req, res);
}

// ---------------------------------------------------------------------------------------------
// /token

async function handleToken(req, res) {
  let raw;
  try {
    raw = await readBody(req);
  } catch {
    return oauthError(res, 400, 'invalid_request', 'unreadable body');
  }
  const ctype = (req.headers['content-type'] ?? '').toLowerCase();
  const params = new URLSearchParams(ctype.startsWith('application/x-www-form-urlencoded') ? raw : '');
  const body = Object.fromEntries(params);
  const grantType = body.grant_type ?? '(none)';
  state.counters.token[grantType] = (state.counters.token[grantType] ?? 0) + 1;
  state.counters.token_total += 1;

  if (state.config.token_delay_ms > 0) {
    await new Promise((r) => setTimeout(r, state.config.token_delay_ms));
  }

  const failure = state.tokenFailure;
  if (failure) {
    if (failure.remaining !== null) {
      failure.remaining -= 1;
      if (failure.remaining <= 0) state.tokenFailure = null;
    }
    state.counters.token_failures_injected += 1;
    return oauthError(res, failure.status, failure.error, failure.errorDescription);
  }

  if (!ctype.startsWith('application/x-www-form-urlencoded')) {
    return oauthError(res, 400, 'invalid_request', 'body must be application/x-www-form-urlencoded');
  }
  const clientId = body.client_id ?? basicClientId(req);
  if (!clientId) return oauthError(res, 401, 'invalid_client', 'client_id missing (body or HTTP Basic)');

  let grant;
  if (grantType === 'authorization_code') {
    const entry = body.code && state.codes.get(body.code);
    if (!entry) return oauthError(res, 400, 'invalid_grant', 'unknown authorization code');
    if (entry.used) return oauthError(res, 400, 'invalid_grant', 'authorization code already used');
    entry.used = true;
    if (Date.now() - entry.issuedAt > CODE_TTL_SECONDS * 1000) {
      return oauthError(res, 400, 'invalid_grant', 'authorization code expired');
    }
    if (entry.clientId !== clientId) return oauthError(res, 400, 'invalid_grant', 'code was issued to another client');
    if (entry.redirectUri !== body.redirect_uri) {
      return oauthError(res, 400, 'invalid_grant', 'redirect_uri does not match the authorization request');
    }
    const v = body.code_verifier;
    if (!v || !/^[A-Za-z0-9._~-]{43,128}$/.test(v) || s256(v) !== entry.challenge) {
      return oauthError(res, 400, 'invalid_grant', 'code_verifier missing or does not match code_challenge');
    }
    grant = { clientId, scope: entry.scope, username: entry.username, email: entry.email };
  } else if (grantType === 'refresh_token') {
    const entry = body.refresh_token && state.refreshTokens.get(body.refresh_token);
    if (!entry) return oauthError(res, 400, 'invalid_grant', 'unknown refresh token');
    if (entry.status !== 'active') return oauthError(res, 400, 'invalid_grant', `refresh token ${entry.status}`);
    if (entry.grant.clientId !== clientId) {
      return oauthError(res, 400, 'invalid_grant', 'refresh token was issued to another client');
    }
    entry.status = 'used';
    grant = entry.grant;
  } else {
    return oauthError(res, 400, 'unsupported_grant_type', `grant_type ${grantType} is not supported here`);
  }

  // The package's token handler does the rest; it must not read the (consumed) stream again.
  if (grantType === 'authorization_code') {
    req.body = {
      grant_type: grantType,
      code: body.code,
      code_verifier: body.code_verifier,
      client_id: clientId,
      redirect_uri: body.redirect_uri,
    };
  } else {
    req.body = { grant_type: grantType, client_id: clientId };
  }
  if (grant.scope) req.body.scope = grant.scope;
  req.peer = { grant };
  service.requestHandler(req, res);
}

// ---------------------------------------------------------------------------------------------
// /revoke (RFC 7009)

async function handleRevoke(req, res) {
  const raw = await readBody(req).catch(() => '');
  const body = Object.fromEntries(new URLSearchParams(raw));
  const entry = body.token && state.refreshTokens.get(body.token);
  if (entry && entry.status === 'active') entry.status = 'revoked';
  req.body = body;
  service.requestHandler(req, res);
}

// ---------------------------------------------------------------------------------------------
// Control API

function liveRefreshTokens() {
  let n = 0;
  for (const e of state.refreshTokens.values()) if (e.status === 'active') n += 1;
  return n;
}

async function handleControl(req, res, url) {
  const path = url.pathname.replace(/^\/__control/, '').replace(/\/+$/, '') || '/';
  let body = {};
  if (req.method === 'POST' || req.method === 'PUT') {
    const raw = await readBody(req).catch(() => '');
    if (raw.trim()) {
      try {
        body = JSON.parse(raw);
      } catch {
        return sendJson(res, 400, { error: 'body is not JSON' });
      }
    }
    if (body === null || typeof body !== 'object') return sendJson(res, 400, { error: 'body must be an object' });
  }
  const route = `${req.method} ${path}`;
  switch (route) {
    case 'GET /':
    case 'GET /state':
      return sendJson(res, 200, {
        config: state.config,
        counters: state.counters,
        token_failure: state.tokenFailure,
        deny_authorize: state.denyAuthorize,
        refresh_tokens_active: liveRefreshTokens(),
        issuer: issuer.url,
      });
    case 'GET /counters':
      return sendJson(res, 200, state.counters);
    case 'GET /issued':
      return sendJson(res, 200, { refresh_tokens: [...state.refreshTokens.keys()], tokens: state.issued, codes: [...state.codes.keys()] });
    case 'POST /config': {
      const c = state.config;
      const known = ['expires_in', 'expires_in_as_string', 'username', 'email', 'audience', 'token_delay_ms'];
      for (const k of Object.keys(body)) {
        if (!known.includes(k)) return sendJson(res, 400, { error: `unknown config key ${k}` });
      }
      if ('expires_in' in body) {
        if (body.expires_in !== null && !Number.isInteger(body.expires_in)) {
          return sendJson(res, 400, { error: 'expires_in must be an integer or null' });
        }
        c.expires_in = body.expires_in;
      }
      if ('expires_in_as_string' in body) c.expires_in_as_string = !!body.expires_in_as_string;
      if (typeof body.username === 'string') c.username = body.username;
      if ('email' in body) c.email = body.email;
      if (typeof body.audience === 'string') c.audience = body.audience;
      if (Number.isInteger(body.token_delay_ms)) c.token_delay_ms = body.token_delay_ms;
      return sendJson(res, 200, c);
    }
    case 'POST /revoke-all': {
      let revoked = 0;
      for (const e of state.refreshTokens.values()) {
        if (e.status === 'active') {
          e.status = 'revoked';
          revoked += 1;
        }
      }
      return sendJson(res, 200, { revoked });
    }
    case 'POST /token-failures': {
      const count = body.count ?? null;
      if (count !== null && !(Number.isInteger(count) && count >= 0)) {
        return sendJson(res, 400, { error: 'count must be a non-negative integer or null' });
      }
      const status = body.status ?? 503;
      const error = body.error ?? 'temporarily_unavailable';
      const errorDescription = body.error_description ?? 'injected failure';
      state.tokenFailure = count === 0 ? null : { remaining: count, status, error, errorDescription };
      return sendJson(res, 200, { token_failure: state.tokenFailure });
    }
    case 'DELETE /token-failures':
      state.tokenFailure = null;
      return sendJson(res, 200, { token_failure: null });
    case 'POST /deny-authorize': {
      const count = Number.isInteger(body.count) ? body.count : 1;
      state.denyAuthorize = count > 0 ? { remaining: count, error: body.error ?? 'access_denied' } : null;
      return sendJson(res, 200, { deny_authorize: state.denyAuthorize });
    }
    case 'POST /mint-refresh-tokens': {
      const count = body.count;
      if (!Number.isInteger(count) || count < 1 || count > 100000) {
        return sendJson(res, 400, { error: 'count must be an integer from 1 to 100000' });
      }
      if (typeof body.client_id !== 'string' || !body.client_id) {
        return sendJson(res, 400, { error: 'client_id is required' });
      }
      const grant = {
        clientId: body.client_id,
        scope: typeof body.scope === 'string' ? body.scope : 'openid',
        username: state.config.username,
        email: state.config.email,
      };
      const minted = [];
      for (let i = 0; i < count; i += 1) {
        const token = randomUUID();
        state.refreshTokens.set(token, { status: 'active', grant });
        minted.push(token);
      }
      return sendJson(res, 200, { refresh_tokens: minted });
    }
    case 'POST /reset':
      state.config = defaultConfig();
      state.counters = freshCounters();
      state.tokenFailure = null;
      state.denyAuthorize = null;
      return sendJson(res, 200, { reset: true });
    default:
      return sendJson(res, 404, { error: `no control route ${route}` });
  }
}

// ---------------------------------------------------------------------------------------------
// Server

const server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://peer.invalid');
  const route = url.pathname;
  const fail = (e) => {
    log('error:', e);
    if (!res.headersSent) oauthError(res, 500, 'server_error', String(e?.message ?? e));
    else res.destroy();
  };
  try {
    if (route === '/__control' || route.startsWith('/__control/')) {
      handleControl(req, res, url).catch(fail);
    } else if (route === '/authorize' && req.method === 'GET') {
      handleAuthorize(req, res, url);
    } else if (route === '/token' && req.method === 'POST') {
      handleToken(req, res).catch(fail);
    } else if (route === '/revoke' && req.method === 'POST') {
      handleRevoke(req, res).catch(fail);
    } else {
      service.requestHandler(req, res);
    }
  } catch (e) {
    fail(e);
  }
});

server.on('error', (e) => {
  log('cannot listen:', e.message);
  process.exit(1);
});

server.listen(Number.parseInt(args.port, 10), args.host, () => {
  const { port } = server.address();
  const hostForUrl = args.host.includes(':') ? `[${args.host}]` : args.host;
  issuer.url = `http://${hostForUrl}:${port}`;
  process.stdout.write(
    JSON.stringify({ issuer: issuer.url, port, control: `${issuer.url}/__control` }) + '\n',
  );
  log(`listening on ${issuer.url}`);
});

const stop = () => {
  server.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (args['exit-on-stdin-eof']) {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
