"""No secrets in logs or spans: a scenario that uses every kind of secret (SMTP password,
OAuth client secret, refresh and access tokens, authorization codes, site secrets, the site
mailer API key, the master, cache and JWT keys, admin JWTs) runs with `RUST_LOG=debug` JSON
logs and OTLP export; then every captured log line of the three processes and every exported
span (the raw protobuf bodies as received) is searched for each secret. Runs last (see
conftest.pytest_collection_modifyitems): it stops the services to flush their spans."""

from __future__ import annotations

import base64
import json
import urllib.request

from conftest import OAUTH_USER, SMTP_USER, call, send_through


def _issued(oauth_peer) -> dict:
    with urllib.request.urlopen(oauth_peer["control"] + "/issued", timeout=10) as r:
        return json.loads(r.read())


def test_no_secret_appears_in_any_log_line_or_span(world, oauth_peer, receiver, the_secrets):
    base = world.mgmt.base_url
    # The scenario: sends through both site mailers (password; OAuth with XOAUTH2), test
    # emails with both tenants' settings, a forced refresh (rotating the refresh token), a
    # refused login with a wrong site secret, and a malformed request body.
    send_through(world, world.acme_mailer, SMTP_USER, "password send")
    send_through(world, world.globex_mailer, OAUTH_USER, "oauth send")
    for t, admin in (("acme", world.acme_admin), ("globex", world.globex_admin)):
        status, body, _ = call(base, "POST", f"/api/v1/tenants/{t}/email-settings/test", admin, {"to": "it@example.test"})
        assert status == 200, body
    status, tok, _ = call(
        base, "POST", "/api/v1/site-auth/token", None,
        {"site_id": world.globex_site["site_id"], "secret": world.globex_site["secret"]},
    )
    assert status == 200, tok
    the_secrets.add("site JWT", tok["access_token"])
    status, body, _ = call(base, "GET", "/api/v1/site/smtp-access-token?min_validity=7200", tok["access_token"])
    assert status == 200, body
    the_secrets.add("access token served to a site", body["access_token"])
    wrong = "obs-wrong-site-secret-0123456789abcdef"
    status, _, _ = call(base, "POST", "/api/v1/site-auth/token", None, {"site_id": world.acme_site["site_id"], "secret": wrong})
    assert status == 401
    the_secrets.add("wrong site secret", wrong)
    bad_pw = "obs-refused-password-" + "x" * 8
    status, _, _ = call(
        base, "PUT", "/api/v1/tenants/acme/email-settings", world.acme_admin,
        {"provider": "custom", "server": {"host": "127.0.0.1", "port": 0, "encryption": "none"},
         "auth": {"method": "password", "username": SMTP_USER, "password": bad_pw}, "senders": []},
    )
    assert status == 422
    the_secrets.add("password of a refused request", bad_pw)

    issued = _issued(oauth_peer)
    assert issued["refresh_tokens"] and issued["tokens"] and issued["codes"], issued
    for i, t in enumerate(issued["refresh_tokens"]):
        the_secrets.add(f"refresh token #{i}", t)
    for i, t in enumerate(issued["tokens"]):
        the_secrets.add(f"access/ID token #{i}", t)
        xoauth2 = f"user={OAUTH_USER}\x01auth=Bearer {t}\x01\x01".encode()
        the_secrets.add(f"XOAUTH2 blob #{i}", base64.b64encode(xoauth2).decode())
    for i, c in enumerate(issued["codes"]):
        the_secrets.add(f"authorization code #{i}", c)
    plain = f"\0{SMTP_USER}\0{the_secrets.values['smtp password']}".encode()
    the_secrets.add("SMTP AUTH PLAIN blob", base64.b64encode(plain).decode())

    # Stop the services: their last spans are flushed on the way out.
    for svc in (world.acme_mailer, world.globex_mailer, world.mgmt):
        svc.stop()
        assert svc.proc.returncode == 0, f"{svc.name} exited with {svc.proc.returncode}:\n{svc.tail()}"

    logs = {svc.name: svc.log_path.read_bytes() for svc in (world.mgmt, world.acme_mailer, world.globex_mailer)}
    spans = b"\n".join(receiver.bodies)
    # The search sees what happened: the logs are debug-level and the spans name the sites.
    assert all(len(b.splitlines()) > 20 for b in logs.values()), {k: len(v.splitlines()) for k, v in logs.items()}
    for site in (world.acme_site, world.globex_site):
        assert site["site_id"].encode() in spans
        assert site["site_id"].encode() in logs["management-service"]
    assert len(receiver.snapshot()) > 50

    hits = []
    for name, value in the_secrets.values.items():
        # Secrets are at least 16 characters: a hit is never a coincidence.
        assert len(value) >= 16, name
        needle = value.encode()
        for where, data in [*logs.items(), ("OTLP spans", spans)]:
            if needle in data:
                line = next((l for l in data.splitlines() if needle in l), b"")
                hits.append(f"{name} in {where}: {line[:300]!r}")
    assert not hits, "secrets leaked:\n" + "\n".join(hits)
    print(f"searched {len(the_secrets.values)} secrets in {sum(len(b.splitlines()) for b in logs.values())} log lines and {len(receiver.snapshot())} spans")
