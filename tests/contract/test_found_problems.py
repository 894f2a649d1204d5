"""Minimal reproductions of the problems schemathesis found, as fixed requests.

Schemathesis draws new data every run (see the seed it prints), so a problem it found once
may go unnoticed in the next run. Each problem it found is pinned here as the smallest request
that shows it, checked against the same contract: no 5xx, and a status code the document
lists for the operation, answered as application/problem+json when it is an error. They fail
until the service is fixed; never mark them xfail or skip them.
"""

from __future__ import annotations

import json

import pytest

from conftest import SPEC_PATH
from live import provision_acme

# (id, method, path, role, JSON body or None, how it was found)
PROBLEMS = [
    (
        "site-auth-token-nul-in-site-id",
        "POST", "/api/v1/site-auth/token", None, {"site_id": "a\u0000b", "secret": "x"},
        "schemathesis: a NUL character in a JSON string reaches PostgreSQL, which refuses it "
        "(invalid byte sequence for encoding UTF8: 0x00) -> 500",
    ),
    (
        "list-tenants-nul-in-after",
        "GET", "/api/v1/tenants?after=a%00b", "cluster_admin", None,
        "schemathesis: NUL in the `after` cursor -> 500",
    ),
    (
        "delete-site-nul-in-site-id",
        "DELETE", "/api/v1/tenants/acme/sites/a%00b", "tenant_admin", None,
        "same NUL class, path parameter site_id -> 500",
    ),
    (
        "resend-invitation-nul-in-invitation-id",
        "POST", "/api/v1/tenants/acme/invitations/a%00b/resend", "tenant_admin", None,
        "same NUL class, path parameter invitation_id -> 500",
    ),
]


def _operation(spec: dict, method: str, path: str) -> dict:
    path = path.split("?")[0]
    for template, item in spec["paths"].items():
        parts, want = template.strip("/").split("/"), path.strip("/").split("/")
        if len(parts) == len(want) and all(p.startswith("{") or p == w for p, w in zip(parts, want)):
            if method.lower() in item:
                return item[method.lower()]
    pytest.fail(f"{method} {path} is not in openapi/openapi.json")


@pytest.fixture(scope="module")
def acme(live_server, smtp_peer):
    live_server.check_alive()
    return provision_acme(
        live_server.http, live_server.token("cluster_admin"), live_server.token("tenant_admin", "acme"), smtp_peer["port"]
    )


@pytest.mark.usefixtures("acme")
@pytest.mark.parametrize(
    "method,path,role,body,found", [p[1:] for p in PROBLEMS], ids=[p[0] for p in PROBLEMS]
)
def test_found_problem_is_fixed(live_server, method, path, role, body, found):
    spec = json.loads(SPEC_PATH.read_text())
    documented = set(_operation(spec, method, path)["responses"])
    token = None
    if role == "cluster_admin":
        token = live_server.token("cluster_admin")
    elif role == "tenant_admin":
        token = live_server.token("tenant_admin", "acme")
    status, answer = live_server.http.call(method, path, token, body)
    repro = (
        f"{method} {path}" + (f" body {json.dumps(body)}" if body is not None else "") + (f" as {role}" if role else "")
        + f"\n-> {status} {answer}\n({found})"
    )
    if status >= 500:
        pytest.fail("server error:\n" + repro, pytrace=False)
    if str(status) not in documented:
        pytest.fail(f"undocumented status (documented: {sorted(documented)}):\n" + repro, pytrace=False)
