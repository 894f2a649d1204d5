// The admin page in headless Chromium (Debian's /usr/bin/chromium via npm playwright-core).
// Started by tests/browser/main.rs (`cargo test -p postwire-tests --test browser`), which
// runs the live Management Service and the real OAuth and SMTP peers and passes their
// addresses in PW_* environment variables. The tests run in order and share one browser.
//
//   node --test tests/browser/admin-page.test.mjs   (with the PW_* variables set)

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set: run this through \`cargo test -p postwire-tests --test browser\``);
  return v;
};
const SIGN_IN_URL = env('PW_SIGN_IN_URL');
const SHORT_SIGN_IN_URL = env('PW_SHORT_SIGN_IN_URL');
const PUBLIC_HOST = env('PW_PUBLIC_HOST');
const APP_PORT = env('PW_APP_PORT');
const ISSUER = env('PW_OAUTH_ISSUER');
const USER = env('PW_OAUTH_USER');
const SMTP_HOST = env('PW_SMTP_HOST');
const SMTP_PORT = env('PW_SMTP_PORT');
const SMTP_CONTROL = env('PW_SMTP_CONTROL_URL').replace(/\/$/, '');
const ARTIFACTS = env('PW_ARTIFACTS');
const CLUSTER_TOKEN = env('PW_CLUSTER_TOKEN');
const CHROMIUM = process.env.PW_CHROMIUM || '/usr/bin/chromium';
const ORIGIN = `http://${PUBLIC_HOST}`;
const TIMEOUT = 30_000; // generous: the machine may be busy building

let context;
let page;
let expiring;
let profile;
const pageProblems = [];

async function shot(name, p = page) {
  await p.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

function watch(p) {
  p.on('console', (m) => {
    // A CSP violation or a script error is a defect of the page.
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) pageProblems.push(`console: ${m.text()}`);
  });
  p.on('pageerror', (e) => pageProblems.push(`pageerror: ${e.message}`));
}

async function control(url, method = 'GET', body) {
  const r = await fetch(url, { method, headers: body ? { 'content-type': 'application/json' } : {}, body: body ? JSON.stringify(body) : undefined });
  assert.ok(r.ok, `${method} ${url}: ${r.status}`);
  return r.json();
}

const status = () => page.locator('#oauth-status');

async function waitUntil(cond, what, ms = TIMEOUT) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting until ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

