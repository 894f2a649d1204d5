// The "Email configuration" page: a tenant admin's view of the email settings, the OAuth 2.0
// authorization, test emails and sites. Plain ES module, no framework, no build step; it talks
// only to /api/v1 with the bearer token of its sign-in link.

import { Api, ApiError, jwtClaims } from './api.js';

const TOKEN_KEY = 'postwire.admin.token';
const TENANT_KEY = 'postwire.admin.tenant';
const KINDS = [
  ['scan_to_email', 'Scan to email'],
  ['payment_quota', 'Payment and quota'],
  ['notification', 'Notifications'],
  ['report', 'Reports'],
];
const STATUS_TEXT = {
  not_authorized: 'Not authorized',
  authorized: 'Authorized',
  reauthorization_required: 'Reauthorization required',
};

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k in e && typeof v !== 'string') e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
};

const state = {
  api: null,
  tenant: null,
  presets: [],
  settings: null, // the last GET/PUT answer; null when none is stored yet
  snapshot: '', // the form's request as loaded/saved, to tell unsaved changes
  secrets: { password: { set: false, replacing: false }, client_secret: { set: false, replacing: false } },
  senders: [], // [{address, name, default}]
  receivers: [], // [{address, purpose}]
  rowSeq: 0,
  expiryTimer: null,
  oauthPending: null,
  editingSite: null,
  lastDirectory: 'organizations',
};

// ------------------------------------------------------------------------------------------
// Sign-in: the token arrives in the fragment (#token=...), moves to sessionStorage and leaves
// the address bar; the page signs out when it expires.

function takeTokenFromUrl() {
  if (!location.hash.startsWith('#')) return;
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get('token');
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  const tenant = params.get('tenant');
  if (tenant) sessionStorage.setItem(TENANT_KEY, tenant);
  else sessionStorage.removeItem(TENANT_KEY);
  history.replaceState(null, '', location.pathname + location.search);
}

function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(TENANT_KEY);
  clearTimeout(state.expiryTimer);
  state.api = null;
  state.snapshot = serialize(); // nothing left to guard
  $('app').hidden = true;
  $('loading').hidden = true;
  $('sign-out').hidden = true;
  $('who').textContent = '';
  $('signed-out-reason').textContent = reason || 'You are signed out. Open the page with a new sign-in link.';
  $('signed-out').hidden = false;
  if (state.tenant) {
    const v = document.querySelector('#signed-out var');
    if (v) v.textContent = state.tenant;
  }
}

function start() {
  takeTokenFromUrl();
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return signOut('Open this page with a sign-in link.');
  const claims = jwtClaims(token);
  if (!claims) return signOut('The sign-in link is damaged: ask for a new one.');
  const tenant = claims.tenant || sessionStorage.getItem(TENANT_KEY);
  state.tenant = tenant || null;
  if (!tenant) return signOut('This sign-in is not for a tenant: ask for a tenant admin link (--role tenant_admin --tenant ...).');
  const expMs = typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  if (expMs !== null && expMs <= Date.now()) return signOut(`Your sign-in expired at ${fmtTime(new Date(expMs))}. Open a new sign-in link.`);
  state.api = new Api(token, (reason) => signOut(`${reason} Open a new sign-in link.`));
  if (expMs !== null) {
    const left = expMs - Date.now();
    // setTimeout holds at most ~24.8 days; a longer token is re-checked when the page shows.
    if (left < 2 ** 31 - 1) {
      state.expiryTimer = setTimeout(() => signOut(`Your sign-in expired at ${fmtTime(new Date(expMs))}. Open a new sign-in link.`), left);
    }
    document.addEventListener('visibilitychange', () => {
      if (state.api && Date.now() >= expMs) signOut(`Your sign-in expired at ${fmtTime(new Date(expMs))}. Open a new sign-in link.`);
    });
  }
  $('who').textContent = `Tenant ${tenant}${expMs ? ` · signed in until ${fmtTime(new Date(expMs))}` : ''}`;
  $('sign-out').hidden = false;
  $('signed-out').hidden = true;
  load();
}

// ------------------------------------------------------------------------------------------
// Loading

const tenantPath = (rest = '') => `/tenants/${encodeURIComponent(state.tenant)}${rest}`;

async function load() {
  $('loading').hidden = false;
  try {
    state.presets = await state.api.get('/email/providers');
    fillProviderSelect();
    let settings = null;
    try {
      settings = await state.api.get(tenantPath('/email-settings'));
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 404) throw e;
      showBanner('No email settings are stored for this tenant yet: choose a provider and save.');
    }
    if (!state.api) return;
    state.settings = settings;
    if (settings) fillForm(settings);
    else fillDefaults();
    $('loading').hidden = true;
    $('app').hidden = false;
    await loadSites();
  } catch (e) {
    $('loading').hidden = true;
    if (state.api) showBanner(problemText(e), true);
  }
}

