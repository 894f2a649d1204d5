"""OpenTelemetry: one send through a site mailer is ONE trace across both services (W3C
traceparent from the site mailer to the Management Service), exported over OTLP/HTTP
protobuf to a real receiver, with tenant and site attributes."""

from __future__ import annotations

import time

from conftest import OAUTH_USER, call, send_through, wait_until

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


def test_send_through_a_site_mailer_is_one_trace_across_both_services(world, receiver):
    site_id = world.globex_site["site_id"]
    send_through(world, world.globex_mailer, OAUTH_USER, "traced send")

    def linked():
        spans = receiver.snapshot()
        for d in spans:
            if d.service != "site-mailer" or d.name != "deliver" or d.attributes.get("site_id") != site_id:
                continue
            trace = [s for s in spans if s.trace_id == d.trace_id]
            site_ids = {s.span_id for s in trace if s.service == "site-mailer"}
            server = [
                s for s in trace
                if s.service == "management-service" and s.kind == SERVER and s.parent_span_id in site_ids
            ]
            smtp = [s for s in trace if s.service == "site-mailer" and s.name == "smtp.send"]
            if server and smtp:
                return d, trace, server, smtp
        return None

    deliver, trace, server, smtp = wait_until("a trace with spans of both services", linked, timeout=30)
    assert deliver.attributes["tenant_id"] == "globex"
    # The Management Service's request span is a child of the site mailer's client span.
    token_call = [s for s in server if s.attributes.get("http.route") == "/api/v1/site/smtp-access-token"]
    assert token_call, f"no smtp-access-token request in the trace: {trace}"
    req = token_call[0]
    assert req.attributes["tenant_id"] == "globex" and req.attributes["site_id"] == site_id, req
    parent = next(s for s in trace if s.span_id == req.parent_span_id)
    assert parent.service == "site-mailer" and parent.name == "management_api" and parent.kind == CLIENT, parent
    # Below it, the token lookup of that tenant, in the same trace.
    inner = [s for s in trace if s.service == "management-service" and s.name == "oauth.access_token"]
    assert inner and inner[0].attributes["tenant_id"] == "globex", trace
    assert smtp[0].parent_span_id == deliver.span_id
    # Resource attributes: the service names and OTEL_RESOURCE_ATTRIBUTES.
    for s in (deliver, req):
        assert s.resource["deployment.environment.name"] == "obs-test", s.resource
        assert s.resource["service.version"], s.resource
    assert receiver.content_types == {"application/x-protobuf"}


def test_db_and_token_refresh_spans_carry_the_tenant(world, receiver):
    # A site asking for a token valid longer than the cached one (tokens live 1 h here) makes
    # the Management Service refresh at the provider.
    base = world.mgmt.base_url
    status, tok, _ = call(
        base, "POST", "/api/v1/site-auth/token", None,
        {"site_id": world.globex_site["site_id"], "secret": world.globex_site["secret"]},
    )
    assert status == 200, tok
    status, body, hdrs = call(base, "GET", "/api/v1/site/smtp-access-token?min_validity=7200", tok["access_token"])
    assert status == 200, body
    rid = hdrs["X-Request-Id"]

    def found():
        spans = receiver.snapshot()
        root = [s for s in spans if s.service == "management-service" and s.attributes.get("request_id") == rid]
        if not root:
            return None
        trace = [s for s in spans if s.trace_id == root[0].trace_id]
        refresh = [s for s in trace if s.name == "oauth.refresh"]
        db = [s for s in trace if s.name.startswith("db.")]
        return (root[0], refresh, db) if refresh and db else None

    def explain():
        spans = receiver.snapshot()
        root = [s for s in spans if s.attributes.get("request_id") == rid]
        return root and [s for s in spans if s.trace_id == root[0].trace_id]

    root, refresh, db = wait_until("refresh and DB spans of the request", found, timeout=30, explain=explain)
    assert root.kind == SERVER and root.attributes["tenant_id"] == "globex"
    assert refresh[0].attributes == {**refresh[0].attributes, "tenant_id": "globex", "result": "success"}
    assert all(s.attributes.get("tenant_id") == "globex" for s in db), db


def test_incoming_traceparent_is_continued_and_request_id_returned(management, receiver):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    status, _, hdrs = call(
        management.base_url, "GET", "/readyz", headers={"traceparent": f"00-{trace_id}-{parent}-01"}
    )
    assert status == 200
    rid = hdrs["X-Request-Id"]
    assert rid

    def span():
        got = [s for s in receiver.snapshot() if s.trace_id == trace_id]
        return got[0] if got else None

    s = wait_until("the /readyz span", span, timeout=30)
    assert s.parent_span_id == parent and s.kind == SERVER
    assert s.name == "GET /readyz" and s.attributes["request_id"] == rid
    assert s.resource["service.name"] == "management-service"