before(async () => {
  profile = mkdtempSync(join(tmpdir(), 'postwire-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      // The service as the browser sees it: its public URL, on the test's port.
      `--host-resolver-rules=MAP ${PUBLIC_HOST} 127.0.0.1:${APP_PORT}`,
    ],
  });
  context.setDefaultTimeout(TIMEOUT);
  context.on('page', watch);
  page = context.pages()[0] || (await context.newPage());
  watch(page);
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

test('0. a short sign-in link signs in (its expiry is checked at the end)', async () => {
  expiring = await context.newPage();
  await expiring.goto(SHORT_SIGN_IN_URL);
  await expiring.locator('#app').waitFor({ state: 'visible' });
  assert.ok(!(await expiring.locator('#signed-out').isVisible()));
});

test('1. a sign-in link signs in; the token leaves the address bar for session storage', async () => {
  const resp = await page.goto(SIGN_IN_URL);
  assert.equal(resp.status(), 200);
  const h = resp.headers();
  assert.match(h['content-security-policy'], /script-src 'self'/);
  assert.doesNotMatch(h['content-security-policy'], /unsafe-inline/);
  assert.equal(h['x-frame-options'], 'DENY');
  assert.equal(h['x-content-type-options'], 'nosniff');
  await page.locator('#app').waitFor({ state: 'visible' });
  assert.equal(await page.evaluate(() => location.hash), '');
  assert.equal(await page.evaluate(() => location.href), `${ORIGIN}/admin/`);
  const stored = await page.evaluate(() => sessionStorage.getItem('postwire.admin.token'));
  assert.equal(stored, SIGN_IN_URL.split('#token=')[1]);
  assert.match(await page.locator('#who').textContent(), /Tenant acme/);
  assert.equal(await page.evaluate(() => document.querySelectorAll('script:not([src])').length), 0, 'no inline script');
  // every input has a label
  const unlabeled = await page.evaluate(() =>
    [...document.querySelectorAll('input, select, textarea')]
      .filter((e) => e.type !== 'hidden' && e.labels.length === 0 && !e.getAttribute('aria-label'))
      .map((e) => e.id || e.outerHTML));
  assert.deepEqual(unlabeled, []);
  // a reload keeps the session (session storage), without the token in the URL
  await page.reload();
  await page.locator('#app').waitFor({ state: 'visible' });
  await shot('01-signed-in');
});

test('2. presets fill the connection; Microsoft 365 asks for the directory (default organizations)', async () => {
  await page.selectOption('#provider', 'microsoft365');
  assert.equal(await page.inputValue('#server-host'), 'smtp.office365.com');
  assert.equal(await page.inputValue('#server-port'), '587');
  assert.equal(await page.inputValue('#server-encryption'), 'starttls');
  assert.ok(await page.locator('#auth-microsoft-directory').isVisible());
  assert.equal(await page.inputValue('#auth-microsoft-directory'), 'organizations');
  assert.equal(await page.inputValue('#auth-token-url'), 'https://login.microsoftonline.com/organizations/oauth2/v2.0/token');
  // the directory follows into the URLs; filled fields stay editable
  await page.fill('#auth-microsoft-directory', 'contoso.onmicrosoft.com');
  await page.locator('#auth-microsoft-directory').blur();
  assert.equal(await page.inputValue('#auth-token-url'), 'https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token');
  assert.ok(await page.locator('#server-host').isEditable());
  // the authorization type shows only the fields that apply
  await page.check('#auth-method-password');
  assert.ok(await page.locator('#auth-username').isVisible());
  assert.ok(!(await page.locator('#auth-client-id').isVisible()));
  await page.check('#auth-method-oauth2');
  assert.ok(await page.locator('#auth-client-id').isVisible());
  assert.ok(!(await page.locator('#auth-username').isVisible()));
  assert.equal(await page.inputValue('#redirect-uri'), `${ORIGIN}/oauth2/client/smtp/authorize-callback`);
  assert.ok(!(await page.locator('#origin-warning').isVisible()), 'opened at the registered address');
  await shot('02-microsoft365-preset');
});

test('3. a validation error appears next to its field', async () => {
  await page.selectOption('#provider', 'custom');
  assert.ok(!(await page.locator('#auth-microsoft-directory').isVisible()));
  await page.check('#auth-method-none');
  await page.fill('#server-host', SMTP_HOST);
  await page.fill('#server-port', SMTP_PORT);
  await page.click('#add-sender');
  await page.keyboard.type('not-an-address');
  assert.ok(await page.locator('#dirty-state').isVisible(), 'unsaved changes are shown');
  await page.click('#save');
  const input = page.locator('#sender-list input[type="email"]').first();
  await page.waitForFunction(() => document.querySelector('#sender-list [aria-invalid="true"]'));
  assert.equal(await input.getAttribute('aria-invalid'), 'true');
  const errId = (await input.getAttribute('aria-describedby')).split(' ').pop();
  const err = page.locator(`#${errId}`);
  assert.ok(await err.isVisible());
  assert.match(await err.textContent(), /address/i);
  // the error sits in the sender's own row, and focus went to the field
  assert.equal(await page.evaluate((id) => document.getElementById(id).closest('li') === document.querySelector('#sender-list li'), errId), true);
  assert.equal(await page.evaluate(() => document.activeElement.closest('#sender-list') !== null), true);
  await shot('03-validation-error');
  // remove the bad sender again
  await page.click('#sender-list button:has-text("Remove")');
  assert.equal(await page.locator('#sender-list li').count(), 0);
});

test('4. Custom with OAuth 2.0 at the local server; Authorize completes in the popup', async () => {
  await page.check('#auth-method-oauth2');
  await page.selectOption('#server-encryption', 'starttls');
  await page.fill('#server-host', SMTP_HOST);
  await page.fill('#server-port', SMTP_PORT);
  await page.fill('#auth-client-id', 'postwire-admin-page');
  await page.fill('#auth-client-secret', 'client-secret-value');
  await page.fill('#auth-authorization-url', `${ISSUER}/authorize`);
  await page.fill('#auth-token-url', `${ISSUER}/token`);
  await page.fill('#auth-issuer', ISSUER);
  await page.fill('#auth-scopes', 'openid profile email offline_access');
  assert.equal(await status().getAttribute('data-status'), 'not_authorized');
  const [popup] = await Promise.all([page.waitForEvent('popup'), page.click('#authorize')]);
  // the popup goes to the provider, comes back to our callback, reports and closes
  await popup.waitForEvent('close', { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelector('#oauth-status').dataset.status === 'authorized');
  await shot('04-authorized');
});

test('5. the username appears and the status shows authorized, with expiry and last refresh', async () => {
  assert.equal(await page.inputValue('#auth-authorization-username'), USER);
  assert.equal(await page.locator('#oauth-username').textContent(), USER);
  assert.match(await page.locator('#oauth-message').textContent(), new RegExp(`Authorized as ${USER.replace('.', '\\.')}`));
  assert.notEqual(await page.locator('#oauth-expires').textContent(), '—');
  assert.notEqual(await page.locator('#oauth-refreshed').textContent(), '—');
  assert.equal(await page.locator('#authorize').textContent(), 'Re-authorize');
  // the stored client secret shows "set" with Replace, never its value
  const box = page.locator('.secret[data-secret="client_secret"]');
  assert.ok(await box.locator('.secret-state').isVisible());
  assert.match(await box.locator('.secret-state').textContent(), /set/);
  assert.ok(!(await page.locator('#auth-client-secret').isVisible()));
  assert.equal(await page.inputValue('#auth-client-secret'), '');
  assert.ok(!(await page.content()).includes('client-secret-value'));
  assert.ok(!(await page.locator('#dirty-state').isVisible()));
  // Replace opens an empty field (focused); Keep goes back to the stored secret
  await box.locator('.secret-replace').click();
  assert.ok(await page.locator('#auth-client-secret').isVisible());
  assert.equal(await page.evaluate(() => document.activeElement.id), 'auth-client-secret');
  assert.equal(await page.inputValue('#auth-client-secret'), '');
  await box.locator('.secret-keep').click();
  assert.ok(await box.locator('.secret-state').isVisible());
  assert.ok(!(await page.locator('#dirty-state').isVisible()));
  // a new token URL needs the secret again (a stored secret never goes to a new host): the
  // refusal opens the secret's field and shows the reason there
  await page.fill('#auth-token-url', `${ISSUER}/token?moved=1`);
  await page.click('#save');
  await page.waitForFunction(() => document.querySelector('#auth-client-secret').getAttribute('aria-invalid') === 'true');
  assert.ok(await page.locator('#auth-client-secret').isVisible());
  assert.match(await page.locator('.secret[data-secret="client_secret"] .field-error').textContent(), /must be sent again/);
  await shot('05-secret-needed-again');
  await page.click('#discard');
  assert.equal(await page.inputValue('#auth-token-url'), `${ISSUER}/token`);
  assert.ok(await box.locator('.secret-state').isVisible());
  assert.equal(await page.locator('.field-error').count(), 0);
});

test('6. senders, receivers and a per-feature sender are added and saved', async () => {
  await page.click('#add-sender');
  await page.keyboard.type(USER);
  await page.fill('#sender-list input[id$="-name"]', 'Acme Scanner');
  assert.ok(await page.locator('#sender-list input[type="radio"]').first().isChecked(), 'the first sender is the default');
  await page.click('#add-receiver');
  await page.keyboard.type('it@acme.example');
  await page.selectOption('#receiver-list select', 'report');
  await page.selectOption('#fs-scan_to_email', USER);
  await page.click('#save');
  await page.waitForFunction(() => /Saved/.test(document.querySelector('#save-status').textContent));
  assert.ok(!(await page.locator('#dirty-state').isVisible()));
  // saved for real: a reload shows it
  await page.reload();
  await page.locator('#app').waitFor({ state: 'visible' });
  assert.equal(await page.inputValue('#sender-list input[type="email"]'), USER);
  assert.equal(await page.inputValue('#receiver-list select'), 'report');
  assert.equal(await page.inputValue('#fs-scan_to_email'), USER);
  assert.equal(await status().getAttribute('data-status'), 'authorized');
  await shot('06-senders-saved');
});

test('7. a test email goes out, and the SMTP server receives it with XOAUTH2', async () => {
  // first refused like Microsoft 365 with SMTP AUTH disabled: the reply and the hint are shown
  await control(`${SMTP_CONTROL}/fail`, 'POST', { code: 535, message: '5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.', stage: 'auth', count: 2 });
  await page.fill('#test-to', 'it@acme.example');
  await page.click('#send-test');
  await page.waitForFunction(() => /Sent|Not sent/.test(document.querySelector('#test-result').textContent));
  const refused = await page.locator('#test-result').textContent();
  assert.match(refused, /^Not sent: /);
  assert.match(refused, /535/);
  assert.match(refused, /Hint: .*Security Defaults/);
  await shot('07-test-email-refused-with-hint');
  await control(`${SMTP_CONTROL}/reset`, 'POST', {});
  await page.fill('#test-to', 'it@acme.example');
  await page.click('#send-test');
  const result = page.locator('#test-result');
  await page.waitForFunction(() => /Sent|Not sent/.test(document.querySelector('#test-result').textContent));
  assert.match(await result.textContent(), /^Sent\. The server replied: 250/);
  const msgs = await control(`${SMTP_CONTROL}/messages`);
  assert.equal(msgs.length, 1);
  assert.equal(msgs[0].auth_method, 'XOAUTH2');
  assert.equal(msgs[0].auth_user, USER);
  assert.deepEqual(msgs[0].to, ['it@acme.example']);
  await shot('07-test-email-sent');
  // a refused address is shown at the field
  await page.fill('#test-to', 'nobody');
  await page.click('#send-test');
  await page.waitForFunction(() => document.querySelector('#test-to').getAttribute('aria-invalid') === 'true');
  assert.ok(await page.locator('#test-form .field-error').isVisible());
  // correcting the field clears its error
  await page.fill('#test-to', 'it@acme.example');
  assert.equal(await page.locator('#test-form .field-error').count(), 0);
  assert.equal(await page.getAttribute('#test-to', 'aria-invalid'), null);
});

test('8. access_denied in the popup is reported and changes nothing', async () => {
  await control(`${ISSUER}/__control/deny-authorize`, 'POST', { error: 'access_denied', count: 1 });
  const [popup] = await Promise.all([page.waitForEvent('popup'), page.click('#authorize')]);
  await popup.waitForEvent('close', { timeout: TIMEOUT });
  await page.waitForFunction(() => /access_denied/.test(document.querySelector('#oauth-message').textContent));
  assert.match(await page.locator('#oauth-message').textContent(), /Access was denied at the provider/);
  assert.equal(await status().getAttribute('data-status'), 'authorized', 'the existing grant is kept');
  await shot('08-access-denied');
});

test('9. a closed popup and a blocked popup each show a clear message', async () => {
  // Hold the provider's page so that the admin can close the popup before it answers.
  let held;
  const pattern = `${ISSUER}/authorize**`;
  await context.route(pattern, (route) => { held = route; });
  const [popup] = await Promise.all([page.waitForEvent('popup'), page.click('#authorize')]);
  await waitUntil(() => held !== undefined, 'the popup asks the provider');
  await popup.close();
  await page.waitForFunction(() => /closed before/.test(document.querySelector('#oauth-message').textContent));
  await context.unroute(pattern);
  await held?.abort().catch(() => {});
  await shot('09-popup-closed');
  // a blocked popup: window.open answers null, as with a popup blocker
  await page.evaluate(() => { window.open = () => null; });
  await page.click('#authorize');
  await page.waitForFunction(() => /blocked/.test(document.querySelector('#oauth-message').textContent));
  await page.locator('#oauth-fallback').waitFor({ state: 'visible' });
  assert.match(await page.getAttribute('#oauth-fallback-link', 'href'), new RegExp(`^${ISSUER}/authorize\\?`));
  await shot('09-popup-blocked');
  await page.reload();
  await page.locator('#app').waitFor({ state: 'visible' });
});

test('10. unsaved changes are guarded', async () => {
  // typed, as a user does (a page may only ask before unload after a user gesture)
  await page.click('#auth-scopes');
  await page.keyboard.press('End');
  await page.keyboard.type(' extra.scope');
  assert.ok(await page.locator('#dirty-state').isVisible());
  let dialog = null;
  page.once('dialog', async (d) => { dialog = d.type(); await d.dismiss(); });
  await page.reload({ timeout: 3000 }).catch(() => {});
  assert.equal(dialog, 'beforeunload');
  assert.equal(await page.inputValue('#auth-scopes'), 'openid profile email offline_access extra.scope', 'the edit survived');
  await page.click('#discard');
  assert.equal(await page.inputValue('#auth-scopes'), 'openid profile email offline_access');
  assert.ok(!(await page.locator('#dirty-state').isVisible()));
});

test('11. sites: created with the secret shown once (copy), a password-only override, edited, deleted', async () => {
  // by keyboard: type the name and press Enter
  await page.focus('#site-name');
  await page.keyboard.type('Brno office');
  await page.keyboard.press('Enter');
  const panel = page.locator('#site-secret');
  await panel.waitFor({ state: 'visible' });
  const secret = await page.inputValue('#site-secret-value');
  const siteId = await page.inputValue('#site-secret-id');
  assert.ok(secret.length >= 20, `secret ${secret.length} chars`);
  assert.match(siteId, /^site_/);
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: ORIGIN });
  await page.click('#site-secret button.copy[data-copy="site-secret-value"]');
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), secret);
  await shot('11-site-secret-once');
  await page.click('#site-secret-done');
  assert.ok(!(await panel.isVisible()));
  assert.ok(!(await page.content()).includes(secret), 'the secret is gone from the page');
  await page.locator(`#sites-body tr[data-site-id="${siteId}"]`).waitFor();
  await page.reload();
  await page.locator(`#sites-body tr[data-site-id="${siteId}"]`).waitFor();
  assert.ok(!(await page.content()).includes(secret), 'the secret is never shown again');

  // a second site with a password-only override; oauth2 is not offered there
  await page.fill('#site-name', 'Plzen branch');
  await page.check('#site-override');
  assert.deepEqual(await page.$$eval('#site-method option', (o) => o.map((x) => x.value)), ['password', 'none']);
  await page.fill('#site-host', 'relay.plzen.example');
  await page.fill('#site-port', '587');
  await page.fill('#site-username', 'plzen@acme.example');
  await page.fill('#site-password', 'plzen-pw-9431');
  await page.click('#create-site');
  await panel.waitFor({ state: 'visible' });
  const second = await page.inputValue('#site-secret-id');
  await page.click('#site-secret-done');
  const row = page.locator(`#sites-body tr[data-site-id="${second}"]`);
  await row.waitFor();
  assert.match(await row.textContent(), /relay\.plzen\.example:587 \(password, plzen@acme\.example\)/);
  assert.equal(await page.inputValue('#site-password'), '', 'the password field is cleared');

  // Edit: the form fills with the site; a new port with the password left empty keeps the
  // stored password; a new host with it empty is refused at the password field
  await row.locator('button:has-text("Edit")').click();
  assert.match(await page.locator('#site-form-h').textContent(), /Edit site "Plzen branch"/);
  assert.equal(await page.inputValue('#site-host'), 'relay.plzen.example');
  assert.equal(await page.inputValue('#site-username'), 'plzen@acme.example');
  assert.equal(await page.inputValue('#site-password'), '');
  assert.match(await page.getAttribute('#site-password', 'placeholder'), /unchanged/);
  await page.fill('#site-port', '2525');
  await page.click('#create-site');
  await page.waitForFunction(() => /saved/.test(document.querySelector('#site-status').textContent));
  assert.match(await row.textContent(), /relay\.plzen\.example:2525 \(password, plzen@acme\.example\)/);
  assert.equal(await page.locator('#site-form-h').textContent(), 'New site');
  await row.locator('button:has-text("Edit")').click();
  await page.fill('#site-host', 'relay2.plzen.example');
  await page.click('#create-site');
  const pwError = page.locator('#site-password[aria-invalid="true"]');
  await pwError.waitFor();
  assert.match(await page.locator('#site-form .field-error').textContent(), /never sent to a new host/);
  assert.equal(await page.evaluate(() => document.activeElement.id), 'site-password', 'focus on the field');
  await page.fill('#site-password', 'plzen-pw-2');
  await page.click('#create-site');
  await page.waitForFunction(() => /saved/.test(document.querySelector('#site-status').textContent));
  assert.match(await row.textContent(), /relay2\.plzen\.example:2525/);
  assert.ok(!(await page.content()).includes('plzen-pw-2'), 'the password is not echoed');
  // Cancel leaves the form for a new site
  await row.locator('button:has-text("Edit")').click();
  await page.click('#cancel-site-edit');
  assert.equal(await page.locator('#site-form-h').textContent(), 'New site');
  assert.equal(await page.inputValue('#site-name'), '');

  page.once('dialog', (d) => d.accept());
  await row.locator('button:has-text("Delete")').click();
  await row.waitFor({ state: 'detached' });
  assert.equal(await page.locator('#sites-body tr').count(), 1);
  await shot('11-sites');
});