function fillProviderSelect() {
  const sel = $('provider');
  sel.replaceChildren(...state.presets.map((p) => el('option', { value: p.id, text: p.experimental ? `${p.name} (experimental)` : p.name })));
}

const presetOf = (id) => state.presets.find((p) => p.id === id);

function showProviderNotes() {
  const p = presetOf($('provider').value);
  $('provider-notes').replaceChildren(...(p?.notes || []).map((n) => el('li', { text: n })));
  const ms = $('provider').value === 'microsoft365';
  $('ms-directory-field').hidden = !ms;
  for (const r of document.querySelectorAll('input[name="auth-method"]')) {
    r.disabled = !!p && !p.auth.methods.includes(r.value) && !r.checked;
  }
}

function directoryValue() {
  return $('auth-microsoft-directory').value.trim() || 'organizations';
}

/** Fills what a preset defines: host, port, encryption, method, URLs and scopes. */
function applyPreset(id) {
  const p = presetOf(id);
  if (!p) return;
  const dir = directoryValue();
  const fill = (v) => (v ? v.replaceAll('{directory}', dir) : '');
  $('server-host').value = p.server.host || '';
  $('server-port').value = String(p.server.port);
  $('server-encryption').value = p.server.encryption;
  if (!p.auth.methods.includes(method())) setMethod(p.auth.recommended_method);
  $('auth-authorization-url').value = fill(p.auth.authorization_url);
  $('auth-token-url').value = fill(p.auth.token_url);
  $('auth-issuer').value = fill(p.auth.issuer);
  $('auth-scopes').value = p.auth.scopes.join(' ');
  if (id === 'microsoft365' && !$('auth-microsoft-directory').value.trim()) $('auth-microsoft-directory').value = 'organizations';
  state.lastDirectory = directoryValue();
  showProviderNotes();
}

function fillDefaults() {
  const first = state.presets[0]?.id || 'custom';
  $('provider').value = first;
  $('auth-microsoft-directory').value = 'organizations';
  setMethod(presetOf(first)?.auth.recommended_method || 'none');
  applyPreset(first);
  setSecret('password', false);
  setSecret('client_secret', false);
  state.senders = [];
  state.receivers = [];
  renderSenders();
  renderReceivers();
  setFeatureSenders({});
  renderOauth(null);
  markSaved();
}

function fillForm(s) {
  $('provider').value = s.provider;
  $('server-host').value = s.server.host || '';
  $('server-port').value = s.server.port != null ? String(s.server.port) : '';
  $('server-encryption').value = s.server.encryption || 'starttls';
  const a = s.auth;
  setMethod(a.method);
  $('auth-username').value = a.username || '';
  $('auth-client-id').value = a.client_id || '';
  $('auth-client-secret-expires-at').value = a.client_secret_expires_at || '';
  $('auth-authorization-url').value = a.authorization_url || '';
  $('auth-token-url').value = a.token_url || '';
  $('auth-issuer').value = a.issuer || '';
  $('auth-scopes').value = (a.scopes || []).join(' ');
  $('auth-authorization-username').value = a.authorization_username || '';
  $('auth-microsoft-directory').value = a.microsoft_directory || (s.provider === 'microsoft365' ? 'organizations' : '');
  state.lastDirectory = directoryValue();
  setSecret('password', !!a.password_set);
  setSecret('client_secret', !!a.client_secret_set);
  state.senders = (s.senders || []).map((x) => ({ address: x.address, name: x.name || '', default: !!x.default, key: ++state.rowSeq }));
  state.receivers = (s.receivers || []).map((x) => ({ address: x.address, purpose: x.purpose || '', key: ++state.rowSeq }));
  renderSenders();
  renderReceivers();
  setFeatureSenders(s.feature_senders || {});
  showProviderNotes();
  renderOauth(s.oauth);
  clearErrors($('settings-form'));
  markSaved();
}

// ------------------------------------------------------------------------------------------
// The authorization type and the write-only secrets

const method = () => document.querySelector('input[name="auth-method"]:checked')?.value || 'none';

function setMethod(m) {
  for (const r of document.querySelectorAll('input[name="auth-method"]')) r.checked = r.value === m;
  showMethod();
}

function showMethod() {
  const m = method();
  $('auth-password-fields').hidden = m !== 'password';
  $('auth-oauth2-fields').hidden = m !== 'oauth2';
  $('oauth-panel').hidden = m !== 'oauth2';
  showRedirectUri(state.settings?.oauth?.redirect_uri || `${location.origin}/oauth2/client/smtp/authorize-callback`);
}

/** The redirect URI, and a warning when this page is open under another address than the
 * registered one (the provider would refuse the redirect, or the result would not come back). */
