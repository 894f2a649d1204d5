"""Schemathesis hooks of the contract run (loaded with SCHEMATHESIS_HOOKS=st_hooks by
test_schemathesis.py; never imported by pytest itself).

- Auth: each operation gets the bearer token of the first role its `security` lists as
  scopes of `bearer` (the document's way of naming the roles an operation accepts):
  cluster_admin; tenant_admin of the path's tenant when it is a seeded one, else of `acme`;
  a site of `acme` or of `globex` (OAuth 2.0, authorized), in turn. Operations without
  security get no token. Schemathesis still removes or spoils the token in its negative
  cases (401 is documented everywhere it applies).
- Real data: tenants `acme` (password auth at the SMTP test peer) and `globex` (OAuth 2.0
  grant at the OAuth test peer), each with a site, exist before the run. When a generated
  request deletes one of them or its site, or changes the tenant itself (for globex: or its
  settings or grant), it is provisioned again (and a new site token taken) so later cases keep hitting real data. This only keeps
  the fixture data alive; no response or check is altered.
- Statistics: the status codes seen per operation are written to POSTWIRE_CONTRACT_STATS
  when the run ends, for the test's summary.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections import Counter, defaultdict

import schemathesis

from live import OAUTH_TENANT, Http, SetupError, provision_acme, provision_oauth_tenant

_STATE_PATH = os.environ["POSTWIRE_CONTRACT_STATE"]
_STATS_PATH = os.environ.get("POSTWIRE_CONTRACT_STATS")
with open(_STATE_PATH) as f:
    # {"base_url", "smtp_port", "oauth_issuer", "cluster_admin": token,
    #  "tenants": {tenant: {"admin": token, "site_id", "site": token}}}
    STATE = json.load(f)

_lock = threading.Lock()
_http = Http(STATE["base_url"])
_stats: dict[str, Counter] = defaultdict(Counter)
_reprovisioned = Counter()
_site_turn = [0]


def _roles(operation) -> list[str]:
    security = operation.definition.raw.get("security")
    if security is None:
        security = operation.schema.raw_schema.get("security", [])
    for requirement in security:
        if "bearer" in requirement:
            return list(requirement["bearer"])
    return []


@schemathesis.auth(refresh_interval=None)
class RoleToken:
    def get(self, case, context):
        roles = _roles(context.operation)
        if not roles:
            return None
        role = roles[0]
        with _lock:
            if role == "cluster_admin":
                return STATE["cluster_admin"]
            tenants = STATE["tenants"]
            if role == "tenant_admin":
                tenant = (case.path_parameters or {}).get("tenant_id")
                return tenants.get(tenant if tenant in tenants else "acme")["admin"]
            if role == "site":
                # Alternately a site of acme (password auth) and of globex (an authorized
                # OAuth 2.0 grant: real access tokens).
                _site_turn[0] += 1
                return tenants["acme" if _site_turn[0] % 2 else OAUTH_TENANT]["site"]
            raise AssertionError(f"unknown role {role!r} in the security of {context.operation.label}")

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


def _reprovision(tenant: str) -> None:
    # Another schemathesis worker may change the same tenant between the steps of the set-up
    # (its PUT lands between ours and our authorize): that is the harness racing itself, not
    # the service misbehaving, so try again a few times.
    for attempt in range(5):
        try:
            _reprovision_once(tenant)
            return
        except SetupError:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


def _reprovision_once(tenant: str) -> None:
    tenants = STATE["tenants"]
    if tenant == OAUTH_TENANT:
        site = provision_oauth_tenant(
            _http, STATE["cluster_admin"], tenants[tenant]["admin"], STATE["oauth_issuer"], STATE["smtp_port"]
        )
    else:
        site = provision_acme(_http, STATE["cluster_admin"], tenants[tenant]["admin"], STATE["smtp_port"])
    tenants[tenant]["site_id"] = site["site_id"]
    tenants[tenant]["site"] = site["site_token"]


@schemathesis.hook
def after_call(context, case, response):
    method = case.method.upper()
    path = case.formatted_path.rstrip("/")
    with _lock:
        label = f"{method} {case.operation.path}"
        sent = (case.headers or {}).get("Authorization", "")
        for tenant, seeded in STATE["tenants"].items():
            if sent == f"Bearer {seeded['site']}":
                label += f" (site of {tenant})"
        _stats[label][str(response.status_code)] += 1
        if not 200 <= response.status_code < 300:
            return
        for tenant, seeded in STATE["tenants"].items():
            base = f"/api/v1/tenants/{tenant}"
            if (
                (method in ("PUT", "DELETE") and path == base)
                or (method == "DELETE" and path == f"{base}/sites/{seeded['site_id']}")
                # globex exists for its OAuth 2.0 grant: restore it whenever a generated
                # request changed its settings or forgot the grant. (acme keeps whatever
                # settings generated requests store: GETs then return them.)
                or (tenant == OAUTH_TENANT and method in ("PUT", "DELETE") and path.startswith(base + "/"))
            ):
                _reprovisioned[f"{method} {case.operation.path} ({tenant})"] += 1
                _reprovision(tenant)


@atexit.register
def _write_stats():
    if _STATS_PATH:
        with open(_STATS_PATH, "w") as f:
            json.dump({"status_codes": _stats, "reprovisioned": _reprovisioned}, f, indent=1, sort_keys=True)
