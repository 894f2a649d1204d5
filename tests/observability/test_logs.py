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

    recs, mine = wait_until(f"the access line of request {rid}", lines, timeout=10)
    # The request's own lines: at least its access line, with the status; every one of them
    # names exactly this request.
    access = [r for r in mine if r.get("message") == "request finished"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["level"] == "INFO", mine
    assert all(_request_ids(r) == {rid} for r in mine), mine
    assert all(r.get("timestamp") and r.get("level") and "message" in r for r in recs)
    # Any line written inside any request span names its request.
    inside = [r for r in recs if any(s.get("name") == "HTTP request" for s in r.get("spans", []))]
    assert len(inside) > len(mine) and all(len(_request_ids(r)) == 1 for r in inside)
    # The site mailers log JSON too.
    for m in (world.acme_mailer, world.globex_mailer):
        assert m.records()