function showRedirectUri(uri) {
  $('redirect-uri').value = uri;
  let origin = '';
  try { origin = new URL(uri).origin; } catch { /* shown as is */ }
  const w = $('origin-warning');
  w.hidden = !origin || origin === location.origin;
  w.textContent = w.hidden ? '' : `This page is open at ${location.origin}, but the redirect URI is at ${origin}. Authorize from ${origin}/admin/ (the address registered with the provider); http and https count as different addresses.`;
}

function secretBox(name) {
  return document.querySelector(`.secret[data-secret="${name}"]`);
}

/** A stored secret shows "set" and a Replace button; its value is never shown. */
function setSecret(name, isSet) {
  state.secrets[name] = { set: isSet, replacing: false };
  const box = secretBox(name);
  const input = box.querySelector('input');
  input.value = '';
  box.querySelector('.secret-state').hidden = !isSet;
  box.querySelector('.secret-input').hidden = isSet;
  box.querySelector('.secret-keep').hidden = true;
}

function replaceSecret(name) {
  const box = secretBox(name);
  state.secrets[name].replacing = true;
  box.querySelector('.secret-state').hidden = true;
  box.querySelector('.secret-input').hidden = false;
  box.querySelector('.secret-keep').hidden = false;
  box.querySelector('input').focus();
  updateDirty();
}

function keepSecret(name) {
  setSecret(name, state.secrets[name].set);
  secretBox(name).querySelector('.secret-replace').focus();
  updateDirty();
}

/** The secret to send: only a newly typed one (omitted = keep the stored one). */
function secretValue(name, inputId) {
  const v = $(inputId).value;
  const s = state.secrets[name];
  if ((!s.set || s.replacing) && v !== '') return v;
  return undefined;
}

// ------------------------------------------------------------------------------------------
// Senders, receivers and the per-feature senders

function renderSenders() {
  const list = $('sender-list');
  list.replaceChildren(
    ...state.senders.map((s, i) => {
      const id = `sender-${s.key}`;
      const address = el('input', { id: `${id}-address`, type: 'email', value: s.address, autocomplete: 'off', spellcheck: 'false', 'data-field': `senders[${i}].address` });
      address.addEventListener('input', () => { s.address = address.value.trim(); refreshFeatureOptions(); });
      const name = el('input', { id: `${id}-name`, value: s.name, autocomplete: 'off', 'data-field': `senders[${i}].name` });
      name.addEventListener('input', () => { s.name = name.value; });
      const def = el('input', { id: `${id}-default`, type: 'radio', name: 'default-sender', checked: s.default, 'data-field': `senders[${i}].default` });
      def.addEventListener('change', () => { state.senders.forEach((x) => { x.default = x === s; }); updateDirty(); });
      const remove = el('button', { type: 'button', class: 'secondary', text: 'Remove', 'aria-label': `Remove sender ${i + 1}` });
      remove.addEventListener('click', () => {
        state.senders.splice(i, 1);
        if (s.default && state.senders.length) state.senders[0].default = true;
        renderSenders();
        refreshFeatureOptions();
        updateDirty();
        ($('sender-list').querySelector('input') || $('add-sender')).focus();
      });
      return el('li', { class: 'item' },
        el('div', { class: 'field grow' }, el('label', { for: address.id, text: `Sender ${i + 1} address` }), address),
        el('div', { class: 'field grow' }, el('label', { for: name.id, text: `Sender ${i + 1} display name` }), name),
        el('div', { class: 'field check' }, def, el('label', { for: def.id, text: 'Default' })),
        remove);
    }),
  );
  refreshFeatureOptions();
}

function renderReceivers() {
  const list = $('receiver-list');
  list.replaceChildren(
    ...state.receivers.map((r, i) => {
      const id = `receiver-${r.key}`;
      const address = el('input', { id: `${id}-address`, type: 'email', value: r.address, autocomplete: 'off', spellcheck: 'false', 'data-field': `receivers[${i}].address` });
      address.addEventListener('input', () => { r.address = address.value.trim(); });
      const purpose = el('select', { id: `${id}-purpose`, 'data-field': `receivers[${i}].purpose` },
        el('option', { value: '', text: 'Every kind' }),
        ...KINDS.map(([k, label]) => el('option', { value: k, text: label })));
      purpose.value = r.purpose;
      purpose.addEventListener('change', () => { r.purpose = purpose.value; });
      const remove = el('button', { type: 'button', class: 'secondary', text: 'Remove', 'aria-label': `Remove receiver ${i + 1}` });
      remove.addEventListener('click', () => {
        state.receivers.splice(i, 1);
        renderReceivers();
        updateDirty();
        ($('receiver-list').querySelector('input') || $('add-receiver')).focus();
      });
      return el('li', { class: 'item' },
        el('div', { class: 'field grow' }, el('label', { for: address.id, text: `Receiver ${i + 1} address` }), address),
        el('div', { class: 'field' }, el('label', { for: purpose.id, text: `Receiver ${i + 1} purpose` }), purpose),
        remove);
    }),
  );
}