def test_site_mailer_continues_an_incoming_traceparent_and_returns_the_request_id(world, receiver):
    """A local feature that traces its own work (the Spooler Controller) sends its traceparent:
    the site mailer's request span joins that trace, carries the request id it answers with,
    and the request's log line carries the same id."""
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    mailer = world.globex_mailer
    body = {"kind": "notification", "from": OAUTH_USER, "to": ["it@example.test"], "subject": "traceparent", "text": "hi"}
    status, msg, hdrs = call(
        mailer.base_url, "POST", "/v1/messages", world.api_key, body,
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert status == 202, msg
    rid = hdrs["X-Request-Id"]
    assert rid
    # every answer has its own id, errors too
    status, _, hdrs2 = call(mailer.base_url, "GET", "/v1/messages/not-a-message", world.api_key)
    assert status == 404 and hdrs2["X-Request-Id"] and hdrs2["X-Request-Id"] != rid

    def span():
        got = [
            s for s in receiver.snapshot()
            if s.trace_id == trace_id and s.service == "site-mailer" and s.kind == SERVER
        ]
        return got[0] if got else None

    s = wait_until("the site mailer's request span in the caller's trace", span, timeout=30)
    assert s.parent_span_id == parent, s
    assert s.name == "POST /v1/messages" and s.attributes["request_id"] == rid, s
    wait_until(
        "the access-log line with the request id",
        lambda: any(rid in line and "request finished" in line for line in mailer.lines()),
        timeout=10,
    )


def _extra_management(management, tmp_path, receiver_env: dict):
    """Another Management Service process on the same kind of setup, with its own OTEL_*."""
    from conftest import MANAGEMENT, _clean_env, _free_port, _ready, _start

    tmp_path.mkdir(parents=True)
    port = _free_port()
    env = _clean_env()
    env.update({k: v for k, v in management.env.items() if k.startswith("POSTWIRE_") and k != "POSTWIRE_LISTEN"})
    env.update({"POSTWIRE_LISTEN": f"127.0.0.1:{port}", "POSTWIRE_DATA_DIR": str(tmp_path / "data"), "RUST_LOG": "info"})
    env.pop("POSTWIRE_PUBLIC_URL", None)
    env.update(receiver_env)
    svc = _start("extra management-service", [str(MANAGEMENT), "serve"], env, tmp_path / "stderr.log")
    svc.base_url = f"http://127.0.0.1:{port}"
    wait_until("extra management-service /readyz", lambda: svc.proc.poll() is None and _ready(svc.base_url), timeout=90, every=0.2)
    return svc


def test_standard_otel_variables_are_honoured(management, receiver, tmp_path):
    # The signal-specific endpoint (a full URL), the service name and resource attributes.
    svc = _extra_management(management, tmp_path / "on", {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces",
        "OTEL_SERVICE_NAME": "pw-renamed",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=pod-7",
        # batches every minute: the span can only arrive through the flush at exit
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
    })
    sampled = "5e1ec7ed5e1ec7ed5e1ec7ed5e1ec7ed"
    try:
        call(svc.base_url, "GET", "/healthz", headers={"traceparent": f"00-{sampled}-00f067aa0ba902b7-01"})
        time.sleep(0.5)
        assert not [s for s in receiver.snapshot() if s.trace_id == sampled], "exported before the flush"
    finally:
        svc.stop()  # SIGTERM: the service flushes its queued spans on the way out
    assert svc.proc.returncode == 0, svc.tail()
    got = [s for s in receiver.snapshot() if s.trace_id == sampled]
    assert len(got) == 1, got
    assert got[0].resource["service.name"] == "pw-renamed" and got[0].resource["k8s.pod.name"] == "pod-7"

    # OTEL_TRACES_SAMPLER=always_off: nothing of this process is exported, not even a span
    # whose caller sampled it.
    svc = _extra_management(management, tmp_path / "off", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "pw-sampled-off",
        "OTEL_TRACES_SAMPLER": "always_off",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    unsampled = "0ff0ff0ff0ff0ff0ff0ff0ff0ff0ff0"
    try:
        status, _, _ = call(svc.base_url, "GET", "/healthz", headers={"traceparent": f"00-{unsampled}-00f067aa0ba902b7-01"})
        assert status == 200
    finally:
        svc.stop()
    assert svc.proc.returncode == 0, svc.tail()
    assert not [s for s in receiver.snapshot() if s.trace_id == unsampled or s.service == "pw-sampled-off"]
