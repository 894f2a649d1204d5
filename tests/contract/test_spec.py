"""Static checks of the checked-in contract, openapi/openapi.json.

- openapi-spec-validator (PyPI) validates it against the OpenAPI 3.1 meta-schema;
- Spectral (npm @stoplight/spectral-cli, installed by `npm ci` in tests/contract) lints it
  with the ruleset openapi/.spectral.yaml: any `error` fails;
- the ruleset's own rules are shown to fire on deliberately broken copies of the document,
  so a rule whose JSONPath matches nothing cannot pass silently.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from conftest import REPO, SPEC_PATH

RULESET = REPO / "openapi" / ".spectral.yaml"
SPECTRAL = REPO / "tests" / "contract" / "node_modules" / ".bin" / "spectral"


def load_spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


def test_document_is_openapi_3_1():
    # The generators below are chosen to read 3.1: the document is never downgraded for them.
    assert load_spec()["openapi"].startswith("3.1."), "openapi/openapi.json must stay OpenAPI 3.1"


def test_openapi_spec_validator():
    spec = load_spec()
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in OpenAPIV31SpecValidator(spec, base_uri=SPEC_PATH.as_uri()).iter_errors()
    ]
    assert not errors, "openapi-spec-validator:\n" + "\n".join(errors)


def test_openapi_spec_validator_rejects_a_broken_document():
    # The validator really validates: a response without its description is refused.
    spec = load_spec()
    del spec["paths"]["/api/v1/tenants/{tenant_id}"]["get"]["responses"]["200"]["description"]
    errors = list(OpenAPIV31SpecValidator(spec, base_uri=SPEC_PATH.as_uri()).iter_errors())
    assert errors, "openapi-spec-validator accepted a broken document"


def spectral_lint(document: Path) -> tuple[int, list[dict], str]:
    if not SPECTRAL.exists():
        pytest.fail(f"{SPECTRAL} is missing: run `npm ci` in tests/contract (scripts/test does)")
    proc = subprocess.run(
        [str(SPECTRAL), "lint", "--ruleset", str(RULESET), "--format", "json", "--quiet", "--fail-severity", "error",
         str(document)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    out = proc.stdout.strip()
    try:
        results = json.loads(out) if out else []
    except ValueError:
        pytest.fail(f"spectral printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, results, proc.stderr


SEVERITY = {0: "error", 1: "warning", 2: "info", 3: "hint"}


def describe(r: dict) -> str:
    line = r.get("range", {}).get("start", {}).get("line", -1) + 1
    return f"{SEVERITY.get(r['severity'], r['severity'])} {r['code']} at {'.'.join(map(str, r['path']))} (line {line}): {r['message']}"


def test_spectral_lint():
    rc, results, stderr = spectral_lint(SPEC_PATH)
    for r in results:
        # Printed by pytest when the test fails, and with -rA; warnings never fail the run.
        print(describe(r))
    errors = [r for r in results if r["severity"] == 0]
    assert not errors, f"spectral found {len(errors)} error(s):\n" + "\n".join(map(describe, errors))
    assert rc == 0, f"spectral exited {rc}:\n{stderr}"


# Each postwire-* rule of the ruleset, with a mutation of the document that must trigger it
# and the path where it must be reported. Each mutation touches its own operation, so that
# they can all be linted in one run.
def _mutations():
    def op(spec, path, method):
        return spec["paths"][path][method]

    def scheme(spec):
        op(spec, "/api/v1/email/providers", "get")["security"].append({"api_key": []})

    def roles(spec):
        op(spec, "/api/v1/site/email-config", "get")["security"] = [{"bearer": ["superuser"]}]

    def secured(spec):
        del op(spec, "/api/v1/tenants", "get")["security"]

    def documents_401_403(spec):
        del op(spec, "/api/v1/tenants/{tenant_id}", "get")["responses"]["403"]

    def tenant_404(spec):
        del op(spec, "/api/v1/tenants/{tenant_id}/sites", "get")["responses"]["404"]

    def body_errors(spec):
        del op(spec, "/api/v1/tenants/{tenant_id}/email-settings", "put")["responses"]["415"]

    def error_content(spec):
        del op(spec, "/api/v1/tenants/{tenant_id}/sites/{site_id}", "delete")["responses"]["401"]["content"]

    def problem_json(spec):
        r = op(spec, "/api/v1/tenants/{tenant_id}", "put")["responses"]["422"]
        r["content"] = {"application/json": r["content"]["application/problem+json"]}

    def success_json(spec):
        r = op(spec, "/api/v1/tenants/{tenant_id}/audit", "get")["responses"]["200"]
        r["content"] = {"text/plain": {"schema": {"type": "string"}}}

    def no_content_204(spec):
        op(spec, "/api/v1/tenants/{tenant_id}", "delete")["responses"]["204"]["content"] = {
            "application/json": {"schema": {"type": "object"}}
        }

    def request_closed(spec):
        spec["components"]["schemas"]["TenantRequest"]["additionalProperties"] = True

    def request_closed_defined(spec):
        del spec["components"]["schemas"]["SiteCreateRequest"]["additionalProperties"]

    def snake_case(spec):
        op(spec, "/healthz", "get")["operationId"] = "healthzCheck"

    def paths(spec):
        item = copy.deepcopy(spec["paths"]["/readyz"])
        item["get"]["operationId"] = "readyz_v2"
        spec["paths"]["/v2/readyz"] = item

    return [
        ("postwire-security-scheme", scheme, ["paths", "/api/v1/email/providers", "get", "security"]),
        ("postwire-security-roles", roles, ["paths", "/api/v1/site/email-config", "get", "security"]),
        ("postwire-api-secured", secured, ["paths", "/api/v1/tenants", "get"]),
        ("postwire-secured-documents-401-403", documents_401_403, ["paths", "/api/v1/tenants/{tenant_id}", "get"]),
        ("postwire-tenant-scoped-404", tenant_404, ["paths", "/api/v1/tenants/{tenant_id}/sites", "get"]),
        ("postwire-json-body-errors", body_errors, ["paths", "/api/v1/tenants/{tenant_id}/email-settings", "put"]),
        ("postwire-error-content", error_content, ["paths", "/api/v1/tenants/{tenant_id}/sites/{site_id}", "delete"]),
        ("postwire-error-problem-json", problem_json, ["paths", "/api/v1/tenants/{tenant_id}", "put"]),
        ("postwire-success-json", success_json, ["paths", "/api/v1/tenants/{tenant_id}/audit", "get"]),
        ("postwire-no-content-204", no_content_204, ["paths", "/api/v1/tenants/{tenant_id}", "delete"]),
        ("postwire-request-closed", request_closed, ["components", "schemas", "TenantRequest"]),
        ("postwire-request-closed-defined", request_closed_defined, ["components", "schemas", "SiteCreateRequest"]),
        ("postwire-operation-id-snake-case", snake_case, ["paths", "/healthz", "get", "operationId"]),
        ("postwire-paths", paths, ["paths", "/v2/readyz"]),
    ]


def test_ruleset_rules_fire_on_violations(tmp_path):
    mutations = _mutations()
    ruleset_rules = {line.strip().rstrip(":") for line in RULESET.read_text().splitlines() if line.startswith("  postwire-")}
    assert ruleset_rules == {name for name, _, _ in mutations}, "every postwire-* rule needs a mutation here"

    spec = load_spec()
    for _, mutate, _ in mutations:
        mutate(spec)
    broken = tmp_path / "openapi.json"
    broken.write_text(json.dumps(spec, indent=2))
    rc, results, _ = spectral_lint(broken)
    assert rc != 0, "spectral must exit non-zero on errors"
    missing = []
    for name, _, where in mutations:
        hits = [r for r in results if r["code"] == name and r["severity"] == 0 and r["path"][: len(where)] == where]
        if not hits:
            missing.append(f"{name} did not report {'.'.join(where)}")
    assert not missing, "\n".join(missing) + "\n\nall results:\n" + "\n".join(map(describe, results))
