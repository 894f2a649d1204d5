"""The test peers of this folder (real protocol servers from npm packages: smtp-server.mjs,
oauth-server.mjs) and the small helpers around them, for the Python test suites
(tests/contract, tests/observability), which put this folder on sys.path."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parent


def random_key() -> str:
    """32 random bytes, base64 (a master, cache or JWT key)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def free_port() -> int:
    """A free loopback port, for a binary that only takes an explicit address (or must know
    its public URL before it starts). Another process could take it in between; the
    readiness wait then fails loudly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def node_peer(name: str, *args: str):
    """Runs the peer `name` of this folder on loopback; yields its ready line (one JSON
    object). Stops it, and only it, at the end (it also exits when this process goes away)."""
    if not (PEERS / "node_modules").exists():
        pytest.fail("tests/peers/node_modules is missing: run `npm ci` in tests/peers (scripts/test does)")
    node = shutil.which("node") or pytest.fail("node is not installed")
    proc = subprocess.Popen(
        [node, str(PEERS / name), *args, "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"{name} exited ({proc.wait(timeout=10)}) before it listened")
        yield json.loads(line)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
