"""Fixtures of the observability tests (tests/observability): the REAL binaries
(`target/debug/management-service`, `target/debug/site-mailer`, built by `scripts/test`)
started as processes with JSON logs (`POSTWIRE_LOG_FORMAT=json`, `RUST_LOG=debug`) captured
from stderr, and OTLP/HTTP trace export to a real receiver in this process
(otlp_receiver.py, PyPI `opentelemetry-proto`); the npm test peers of tests/peers (SMTP with
PLAIN and JWKS-checked XOAUTH2, OAuth 2.0 provider).

Every secret the scenario uses is known to the tests (`Secrets`), so test_no_secrets.py can
grep every captured log line and every exported span for them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otlp_receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "peers"))
from pypeers import free_port as _free_port  # noqa: E402
from pypeers import node_peer as _node_peer  # noqa: E402
from pypeers import random_key as _key  # noqa: E402
BIN_DIR = REPO / "target" / "debug"
MANAGEMENT = BIN_DIR / "management-service"
SITE_MAILER = BIN_DIR / "site-mailer"

SMTP_USER = "scanner@acme.example"
OAUTH_USER = "sender@globex.example"
SITE_API_KEY_PREFIX = "obs-site-api-key-"


def call(base: str, method: str, path: str, token: str | None = None, body=None, headers=None):
    """A tiny JSON client (stdlib): (status, parsed body or text, response headers)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            status, hdrs = resp.status, resp.headers
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, e.headers
    text = raw.decode(errors="replace")
    try:
        return status, (json.loads(text) if text else None), hdrs
    except ValueError:
        return status, text, hdrs


def wait_until(what: str, check, timeout: float = 30.0, every: float = 0.1, explain=None):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f": {explain()}" if explain else ""))
        time.sleep(every)


@dataclass
class Secrets:
    """Every secret value of the scenario; filled as they are created."""

    # Not in repr: pytest prints a failing test's arguments.
    values: dict[str, str] = field(default_factory=dict, repr=False)

    def add(self, name: str, value: str) -> str:
        assert value, name
        self.values[name] = value
        return value