test('12. the page works at 375 px width', async () => {
  await page.setViewportSize({ width: 375, height: 812 });
  try {
    await page.reload();
    await page.locator('#app').waitFor({ state: 'visible' });
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 375, `the page is ${width}px wide at 375px`);
    for (const id of ['#save', '#authorize', '#send-test', '#create-site', '#provider', '#auth-client-id', '#redirect-uri']) {
      const box = await page.locator(id).boundingBox();
      assert.ok(box && box.x >= 0 && box.x + box.width <= 375, `${id} fits: ${JSON.stringify(box)}`);
    }
    await shot('12-narrow-375px');
  } finally {
    await page.setViewportSize({ width: 1280, height: 900 });
  }
});

test('13. warnings are listed; a change that voids the grant shows reauthorization required with its reason', async () => {
  const soon = new Date(Date.now() + 10 * 24 * 3600 * 1000).toISOString().slice(0, 10);
  await page.fill('#auth-client-secret-expires-at', soon);
  await page.click('#save');
  await page.locator('#oauth-warnings-box').waitFor({ state: 'visible' });
  assert.match(await page.locator('#oauth-warnings').textContent(), new RegExp(`client secret expires on ${soon}`));
  assert.equal(await status().getAttribute('data-status'), 'authorized');
  // new scopes need a new consent: the server voids the grant and says why
  await page.fill('#auth-scopes', 'openid profile email offline_access extra.scope');
  await page.click('#save');
  await page.waitForFunction(() => document.querySelector('#oauth-status').dataset.status === 'reauthorization_required');
  assert.equal(await status().textContent(), 'Reauthorization required');
  assert.ok(await page.locator('#oauth-reason').isVisible());
  assert.match(await page.locator('#oauth-reason').textContent(), /scopes changed/);
  assert.equal(await page.locator('#authorize').textContent(), 'Re-authorize');
  await shot('13-reauthorization-required');
  const [popup] = await Promise.all([page.waitForEvent('popup'), page.click('#authorize')]);
  await popup.waitForEvent('close', { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelector('#oauth-status').dataset.status === 'authorized');
  assert.ok(!(await page.locator('#oauth-reason').isVisible()));
});

test('14. Forget removes the grant', async () => {
  page.once('dialog', (d) => d.accept());
  await page.click('#forget');
  await page.waitForFunction(() => document.querySelector('#oauth-status').dataset.status === 'not_authorized');
  assert.equal(await page.locator('#authorize').textContent(), 'Authorize');
  // authorize again, so the grant ends as the server-side checks expect it; by keyboard
  await page.focus('#auth-authorization-username');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'authorize');
  const [popup] = await Promise.all([page.waitForEvent('popup'), page.keyboard.press('Enter')]);
  await popup.waitForEvent('close', { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelector('#oauth-status').dataset.status === 'authorized');
});

test('14b. a token without a tenant (cluster admin) opens the tenant named by &tenant=', async () => {
  const cluster = await context.newPage(); // its own session storage
  await cluster.goto(`${ORIGIN}/admin/#token=${CLUSTER_TOKEN}`);
  await cluster.locator('#signed-out').waitFor({ state: 'visible' });
  assert.match(await cluster.locator('#signed-out-reason').textContent(), /not for a tenant/);
  await cluster.goto(`${ORIGIN}/admin/#token=${CLUSTER_TOKEN}&tenant=acme`);
  await cluster.reload(); // the fragment alone does not reload the page
  await cluster.locator('#app').waitFor({ state: 'visible' });
  assert.equal(await cluster.evaluate(() => location.hash), '');
  assert.match(await cluster.locator('#who').textContent(), /Tenant acme/);
  // the settings the tenant admin saved above, read with the cluster admin's token
  await cluster.waitForFunction(() => document.querySelector('#oauth-status').dataset.status === 'authorized');
  assert.equal(await cluster.locator('#auth-authorization-username').inputValue(), USER);
  await cluster.close();
});

test('15. the page signs out when its token expires', async () => {
  // the short link's token (20 s) ran out while the tests above ran
  await expiring.locator('#signed-out').waitFor({ state: 'visible', timeout: 30_000 });
  assert.match(await expiring.locator('#signed-out-reason').textContent(), /expired/);
  assert.ok(!(await expiring.locator('#app').isVisible()));
  assert.equal(await expiring.evaluate(() => sessionStorage.getItem('postwire.admin.token')), null);
  await shot('15-signed-out-at-expiry', expiring);
  await expiring.close();
});

test('16. no CSP violation or script error happened', () => {
  assert.deepEqual(pageProblems, []);
});