function refreshFeatureOptions() {
  const addresses = [...new Set(state.senders.map((s) => s.address).filter(Boolean))];
  for (const sel of document.querySelectorAll('#feature-senders select')) {
    const current = sel.dataset.value ?? sel.value;
    sel.replaceChildren(el('option', { value: '', text: 'The default sender' }), ...addresses.map((a) => el('option', { value: a, text: a })));
    // A stored choice that is no longer a sender stays visible until changed (the server
    // names the field if it is saved that way).
    if (current && !addresses.includes(current)) sel.append(el('option', { value: current, text: `${current} (not a sender)` }));
    sel.value = current || '';
    delete sel.dataset.value;
  }
}

function setFeatureSenders(fs) {
  for (const sel of document.querySelectorAll('#feature-senders select')) {
    sel.dataset.value = fs[sel.dataset.kind] || '';
  }
  refreshFeatureOptions();
}

// ------------------------------------------------------------------------------------------
// The request, unsaved changes and saving

const opt = (v) => (v.trim() === '' ? null : v.trim());

function buildRequest({ withSecrets = true } = {}) {
  const provider = $('provider').value;
  const port = $('server-port').value.trim();
  const body = {
    provider,
    server: { host: $('server-host').value.trim(), port: port === '' ? null : Number(port), encryption: $('server-encryption').value },
    auth: { method: method() },
    senders: state.senders.map((s) => ({ address: s.address, name: opt(s.name), default: !!s.default })),
    receivers: state.receivers.map((r) => ({ address: r.address, purpose: r.purpose || null })),
    feature_senders: Object.fromEntries(KINDS.map(([k]) => [k, $(`fs-${k}`).value || null])),
  };
  const a = body.auth;
  if (a.method === 'password') {
    a.username = opt($('auth-username').value);
    if (withSecrets) {
      const p = secretValue('password', 'auth-password');
      if (p !== undefined) a.password = p;
    }
  } else if (a.method === 'oauth2') {
    a.client_id = opt($('auth-client-id').value);
    if (withSecrets) {
      const cs = secretValue('client_secret', 'auth-client-secret');
      if (cs !== undefined) a.client_secret = cs;
    }
    a.client_secret_expires_at = opt($('auth-client-secret-expires-at').value);
    a.authorization_url = opt($('auth-authorization-url').value);
    a.token_url = opt($('auth-token-url').value);
    a.issuer = opt($('auth-issuer').value);
    a.scopes = $('auth-scopes').value.split(/[\s,]+/).filter(Boolean);
    a.authorization_username = opt($('auth-authorization-username').value);
  }
  if (provider === 'microsoft365') a.microsoft_directory = opt($('auth-microsoft-directory').value);
  return body;
}

function serialize() {
  if ($('provider').options.length === 0) return '';
  const typed = ['auth-password', 'auth-client-secret'].map((id) => $(id).value);
  return JSON.stringify([buildRequest({ withSecrets: false }), typed, state.secrets]);
}

function markSaved() {
  state.snapshot = serialize();
  updateDirty();
}

const isDirty = () => state.api !== null && state.snapshot !== '' && serialize() !== state.snapshot;

function updateDirty() {
  const dirty = isDirty();
  $('dirty-state').hidden = !dirty;
  $('discard').disabled = !dirty;
}

async function save() {
  const form = $('settings-form');
  clearErrors(form);
  $('save-status').textContent = 'Saving…';
  try {
    const s = await state.api.put(tenantPath('/email-settings'), buildRequest());
    state.settings = s;
    fillForm(s);
    showBanner('');
    $('save-status').textContent = `Saved at ${fmtTime(new Date())}.`;
    return true;
  } catch (e) {
    $('save-status').textContent = 'Not saved.';
    showProblem(form, e, $('form-errors'));
    return false;
  }
}

// ------------------------------------------------------------------------------------------
// Errors: each 422 field error next to its field; the rest in the form's summary

function clearErrors(root) {
  for (const e of root.querySelectorAll('.field-error')) e.remove();
  for (const e of root.querySelectorAll('[aria-invalid]')) {
    e.removeAttribute('aria-invalid');
    const ids = (e.getAttribute('aria-describedby') || '').split(' ').filter((x) => x && !x.startsWith('err-'));
    if (ids.length) e.setAttribute('aria-describedby', ids.join(' '));
    else e.removeAttribute('aria-describedby');
  }
  for (const s of root.querySelectorAll('.form-errors')) { s.hidden = true; s.replaceChildren(); }
}

/** The element of a dotted JSON path, trying its parents: `senders[0].address`, `senders[0]`, `senders`. */
function fieldElement(root, path) {
  let p = path;
  while (p) {
    const found = root.querySelector(`[data-field="${CSS.escape(p)}"]`);
    if (found && !found.closest('[hidden]')) return found;
    const cut = Math.max(p.lastIndexOf('.'), p.lastIndexOf('['));
    p = cut > 0 ? p.slice(0, cut) : '';
  }
  return null;
}

