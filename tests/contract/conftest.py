"""Fixtures of the API contract tests (tests/contract): a live Management Service.

`live_server` starts `target/debug/management-service serve` once per test session on a
fresh PostgreSQL database (`pw_test_contract_<random>` on the server of
POSTWIRE_TEST_DATABASE_URL, which `scripts/test` exports), with fresh random keys, outbound
connections limited to loopback (POSTWIRE_EGRESS_ALLOW=loopback) and 2-second connect
timeouts, so that nothing a test generates (SMTP hosts, token or issuer URLs) leaves the
machine. It stops the server and drops the database at the end of the session.

The binary is built by `scripts/test` (`cargo build -p management --bin management-service`)
before pytest runs; these tests never run cargo themselves.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from live import OAUTH_USER, SMTP_PASSWORD, SMTP_USER, Http

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "peers"))
from pypeers import free_port as _free_port  # noqa: E402
from pypeers import node_peer as _node_peer  # noqa: E402
from pypeers import random_key as _key  # noqa: E402
SPEC_PATH = REPO / "openapi" / "openapi.json"
BINARY = REPO / "target" / "debug" / "management-service"

# Lines that tests want at the end of the pytest run (e.g. the schemathesis case count),
# printed by pytest_terminal_summary even with -q and output capture.
SUMMARY_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if SUMMARY_LINES:
        terminalreporter.section("API contract")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    pg_bin = os.environ.get("POSTWIRE_PG_BIN_DIR")
    if pg_bin and (Path(pg_bin) / "psql").exists():
        return str(Path(pg_bin) / "psql")
    pytest.fail("psql not found (PATH or POSTWIRE_PG_BIN_DIR): needed to create the test database")


def _with_database(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@dataclass
class LiveServer:
    base_url: str
    # Not in repr: pytest prints fixtures in failure reports, and env holds the keys.
    env: dict[str, str] = field(repr=False)
    log_path: Path = field(repr=False)
    http: Http = field(repr=False)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _tokens: dict = field(default_factory=dict, repr=False)

    def check_alive(self) -> None:
        """Fails with the server's exit status and log when it is gone (it only stops at the
        end of the session: anything earlier is a crash, or a signal from outside)."""
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(
                f"management-service is no longer running (exit status {self.proc.returncode}; "
                f"a negative status is the signal that ended it):\n{self.log_tail()}"
            )

    def token(self, role: str, tenant: str | None = None, site: str | None = None) -> str:
        key = (role, tenant, site)
        if key not in self._tokens:
            cmd = [str(BINARY), "token", "--role", role, "--ttl", "2h", "--sub", "contract-tests"]
            if tenant:
                cmd += ["--tenant", tenant]
            if site:
                cmd += ["--site", site]
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"`{' '.join(cmd[1:])}` failed: {out.stderr}"
            jwt = out.stdout.strip()
            assert jwt.count(".") == 2 and "\n" not in jwt, f"not a JWT on stdout: {out.stdout!r}"
            self._tokens[key] = jwt
        return self._tokens[key]

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    admin_url = os.environ.get("POSTWIRE_TEST_DATABASE_URL")
    if not admin_url:
        pytest.fail(
            "POSTWIRE_TEST_DATABASE_URL is not set: run the contract tests through scripts/test, "
            "or export an admin URL of a PostgreSQL server (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
        )
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: cargo build -p management --bin management-service")

    psql = _psql()
    dbname = f"pw_test_contract_{secrets.token_hex(6)}"
    subprocess.run(
        [psql, admin_url, "-qX", "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{dbname}"'],
        check=True,
        capture_output=True,
        timeout=60,
    )

    tmp = tmp_path_factory.mktemp("management-service")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    # A clean environment: nothing inherited may configure the service (POSTWIRE_CONFIG,
    # REDIS_URL, JWT issuer settings, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTWIRE_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        {
            "POSTWIRE_LISTEN": f"127.0.0.1:{port}",
            "POSTWIRE_PUBLIC_URL": base_url,
            "DATABASE_URL": _with_database(admin_url, dbname),
            "POSTWIRE_MASTER_KEY": _key(),
            "POSTWIRE_CACHE_KEY": _key(),
            "POSTWIRE_JWT_SECRET": _key(),
            "POSTWIRE_DATA_DIR": str(tmp / "data"),
            # Generated SMTP hosts and token/issuer URLs must never leave the machine.
            "POSTWIRE_EGRESS_ALLOW": "loopback",
            "POSTWIRE_CONNECT_TIMEOUT": "2s",
            "RUST_LOG": env.get("RUST_LOG", "info"),
        }
    )
    (tmp / "data").mkdir()
    log_path = tmp / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(BINARY), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = LiveServer(base_url=base_url, env=env, log_path=log_path, http=Http(base_url), proc=proc)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"management-service exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                status, _ = server.http.call("GET", "/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"management-service not ready at {base_url}/readyz after 90 s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is not None:
            SUMMARY_LINES.append(
                f"management-service stopped before the end of the session (exit status {proc.returncode}); "
                f"its log: {log_path}"
            )
        # Only the process this fixture started (its own session: no other process is hit).
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()
        subprocess.run(
            [psql, admin_url, "-qX", "-c", f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'],
            capture_output=True,
            timeout=60,
        )


@pytest.fixture(scope="session")
def smtp_peer():
    """The SMTP test peer (npm `smtp-server`), plain text with PLAIN/LOGIN for the seeded
    account, so `POST .../email-settings/test` with the seeded settings really sends.
    Yields its ready line ({"port", "control_port", ...})."""
    with _node_peer("smtp-server.mjs", "--no-tls", "--users", f"{SMTP_USER}:{SMTP_PASSWORD}") as ready:
        yield ready


@pytest.fixture(scope="session")
def oauth_peer():
    """The OAuth 2.0 / OpenID test peer (npm `oauth2-mock-server` behind a strict front), so a
    tenant can hold a real grant and sites get real access tokens. Yields its ready line
    ({"issuer", "port", "control"})."""
    with _node_peer("oauth-server.mjs", "--username", OAUTH_USER) as ready:
        yield ready
