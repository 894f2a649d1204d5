"""Helpers shared by the contract tests and the schemathesis hooks (st_hooks.py): a tiny
stdlib-only JSON client and the provisioning of the tenant the generated requests hit."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class Http:
    """A tiny JSON client (stdlib only) for setting up data; tests of the contract itself
    use the generated client or schemathesis."""

    base_url: str

    def call(self, method: str, path: str, token: str | None = None, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")


SMTP_USER = "scanner@acme.example"
SMTP_PASSWORD = "app-password"
OAUTH_TENANT = "globex"
OAUTH_USER = "sender@globex.example"


class SetupError(RuntimeError):
    pass


def _expect(what: str, status: int, body, *ok: int):
    if status not in ok:
        raise SetupError(f"{what}: expected {ok}, got {status}: {body}")


def provision_acme(http: Http, cluster: str, admin: str, smtp_port: int) -> dict:
    """Tenant `acme` with password-authenticated SMTP settings and one site; returns the
    site's id, secret and token. Idempotent apart from creating a new site each call; also
    restores what generated requests may have changed (status `active`, the settings)."""
    status, body = http.call(
        "PUT", "/api/v1/tenants/acme", cluster, {"name": "Acme Corporation", "admin_emails": ["admin@acme.example"], "status": "active"},
    )
    _expect("PUT tenant acme", status, body, 200, 201)
    status, body = http.call(
        "PUT",
        "/api/v1/tenants/acme/email-settings",
        admin,
        {
            "provider": "custom",
            # The SMTP test peer on loopback (conftest.smtp_peer): a test email really goes out.
            "server": {"host": "127.0.0.1", "port": smtp_port, "encryption": "none"},
            "auth": {"method": "password", "username": SMTP_USER, "password": SMTP_PASSWORD},
            "senders": [{"address": "scanner@acme.example", "name": "Acme Scanner", "default": True}],
            "receivers": [{"address": "it@acme.example", "purpose": "report"}],
            "feature_senders": {"scan_to_email": "scanner@acme.example"},
        },
    )
    _expect("PUT acme email settings", status, body, 200)
    status, site = http.call("POST", "/api/v1/tenants/acme/sites", admin, {"name": "Brno office"})
    _expect("POST acme site", status, site, 201)
    status, tok = http.call(
        "POST", "/api/v1/site-auth/token", None, {"site_id": site["site_id"], "secret": site["secret"]}
    )
    _expect("POST site-auth/token", status, tok, 200)
    return {"site_id": site["site_id"], "secret": site["secret"], "site_token": tok["access_token"]}


def provision_oauth_tenant(http: Http, cluster: str, admin: str, issuer: str, smtp_port: int) -> dict:
    """Tenant `globex` with OAuth 2.0 settings at the OAuth test peer, AUTHORIZED (the popup
    flow followed like the README's curl walkthrough: authorize URL -> provider -> our
    callback), and one site; returns the site's id and token. A site of globex gets real
    access tokens from GET /api/v1/site/smtp-access-token."""
    tenant = OAUTH_TENANT
    status, body = http.call(
        "PUT", f"/api/v1/tenants/{tenant}", cluster, {"name": "Globex", "admin_emails": [], "status": "active"}
    )
    _expect(f"PUT tenant {tenant}", status, body, 200, 201)
    status, body = http.call(
        "PUT",
        f"/api/v1/tenants/{tenant}/email-settings",
        admin,
        {
            "provider": "custom",
            "server": {"host": "127.0.0.1", "port": smtp_port, "encryption": "none"},
            "auth": {
                "method": "oauth2",
                "client_id": "postwire",
                "client_secret": "client-secret",
                "authorization_url": f"{issuer}/authorize",
                "token_url": f"{issuer}/token",
                "issuer": issuer,
                "scopes": ["openid", "email", "offline_access"],
            },
            "senders": [{"address": OAUTH_USER, "default": True}],
        },
    )
    _expect(f"PUT {tenant} email settings", status, body, 200)
    status, body = http.call("POST", f"/api/v1/tenants/{tenant}/email-settings/oauth/authorize", admin)
    _expect(f"POST {tenant} oauth/authorize", status, body, 200)
    # The provider redirects at once to our callback, which answers with the outcome page.
    with urllib.request.urlopen(body["authorization_url"], timeout=30) as resp:
        page = resp.read().decode(errors="replace")
        if resp.status != 200 or "/oauth2/client/smtp/authorize-callback" not in resp.url:
            raise SetupError(f"authorization did not come back to the callback: {resp.status} {resp.url}")
    status, body = http.call("GET", f"/api/v1/tenants/{tenant}/email-settings", admin)
    _expect(f"GET {tenant} email settings", status, body, 200)
    if body["oauth"]["status"] != "authorized":
        raise SetupError(f"{tenant}: grant not authorized after the callback: {body['oauth']}\n{page[:500]}")
    status, site = http.call("POST", f"/api/v1/tenants/{tenant}/sites", admin, {"name": "Globex HQ"})
    _expect(f"POST {tenant} site", status, site, 201)
    status, tok = http.call(
        "POST", "/api/v1/site-auth/token", None, {"site_id": site["site_id"], "secret": site["secret"]}
    )
    _expect("POST site-auth/token", status, tok, 200)
    status, access = http.call("GET", "/api/v1/site/smtp-access-token", tok["access_token"])
    _expect(f"GET smtp-access-token as a site of {tenant}", status, access, 200)
    return {"site_id": site["site_id"], "site_token": tok["access_token"]}