let errSeq = 0;
function showProblem(root, e, summary) {
  const errors = e instanceof ApiError ? e.fieldErrors : [];
  const unplaced = [];
  let first = null;
  for (const fe of errors) {
    // A refused stored secret (e.g. "must be sent again" after a host change): open its input.
    const secret = { 'auth.password': 'password', 'auth.client_secret': 'client_secret' }[fe.field];
    if (secret && root.contains(secretBox(secret)) && !secretBox(secret).closest('[hidden]') && !state.secrets[secret].replacing) {
      replaceSecret(secret);
    }
    let target = fieldElement(root, fe.field);
    if (target && target.type === 'radio') target = target.closest('fieldset') || target;
    if (!target) { unplaced.push(`${fe.field}: ${fe.message}`); continue; }
    const id = `err-${++errSeq}`;
    const msg = el('p', { class: 'field-error', id, text: fe.message });
    if (target.tagName === 'FIELDSET') target.append(msg);
    else (target.closest('.field') || target.parentElement).append(msg);
    target.setAttribute('aria-invalid', 'true');
    target.setAttribute('aria-describedby', `${target.getAttribute('aria-describedby') || ''} ${id}`.trim());
    if (!first) first = target;
  }
  if (!errors.length) unplaced.push(problemText(e));
  if (summary && unplaced.length) {
    summary.replaceChildren(el('p', { text: errors.length ? 'Please correct these fields:' : '' }), el('ul', {}, ...unplaced.map((u) => el('li', { text: u }))));
    if (!errors.length) summary.firstChild.remove();
    summary.hidden = false;
  }
  if (first) {
    const focusable = first.tagName === 'FIELDSET' ? first.querySelector('input, select, button') : first;
    focusable?.focus();
  } else if (summary) {
    summary.setAttribute('tabindex', '-1');
    summary.focus();
  }
}

function problemText(e) {
  if (e instanceof ApiError) {
    const p = e.problem || {};
    const detail = p.detail || '';
    return detail && p.title && !detail.startsWith(p.title) ? `${p.title}: ${detail}` : detail || p.title || `Error ${e.status}`;
  }
  return String(e?.message || e);
}

// ------------------------------------------------------------------------------------------
// OAuth 2.0: status and the Authorize popup

function fmtTime(d) {
  return d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}
const fmtDate = (s) => (s ? fmtTime(new Date(s)) : '—');

function renderOauth(o) {
  const status = o?.status || 'not_authorized';
  const badge = $('oauth-status');
  badge.textContent = STATUS_TEXT[status] || status;
  badge.className = `badge status-${status}`;
  badge.dataset.status = status;
  $('oauth-username').textContent = o?.username || '—';
  const reason = status === 'reauthorization_required' ? o?.last_error || 'The provider no longer accepts the grant.' : status === 'authorized' && o?.last_error ? o.last_error : '';
  $('oauth-reason').textContent = reason;
  $('oauth-reason').hidden = !reason;
  $('oauth-reason-dt').hidden = !reason;
  $('oauth-expires').textContent = fmtDate(o?.access_token_expires_at);
  $('oauth-refreshed').textContent = fmtDate(o?.refreshed_at);
  const warnings = o?.warnings || [];
  $('oauth-warnings').replaceChildren(...warnings.map((w) => el('li', { text: w })));
  $('oauth-warnings-box').hidden = warnings.length === 0;
  $('authorize').textContent = status === 'not_authorized' ? 'Authorize' : 'Re-authorize';
  $('forget').disabled = status === 'not_authorized';
  if (o?.redirect_uri) showRedirectUri(o.redirect_uri);
}

function oauthMessage(text, kind = 'info') {
  const m = $('oauth-message');
  m.textContent = text;
  m.className = `message ${kind}`;
  m.hidden = !text;
}

async function reloadSettings() {
  const s = await state.api.get(tenantPath('/email-settings'));
  state.settings = s;
  if (!isDirty()) fillForm(s);
  else renderOauth(s.oauth);
  return s;
}

