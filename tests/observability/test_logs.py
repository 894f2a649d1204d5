"""JSON logs (POSTWIRE_LOG_FORMAT=json): every line of a spawned binary's stderr is JSON, and
every line written while serving a request carries that request's id, which the response
returns as X-Request-Id."""

from __future__ import annotations

from conftest import call, wait_until


def _request_ids(rec: dict) -> set[str]:
    return {s["request_id"] for s in rec.get("spans", []) if s.get("name") == "HTTP request" and "request_id" in s}


def test_every_line_is_json_and_request_lines_carry_the_request_id(world):
    mgmt = world.mgmt
    # A test email: the request logs while it sends (RUST_LOG=debug).
    status, body, hdrs = call(
        mgmt.base_url, "POST", "/api/v1/tenants/acme/email-settings/test", world.acme_admin, {"to": "it@example.test"}
    )
    assert status == 200, body
    rid = hdrs["X-Request-Id"]

    def lines():
        recs = mgmt.records()  # fails on any line that is not JSON
        mine = [r for r in recs if rid in _request_ids(r)]
        return (recs, mine) if mine else None

    recs, mine = wait_until(f"log lines of request {rid}", lines, timeout=10)
    # Any line inside a request span names its request.
    inside = [r for r in recs if any(s.get("name") == "HTTP request" for s in r.get("spans", []))]
    assert inside and all(_request_ids(r) for r in inside)
    for r in mine:
        assert r["level"] and r["timestamp"] and "message" in r or "fields" in r, r
    # The site mailers log JSON too.
    for m in (world.acme_mailer, world.globex_mailer):
        assert m.records()
