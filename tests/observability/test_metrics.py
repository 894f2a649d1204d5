"""`GET /metrics` of the Management Service parses with PyPI prometheus-client's parser
(`text_string_to_metric_families`), follows Prometheus naming (counters end in `_total`,
units in names), has no per-tenant series, and the named series move as the test acts: an
HTTP request, a token refresh at the provider, a test email sent, an invitation waiting in
the outbox."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import call, wait_until


def scrape(base: str) -> dict:
    status, text, hdrs = call(base, "GET", "/metrics")
    assert status == 200, text
    assert hdrs["Content-Type"].startswith("text/plain; version=0.0.4"), hdrs["Content-Type"]
    families = list(text_string_to_metric_families(text))
    assert families, text[:500]
    out = {"_families": {f.name: f for f in families}}
    for f in families:
        for s in f.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_follow_conventions_and_move(world):
    base = world.mgmt.base_url
    before = scrape(base)
    fams = before["_families"]
    for name, typ in [
        ("postwire_http_requests", "counter"),
        ("postwire_http_request_duration_seconds", "histogram"),
        ("postwire_token_refreshes", "counter"),
        ("postwire_oauth_grants", "gauge"),
        ("postwire_oauth_oldest_refresh_age_seconds", "gauge"),
        ("postwire_token_cache_lookups", "counter"),
        ("postwire_outbox_messages", "gauge"),
        ("postwire_outbox_oldest_message_age_seconds", "gauge"),
        ("postwire_mail_sends", "counter"),
    ]:
        assert name in fams, f"{name} missing: {sorted(fams)}"
        assert fams[name].type == typ, (name, fams[name].type)
        if typ == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fams[name].samples), name
    # No series is labelled by tenant or site (100,000 tenants must not be 100,000 series).
    for f in fams.values():
        for s in f.samples:
            assert not {"tenant", "tenant_id", "site", "site_id"} & set(s.labels), s

    # 1. An HTTP request, counted under its route pattern (never the concrete path).
    route = "/api/v1/tenants/{tenant_id}"
    status, body, _ = call(base, "GET", "/api/v1/tenants/acme", world.cluster)
    assert status == 200, body
    # 2. A token refresh at the provider (a site asks for more validity than the token has).
    status, tok, _ = call(
        base, "POST", "/api/v1/site-auth/token", None,
        {"site_id": world.globex_site["site_id"], "secret": world.globex_site["secret"]},
    )
    assert status == 200, tok
    status, body, _ = call(base, "GET", "/api/v1/site/smtp-access-token?min_validity=7200", tok["access_token"])
    assert status == 200, body
    # 3. A test email, sent through the outbox to the SMTP peer.
    status, body, _ = call(
        base, "POST", "/api/v1/tenants/acme/email-settings/test", world.acme_admin, {"to": "it@example.test"}
    )
    assert status == 200, body
    # 4. An invitation that waits in the outbox (no cluster email settings are configured).
    status, body, _ = call(
        base, "PUT", "/api/v1/tenants/initech", world.cluster, {"name": "Initech", "admin_emails": ["boss@initech.example"]}
    )
    assert status in (200, 201), body
    time.sleep(1.5)  # the outbox's oldest message ages

    after = scrape(base)
    get = lambda m, n, **l: value(m, n, **l)  # noqa: E731
    assert get(after, "postwire_http_requests_total", route=route, method="GET", status="200") == get(
        before, "postwire_http_requests_total", route=route, method="GET", status="200"
    ) + 1
    assert get(after, "postwire_http_request_duration_seconds_count", route=route, method="GET") == get(
        before, "postwire_http_request_duration_seconds_count", route=route, method="GET"
    ) + 1
    assert get(after, "postwire_token_refreshes_total", result="success") == get(
        before, "postwire_token_refreshes_total", result="success"
    ) + 1
    assert get(after, "postwire_oauth_grants", status="authorized") == 1
    assert get(after, "postwire_mail_sends_total", kind="test", result="sent") == get(
        before, "postwire_mail_sends_total", kind="test", result="sent"
    ) + 1
    # queued, or being claimed by the worker at the instant of the scrape
    assert (
        get(after, "postwire_outbox_messages", kind="invitation", status="queued")
        + get(after, "postwire_outbox_messages", kind="invitation", status="sending")
    ) == get(before, "postwire_outbox_messages", kind="invitation", status="queued") + 1
    assert get(after, "postwire_outbox_oldest_message_age_seconds") >= 1.0