async function authorize() {
  oauthMessage('');
  $('oauth-fallback').hidden = true;
  // Opened now, in the click, so that popup blockers allow it; pointed at the provider once
  // the server has prepared the authorization.
  const popup = window.open('', 'postwire-oauth', 'popup,width=560,height=720');
  if (!popup) {
    oauthMessage('The browser blocked the authorization window. Allow pop-ups for this site and press Authorize again.', 'error');
  } else {
    try { popup.document.title = 'Authorizing…'; popup.document.body.textContent = 'Contacting the provider…'; } catch { /* not ours */ }
  }
  const close = () => { try { popup?.close(); } catch { /* gone */ } };
  if (isDirty() || !state.settings) {
    oauthMessage('Saving the settings first…');
    if (!(await save())) {
      close();
      oauthMessage('The settings were not saved: correct the marked fields, then authorize.', 'error');
      return;
    }
  }
  let r;
  try {
    r = await state.api.post(tenantPath('/email-settings/oauth/authorize'));
  } catch (e) {
    close();
    if (e instanceof ApiError && e.status === 422) showProblem($('settings-form'), e, $('form-errors'));
    oauthMessage(`Authorization cannot start: ${problemText(e)}`, 'error');
    return;
  }
  $('oauth-fallback-link').href = r.authorization_url;
  if (!popup) {
    // Blocked: offer the link (it keeps this page as its opener to report back).
    oauthMessage('The browser blocked the authorization window. Allow pop-ups for this site and press Authorize again.', 'error');
    $('oauth-fallback').hidden = false;
    return;
  }
  if (popup.closed) {
    oauthMessage('The authorization window was closed before the authorization finished. Press Authorize to try again.', 'error');
    return;
  }
  popup.location.href = r.authorization_url;
  oauthMessage('Waiting for the authorization in the pop-up window…');
  const pending = { popup, done: false };
  const before = state.settings?.oauth?.refreshed_at ?? null;
  state.oauthPending = pending;
  const timer = setInterval(async () => {
    if (pending.done) return clearInterval(timer);
    let closed = true;
    try { closed = popup.closed; } catch { /* treat as closed */ }
    if (!closed) return;
    clearInterval(timer);
    // The callback posts its message just before closing: give it a moment to arrive.
    await new Promise((res) => setTimeout(res, 800));
    if (pending.done) return;
    pending.done = true;
    try {
      // No message (e.g. the window was closed by hand on the callback page): the status tells.
      const s = await reloadSettings();
      if (s.oauth?.status === 'authorized' && s.oauth?.refreshed_at !== before) {
        oauthMessage(`Authorized as ${s.oauth.username || s.auth?.authorization_username || 'the provider\'s user'}.`, 'ok');
        return;
      }
    } catch { /* shown below */ }
    oauthMessage('The authorization window was closed before the authorization finished. Press Authorize to try again.', 'error');
  }, 500);
}

async function onOauthMessage(ev) {
  if (ev.origin !== location.origin) return; // only our own callback page
  const d = ev.data;
  if (!d || d.type !== 'postwire:oauth') return;
  if (d.tenant && d.tenant !== state.tenant) return;
  if (state.oauthPending) state.oauthPending.done = true;
  $('oauth-fallback').hidden = true;
  if (d.outcome === 'authorized') {
    try {
      const s = await reloadSettings();
      const user = d.username || s.oauth?.username || s.auth?.authorization_username;
      if (user && !$('auth-authorization-username').value) $('auth-authorization-username').value = user;
      oauthMessage(user ? `Authorized as ${user}.` : 'Authorized. The provider did not name the user: enter the authorization username and save.', 'ok');
    } catch (e) {
      oauthMessage(`Authorized, but the status cannot be read: ${problemText(e)}`, 'error');
    }
    return;
  }
  const desc = d.description ? ` (${d.description})` : '';
  if (d.error === 'access_denied') {
    oauthMessage(`Access was denied at the provider (access_denied)${desc}: the consent was declined, or the user may not use this application. Nothing was changed; press Authorize to try again.`, 'error');
  } else {
    oauthMessage(`The authorization failed: ${d.error || 'unknown error'}${desc}.`, 'error');
  }
  try { await reloadSettings(); } catch { /* status stays as shown */ }
}

async function forget() {
  if (!window.confirm('Forget the OAuth 2.0 authorization? Sending with OAuth 2.0 stops until you authorize again.')) return;
  try {
    await state.api.del(tenantPath('/email-settings/oauth'));
    await reloadSettings();
    oauthMessage('The authorization was forgotten.', 'ok');
  } catch (e) {
    oauthMessage(problemText(e), 'error');
  }
}

// ------------------------------------------------------------------------------------------
// Test email

async function sendTest(ev) {
  ev.preventDefault();
  const form = $('test-form');
  clearErrors(form);
  const out = $('test-result');
  out.hidden = false;
  out.className = 'message';
  if (isDirty() || !state.settings) {
    out.textContent = 'Save your changes first: the test email uses the saved settings.';
    out.classList.add('error');
    return;
  }
  out.textContent = 'Sending…';
  $('send-test').disabled = true;
  try {
    const r = await state.api.post(tenantPath('/email-settings/test'), { to: $('test-to').value.trim() });
    out.textContent = `Sent. The server replied: ${r.smtp_reply}`;
    out.classList.add('ok');
  } catch (e) {
    if (e instanceof ApiError && e.fieldErrors.length) {
      out.hidden = true;
      showProblem(form, e, null);
    } else {
      // The server appends a hint for well-known failures: shown on its own line.
      const text = problemText(e);
      const at = text.indexOf(' Hint: ');
      out.replaceChildren(el('span', { text: `Not sent: ${at < 0 ? text : text.slice(0, at)}` }));
      if (at >= 0) out.append(el('span', { class: 'hint', text: text.slice(at + 1) }));
      out.classList.add('error');
    }
  } finally {
    $('send-test').disabled = false;
  }
}

