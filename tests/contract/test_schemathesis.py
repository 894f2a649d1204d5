"""Property-based contract tests: schemathesis against the live Management Service.

One `schemathesis run` (its CLI; see `schemathesis run --help`) of the checked-in
openapi/openapi.json against the live server of conftest.py (PostgreSQL, loopback-only egress,
2 s connect timeouts), all phases (examples, coverage, fuzzing, stateful), positive and
negative data, with the tokens chosen per operation by st_hooks.py (cluster_admin,
tenant_admin of `acme`, or a site of `acme` or of `globex`, which holds an authorized
OAuth 2.0 grant at the OAuth test peer).

The checks, each its own test below so that a report names what failed:
  not_a_server_error          no 5xx, ever;
  status_code_conformance     every status code is documented for the operation;
  content_type_conformance    the Content-Type is one the document lists for that status;
  response_schema_conformance the body matches the documented schema.
and `test_case_count`: at least MIN_CASES generated cases, none of which errored.

No operation is excluded and no failure is filtered. The one narrowing is in
schemathesis.toml, with its reason: not_a_server_error accepts the documented upstream
answers 502/503 of the two operations that call the tenant's SMTP server / OAuth provider
(generated settings name hosts that cannot be reached from here). Each failing test prints
the failures schemathesis found, with a curl command that reproduces each.

Knobs (environment): POSTWIRE_CONTRACT_SEED to replay a run (the seed is printed),
POSTWIRE_CONTRACT_MAX_EXAMPLES (schemathesis --max-examples, default 60).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import SPEC_PATH, SUMMARY_LINES
from live import OAUTH_TENANT, provision_acme, provision_oauth_tenant

MIN_CASES = 1000
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
]
HERE = Path(__file__).resolve().parent


class Run:
    def __init__(self, report: dict, junit: ET.Element, output: str, stats: dict, seed: str):
        self.report = report
        self.junit = junit
        self.output = output
        self.stats = stats
        self.seed = seed

    def failure_messages(self) -> list[str]:
        """The junit report's failure texts: one per operation, holding every distinct
        failure found there with its curl reproduction."""
        return [
            f"{case.get('name')}:\n{(fail.get('message') or '')}\n{fail.text or ''}"
            for case in self.junit.iter("testcase")
            for fail in list(case.findall("failure")) + list(case.findall("error"))
        ]


@pytest.fixture(scope="module")
def st_run(live_server, smtp_peer, oauth_peer, tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("schemathesis")
    live_server.check_alive()
    cluster = live_server.token("cluster_admin")
    admins = {t: live_server.token("tenant_admin", t) for t in ("acme", OAUTH_TENANT)}
    acme = provision_acme(live_server.http, cluster, admins["acme"], smtp_peer["port"])
    globex = provision_oauth_tenant(
        live_server.http, cluster, admins[OAUTH_TENANT], oauth_peer["issuer"], smtp_peer["port"]
    )
    state = tmp / "state.json"
    state.write_text(
        json.dumps(
            {
                "base_url": live_server.base_url,
                "smtp_port": smtp_peer["port"],
                "oauth_issuer": oauth_peer["issuer"],
                "cluster_admin": cluster,
                "tenants": {
                    "acme": {"admin": admins["acme"], "site_id": acme["site_id"], "site": acme["site_token"]},
                    OAUTH_TENANT: {
                        "admin": admins[OAUTH_TENANT], "site_id": globex["site_id"], "site": globex["site_token"]
                    },
                },
            }
        )
    )
    stats_path = tmp / "stats.json"
    seed = os.environ.get("POSTWIRE_CONTRACT_SEED") or str(int.from_bytes(os.urandom(4), "big"))
    max_examples = os.environ.get("POSTWIRE_CONTRACT_MAX_EXAMPLES", "60")
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(HERE),
            "SCHEMATHESIS_HOOKS": "st_hooks",
            "POSTWIRE_CONTRACT_STATE": str(state),
            "POSTWIRE_CONTRACT_STATS": str(stats_path),
            "NO_COLOR": "1",
        }
    )
    report_dir = tmp / "report"
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file", str(HERE / "schemathesis.toml"),
        "run",
        str(SPEC_PATH),
        "--url", live_server.base_url,
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing,stateful",
        "--mode", "all",
        "--max-examples", max_examples,
        "--seed", seed,
        "--workers", "2",
        "--continue-on-failure",
        "--request-timeout", "20",
        "--generation-database", "none",
        "--suppress-health-check", "all",
        "--report", "json,junit",
        "--report-dir", str(report_dir),
        "--report-json-path", str(report_dir / "report.json"),
        "--report-junit-path", str(report_dir / "junit.xml"),
        "--no-color",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp)
    live_server.check_alive()
    output = proc.stdout + proc.stderr
    (tmp / "output.txt").write_text(output)
    report_file = report_dir / "report.json"
    if not report_file.exists():
        pytest.fail(f"schemathesis wrote no report (exit {proc.returncode}):\n{output[-5000:]}\n{live_server.log_tail()}")
    report = json.loads(report_file.read_text())
    junit = ET.parse(report_dir / "junit.xml").getroot()
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    run = Run(report, junit, output, stats, seed)

    cases = report["test_cases"]
    SUMMARY_LINES.append(
        f"schemathesis {report['schemathesis_version']} (seed {seed}): {cases['generated']} generated cases "
        f"on {report['operations']['tested']}/{report['operations']['selected']} operations, "
        f"{cases['with_failures']} with failures ({cases['unique_failures']} unique), {cases['errored']} errored; "
        f"exit {report['exit_code']}"
    )
    by_check = {c: 0 for c in CHECKS}
    for group in report["failures"]:
        key = _check_of(group)
        by_check[key] = by_check.get(key, 0) + group["count"]
    SUMMARY_LINES.append("schemathesis failures by check: " + ", ".join(f"{k}={v}" for k, v in by_check.items()))
    statuses = sum((sum(c.values()) for c in stats.get("status_codes", {}).values()), 0)
    if statuses:
        SUMMARY_LINES.append(
            f"schemathesis sent {statuses} requests; the seeded tenants were provisioned again "
            f"{sum(stats.get('reprovisioned', {}).values())} times after generated changes"
        )
    return run


# Schemathesis failure codes (schemathesis.failure_codes) -> the check that raises them.
_CODE_TO_CHECK = {
    "ST101": "not_a_server_error",  # server error
    "ST102": "not_a_server_error",  # server error on a content-type probe
    "ST103": "status_code_conformance",  # undocumented status code
    "ST104": "content_type_conformance",  # missing Content-Type
    "ST105": "content_type_conformance",  # undocumented Content-Type
    "ST106": "content_type_conformance",  # malformed media type
    "ST108": "response_schema_conformance",  # body violates the schema
    "ST109": "response_schema_conformance",  # body is not valid JSON
    "ST110": "response_schema_conformance",  # body cannot be deserialized
    "ST111": "response_schema_conformance",  # discriminator mismatch
}


def _check_of(group: dict) -> str:
    return _CODE_TO_CHECK.get(group.get("code", ""), f"{group.get('code')} {group.get('title')}")


def test_case_count(st_run: Run):
    report = st_run.report
    cases = report["test_cases"]
    print(f"schemathesis generated {cases['generated']} cases (seed {st_run.seed})")
    assert report["complete"], f"schemathesis did not finish ({report['stop_reason']}):\n{st_run.output[-5000:]}"
    assert cases["generated"] >= MIN_CASES, f"only {cases['generated']} cases generated, want >= {MIN_CASES}"
    errors = report["errors"]
    assert not errors and cases["errored"] == 0, (
        f"schemathesis errors (not check failures): {errors}\n{st_run.output[-8000:]}"
    )
    ops = report["operations"]
    assert ops["tested"] == ops["selected"] == ops["total"], f"not every operation was tested: {ops}"


@pytest.mark.parametrize("check", CHECKS)
def test_check(st_run: Run, check: str):
    groups = [g for g in st_run.report["failures"] if _check_of(g) == check]
    unknown = [g for g in st_run.report["failures"] if _check_of(g) not in CHECKS]
    assert not unknown, f"failures of an unexpected kind: {unknown}"
    if groups:
        codes = {g["code"] for g in groups}
        details = "\n\n".join(m for m in st_run.failure_messages() if any(code in m for code in codes))
        summary = "\n".join(f"- {g['title']} x{g['count']} on {', '.join(g['operations'])}" for g in groups)
        pytest.fail(
            f"{check}: {sum(g['count'] for g in groups)} failing case(s) (seed {st_run.seed}):\n{summary}\n\n{details}",
            pytrace=False,
        )