@dataclass
class Service:
    name: str
    proc: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)
    env: dict = field(repr=False)
    base_url: str = ""

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def records(self) -> list[dict]:
        """Every stderr line parsed as JSON (fails on a line that is not)."""
        out = []
        for i, line in enumerate(self.lines()):
            try:
                out.append(json.loads(line))
            except ValueError:
                pytest.fail(f"{self.name}: stderr line {i + 1} is not JSON: {line[:300]!r}")
        return out

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines()[-n:])

    def stop(self) -> None:
        """SIGTERM, and wait: the service flushes its queued spans on the way out."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _clean_env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTWIRE_", "OTEL_")) and k not in ("DATABASE_URL", "REDIS_URL", "RUST_LOG")
    }


def _start(name: str, argv: list[str], env: dict, log_path: Path) -> Service:
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    log.close()
    return Service(name=name, proc=proc, log_path=log_path, env=env)


def _listening_port(svc: Service, timeout: float = 90) -> int:
    def found():
        if svc.proc.poll() is not None:
            pytest.fail(f"{svc.name} exited with {svc.proc.returncode}:\n{svc.tail()}")
        for line in svc.lines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "listening" in str(rec.get("message", "")) and rec.get("port"):
                return int(rec["port"])
        return None

    return wait_until(f"{svc.name} to listen", found, timeout=timeout, every=0.2)


@pytest.fixture(scope="session")
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture(scope="session")
def oauth_peer():
    with _node_peer("oauth-server.mjs", "--username", OAUTH_USER) as ready:
        yield ready


@pytest.fixture(scope="session")
def smtp_peer(oauth_peer, the_secrets):
    password = the_secrets.add("smtp password", "obs-smtp-pw-" + secrets.token_hex(12))
    with _node_peer(
        "smtp-server.mjs",
        "--no-tls",
        "--users",
        f"{SMTP_USER}:{password}",
        "--jwks-url",
        oauth_peer["issuer"] + "/jwks",
    ) as ready:
        yield ready


@pytest.fixture(scope="session")
def the_secrets() -> Secrets:
    return Secrets()


@pytest.fixture(scope="session")
def otel_env(receiver) -> dict:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # export within a fraction of a second (the default batch delay is 5 s)
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=obs-test",
        "POSTWIRE_LOG_FORMAT": "json",
        "RUST_LOG": "debug",
    }


@pytest.fixture(scope="session")
def management(tmp_path_factory, otel_env, the_secrets):
    for b in (MANAGEMENT, SITE_MAILER):
        if not b.exists():
            pytest.fail(f"{b} is missing: cargo build -p management -p site-mailer --bins (scripts/test does)")
    tmp = tmp_path_factory.mktemp("management")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = _clean_env()
    env.update(otel_env)
    env.update(
        {
            "POSTWIRE_LISTEN": f"127.0.0.1:{port}",
            "POSTWIRE_PUBLIC_URL": base,
            "POSTWIRE_DATA_DIR": str(tmp / "data"),
            "POSTWIRE_MASTER_KEY": the_secrets.add("master key", _key()),
            "POSTWIRE_CACHE_KEY": the_secrets.add("cache key", _key()),
            "POSTWIRE_JWT_SECRET": the_secrets.add("JWT secret", _key()),
            "POSTWIRE_EGRESS_ALLOW": "loopback",
            "POSTWIRE_CONNECT_TIMEOUT": "2s",
        }
    )
    svc = _start("management-service", [str(MANAGEMENT), "serve"], env, tmp / "stderr.log")
    svc.base_url = base
    try:
        wait_until(
            "management-service /readyz",
            lambda: (svc.proc.poll() is None or pytest.fail(f"exited:\n{svc.tail()}"))
            and _ready(base),
            timeout=90,
            every=0.2,
        )
        yield svc
    finally:
        svc.stop()


def _ready(base: str) -> bool:
    try:
        return call(base, "GET", "/readyz")[0] == 200
    except OSError:
        return False


def cli_token(svc: Service, role: str, tenant: str | None = None) -> str:
    cmd = [str(MANAGEMENT), "token", "--role", role, "--ttl", "2h", "--sub", "obs-tests"]
    if tenant:
        cmd += ["--tenant", tenant]
    out = subprocess.run(cmd, env=svc.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@dataclass
class World:
    mgmt: Service
    cluster: str
    acme_admin: str
    globex_admin: str
    acme_site: dict
    globex_site: dict
    acme_mailer: Service
    globex_mailer: Service
    api_key: str


def _expect(what, got, *ok):
    status, body, _ = got
    assert status in ok, f"{what}: expected {ok}, got {status}: {body}"
    return body


@pytest.fixture(scope="session")
def world(management, smtp_peer, oauth_peer, the_secrets, otel_env, tmp_path_factory) -> World:
    """Tenant `acme` (SMTP password) and tenant `globex` (OAuth 2.0, authorized through the
    provider's redirect like the admin page's popup), one site each, and a site mailer
    process per site, all exporting spans and writing JSON logs."""
    base = management.base_url
    cluster = cli_token(management, "cluster_admin")
    the_secrets.add("cluster-admin JWT", cluster)
    acme = cli_token(management, "tenant_admin", "acme")
    globex = cli_token(management, "tenant_admin", "globex")
    the_secrets.add("acme admin JWT", acme)
    the_secrets.add("globex admin JWT", globex)

    for t, name in (("acme", "Acme"), ("globex", "Globex")):
        _expect(f"PUT tenant {t}", call(base, "PUT", f"/api/v1/tenants/{t}", cluster, {"name": name, "admin_emails": []}), 200, 201)
    _expect(
        "PUT acme settings",
        call(
            base,
            "PUT",
            "/api/v1/tenants/acme/email-settings",
            acme,
            {
                "provider": "custom",
                "server": {"host": "127.0.0.1", "port": smtp_peer["port"], "encryption": "none"},
                "auth": {"method": "password", "username": SMTP_USER, "password": the_secrets.values["smtp password"]},
                "senders": [{"address": SMTP_USER, "default": True}],
            },
        ),
        200,
    )
    issuer = oauth_peer["issuer"]
    client_secret = the_secrets.add("OAuth client secret", "obs-client-secret-" + secrets.token_hex(12))
    _expect(
        "PUT globex settings",
        call(
            base,
            "PUT",
            "/api/v1/tenants/globex/email-settings",
            globex,
            {
                "provider": "custom",
                "server": {"host": "127.0.0.1", "port": smtp_peer["port"], "encryption": "none"},
                "auth": {
                    "method": "oauth2",
                    "client_id": "postwire",
                    "client_secret": client_secret,
                    "authorization_url": f"{issuer}/authorize",
                    "token_url": f"{issuer}/token",
                    "issuer": issuer,
                    "scopes": ["openid", "email", "offline_access"],
                },
                "senders": [{"address": OAUTH_USER, "default": True}],
            },
        ),
        200,
    )
    auth = _expect("POST globex oauth/authorize", call(base, "POST", "/api/v1/tenants/globex/email-settings/oauth/authorize", globex), 200)
    with urllib.request.urlopen(auth["authorization_url"], timeout=30) as resp:
        assert resp.status == 200 and "/oauth2/client/smtp/authorize-callback" in resp.url, resp.url
    got = _expect("GET globex settings", call(base, "GET", "/api/v1/tenants/globex/email-settings", globex), 200)
    assert got["oauth"]["status"] == "authorized", got["oauth"]

    sites = {}
    for t, admin in (("acme", acme), ("globex", globex)):
        site = _expect(f"POST {t} site", call(base, "POST", f"/api/v1/tenants/{t}/sites", admin, {"name": f"{t} office"}), 201)
        the_secrets.add(f"{t} site secret", site["secret"])
        sites[t] = site

    api_key = the_secrets.add("site mailer API key", SITE_API_KEY_PREFIX + secrets.token_hex(12))
    mailers = {}
    for t in ("acme", "globex"):
        tmp = tmp_path_factory.mktemp(f"site-mailer-{t}")
        env = _clean_env()
        env.update(otel_env)
        env.update(
            {
                "POSTWIRE_LISTEN": "127.0.0.1:0",
                "POSTWIRE_DATA_DIR": str(tmp / "data"),
                "POSTWIRE_MANAGEMENT_URL": base,
                "POSTWIRE_SITE_ID": sites[t]["site_id"],
                "POSTWIRE_SITE_SECRET": sites[t]["secret"],
                "POSTWIRE_API_KEY": api_key,
                "POSTWIRE_RETRY_INITIAL": "100ms",
                "POSTWIRE_RETRY_MAX_DELAY": "300ms",
                "POSTWIRE_CONNECT_TIMEOUT": "2s",
            }
        )
        svc = _start(f"site-mailer ({t})", [str(SITE_MAILER)], env, tmp / "stderr.log")
        svc.base_url = f"http://127.0.0.1:{_listening_port(svc)}"
        mailers[t] = svc
    try:
        yield World(
            mgmt=management,
            cluster=cluster,
            acme_admin=acme,
            globex_admin=globex,
            acme_site=sites["acme"],
            globex_site=sites["globex"],
            acme_mailer=mailers["acme"],
            globex_mailer=mailers["globex"],
            api_key=api_key,
        )
    finally:
        for m in mailers.values():
            m.stop()


def send_through(world: World, mailer: Service, frm: str, subject: str) -> dict:
    """Queues a message at a site mailer and waits until it is sent; returns its status."""
    body = {"kind": "notification", "from": frm, "to": ["it@example.test"], "subject": subject, "text": "hello"}
    msg = _expect("POST /v1/messages", call(mailer.base_url, "POST", "/v1/messages", world.api_key, body), 202)

    def sent():
        st = _expect("GET message", call(mailer.base_url, "GET", f"/v1/messages/{msg['id']}", world.api_key), 200)
        assert st["status"] != "failed", f"{st}\n{mailer.tail()}"
        return st if st["status"] == "sent" else None

    return wait_until(f"message {msg['id']} to be sent", sent, timeout=60, every=0.2)


def pytest_collection_modifyitems(items):
    """The secret scan stops the services: it runs after every other test."""
    items.sort(key=lambda i: "test_no_secrets" in i.nodeid)