// ------------------------------------------------------------------------------------------
// Sites

async function loadSites() {
  const sites = await state.api.get(tenantPath('/sites'));
  const body = $('sites-body');
  body.replaceChildren(
    ...sites.map((s) => {
      const edit = el('button', { type: 'button', class: 'secondary', text: 'Edit', 'aria-label': `Edit site ${s.name}` });
      edit.addEventListener('click', () => editSite(s));
      const del = el('button', { type: 'button', class: 'secondary danger', text: 'Delete', 'aria-label': `Delete site ${s.name}` });
      del.addEventListener('click', () => deleteSite(s));
      const o = s.override;
      const override = o ? `${o.server.host}:${o.server.port} (${o.method === 'password' ? `password${o.username ? `, ${o.username}` : ''}` : 'no authorization'})` : '—';
      return el('tr', { 'data-site-id': s.site_id },
        el('td', { 'data-label': 'Name', text: s.name }),
        el('td', { 'data-label': 'Site id' }, el('code', { text: s.site_id })),
        el('td', { 'data-label': 'Override', text: override }),
        el('td', { 'data-label': 'Created', text: fmtDate(s.created_at) }),
        el('td', { class: 'row-actions' }, edit, del));
    }),
  );
  $('sites-empty').hidden = sites.length > 0;
  $('sites-table').hidden = sites.length === 0;
}

// The site form creates a site, or changes the one being edited (`state.editingSite`).
function editSite(s) {
  const form = $('site-form');
  clearErrors(form);
  form.reset();
  state.editingSite = s;
  const o = s.override;
  $('site-form-h').textContent = `Edit site "${s.name}"`;
  $('site-name').value = s.name;
  $('site-override').checked = !!o;
  $('site-override-fields').hidden = !o;
  if (o) {
    $('site-host').value = o.server.host;
    $('site-port').value = String(o.server.port);
    $('site-encryption').value = o.server.encryption;
    $('site-method').value = o.method;
    $('site-username').value = o.username || '';
  }
  $('site-password').placeholder = o && o.password_set ? 'unchanged: type a new one to replace it' : '';
  $('create-site').textContent = 'Save site';
  $('cancel-site-edit').hidden = false;
  $('site-status').textContent = '';
  $('site-name').focus();
}

function endSiteEdit() {
  state.editingSite = null;
  $('site-form').reset();
  clearErrors($('site-form'));
  $('site-override-fields').hidden = true;
  $('site-password').placeholder = '';
  $('site-form-h').textContent = 'New site';
  $('create-site').textContent = 'Create site';
  $('cancel-site-edit').hidden = true;
}

async function createSite(ev) {
  ev.preventDefault();
  const form = $('site-form');
  clearErrors(form);
  const editing = state.editingSite;
  const body = { name: $('site-name').value.trim() };
  if ($('site-override').checked) {
    const port = $('site-port').value.trim();
    const m = $('site-method').value;
    const auth = { method: m };
    if (m === 'password') {
      auth.username = opt($('site-username').value);
      const pw = $('site-password').value;
      // editing: an empty field keeps the stored password (the server refuses that when the
      // host changed, and says so at the field)
      if (pw || !editing) auth.password = pw || null;
    }
    body.override = {
      server: { host: $('site-host').value.trim(), port: port === '' ? null : Number(port), encryption: $('site-encryption').value },
      auth,
    };
  }
  if (editing) {
    $('site-status').textContent = 'Saving…';
    try {
      await state.api.put(tenantPath(`/sites/${encodeURIComponent(editing.site_id)}`), body);
      endSiteEdit();
      await loadSites();
      $('site-status').textContent = `Site "${body.name}" saved.`;
    } catch (e) {
      $('site-status').textContent = 'Not saved.';
      showProblem(form, e, $('site-form-errors'));
    }
    return;
  }
  $('site-status').textContent = 'Creating…';
  try {
    const s = await state.api.post(tenantPath('/sites'), body);
    $('site-status').textContent = '';
    form.reset();
    $('site-override-fields').hidden = true;
    $('site-secret-id').value = s.site_id;
    $('site-secret-value').value = s.secret;
    $('site-secret').hidden = false;
    $('site-secret-h').focus();
    await loadSites();
  } catch (e) {
    $('site-status').textContent = 'Not created.';
    showProblem(form, e, $('site-form-errors'));
  }
}

function forgetSiteSecret() {
  $('site-secret-value').value = '';
  $('site-secret-id').value = '';
  $('site-secret').hidden = true;
  $('site-name').focus();
}

async function deleteSite(s) {
  if (!window.confirm(`Delete the site "${s.name}"? Its site mailer can no longer sign in.`)) return;
  try {
    await state.api.del(tenantPath(`/sites/${encodeURIComponent(s.site_id)}`));
    if (state.editingSite && state.editingSite.site_id === s.site_id) endSiteEdit();
    $('site-status').textContent = `Site "${s.name}" deleted.`;
    await loadSites();
    $('site-name').focus();
  } catch (e) {
    $('site-status').textContent = problemText(e);
  }
}

// ------------------------------------------------------------------------------------------
// Small things

function showBanner(text, error = false) {
  const b = $('banner');
  b.textContent = text;
  b.className = `banner${error ? ' error' : ''}`;
  b.hidden = !text;
}

async function copyFrom(inputId, button) {
  const input = $(inputId);
  let ok = false;
  try {
    await navigator.clipboard.writeText(input.value);
    ok = true;
  } catch {
    input.select();
    ok = document.execCommand('copy');
  }
  const label = button.textContent;
  button.textContent = ok ? 'Copied' : 'Select and copy by hand';
  setTimeout(() => { button.textContent = label; }, 2000);
}

/** A corrected field loses its error at once. */
function clearFieldError(target) {
  const field = target?.closest?.('[aria-invalid="true"]');
  if (!field) return;
  const ids = (field.getAttribute('aria-describedby') || '').split(' ').filter(Boolean);
  for (const id of ids.filter((x) => x.startsWith('err-'))) $(id)?.remove();
  field.removeAttribute('aria-invalid');
  const rest = ids.filter((x) => !x.startsWith('err-'));
  if (rest.length) field.setAttribute('aria-describedby', rest.join(' '));
  else field.removeAttribute('aria-describedby');
}

function wire() {
  document.addEventListener('input', (ev) => clearFieldError(ev.target));
  document.addEventListener('change', (ev) => clearFieldError(ev.target));
  const form = $('settings-form');
  form.addEventListener('input', updateDirty);
  form.addEventListener('change', updateDirty);
  form.addEventListener('submit', (ev) => { ev.preventDefault(); save(); });
  $('discard').addEventListener('click', () => {
    if (state.settings) fillForm(state.settings);
    else fillDefaults();
    $('save-status').textContent = 'Changes discarded.';
  });
  $('provider').addEventListener('change', () => { applyPreset($('provider').value); updateDirty(); });
  $('auth-microsoft-directory').addEventListener('change', () => {
    // Microsoft's URLs carry the directory: follow the change where they do.
    const prev = state.lastDirectory;
    const next = directoryValue();
    if (prev && prev !== next) {
      for (const id of ['auth-authorization-url', 'auth-token-url', 'auth-issuer']) {
        $(id).value = $(id).value.replace(`.com/${prev}/`, `.com/${next}/`);
      }
    }
    state.lastDirectory = next;
    updateDirty();
  });
  for (const r of document.querySelectorAll('input[name="auth-method"]')) r.addEventListener('change', showMethod);
  for (const box of document.querySelectorAll('.secret')) {
    const name = box.dataset.secret;
    box.querySelector('.secret-replace').addEventListener('click', () => replaceSecret(name));
    box.querySelector('.secret-keep').addEventListener('click', () => keepSecret(name));
  }
  $('add-sender').addEventListener('click', () => {
    state.senders.push({ address: '', name: '', default: state.senders.length === 0, key: ++state.rowSeq });
    renderSenders();
    updateDirty();
    $(`sender-${state.rowSeq}-address`).focus();
  });
  $('add-receiver').addEventListener('click', () => {
    state.receivers.push({ address: '', purpose: '', key: ++state.rowSeq });
    renderReceivers();
    updateDirty();
    $(`receiver-${state.rowSeq}-address`).focus();
  });
  for (const b of document.querySelectorAll('button.copy')) b.addEventListener('click', () => copyFrom(b.dataset.copy, b));
  $('authorize').addEventListener('click', authorize);
  $('forget').addEventListener('click', forget);
  window.addEventListener('message', onOauthMessage);
  $('test-form').addEventListener('submit', sendTest);
  $('site-form').addEventListener('submit', createSite);
  $('cancel-site-edit').addEventListener('click', () => { endSiteEdit(); $('site-status').textContent = ''; });
  $('site-override').addEventListener('change', () => { $('site-override-fields').hidden = !$('site-override').checked; });
  $('site-method').addEventListener('change', () => { $('site-credentials').hidden = $('site-method').value !== 'password'; });
  $('site-secret-done').addEventListener('click', forgetSiteSecret);
  $('sign-out').addEventListener('click', () => {
    if (isDirty() && !window.confirm('You have unsaved changes. Sign out anyway?')) return;
    signOut('You signed out.');
  });
  // The unsaved-changes guard: leaving or reloading the page asks first.
  window.addEventListener('beforeunload', (ev) => {
    if (isDirty()) { ev.preventDefault(); ev.returnValue = ''; }
  });
  window.addEventListener('hashchange', () => { if (location.hash.includes('token=')) start(); });
}

wire();
start();
