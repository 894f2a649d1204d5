"""A client generated from the checked-in openapi/openapi.json drives the live service.

openapi-python-client (PyPI; reads OpenAPI 3.0 and 3.1) generates a typed client into a
temporary directory at test time (never committed). With it, as Cloud Central and a tenant
admin would: provision a tenant, read it, configure its email settings, read them back,
delete the tenant. The client is built with `raise_on_unexpected_status=True`, so a status
code the document does not list fails the test, and every body is parsed by the generated
models, so a body the models cannot read fails it too.
"""

from __future__ import annotations

import importlib
import secrets
import subprocess
import sys

import pytest

from conftest import SPEC_PATH

PACKAGE = "postwire_client"


@pytest.fixture(scope="module")
def client_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated-client")
    config = root / "openapi-python-client.yaml"
    # No post hooks: the formatter (ruff) is not what is tested here.
    config.write_text(f"package_name_override: {PACKAGE}\nproject_name_override: postwire-client\npost_hooks: []\n")
    out = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(SPEC_PATH), "--meta", "none",
         "--config", str(config), "--output-path", str(root / PACKAGE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = out.stdout + out.stderr
    assert out.returncode == 0, f"openapi-python-client failed:\n{output}"
    # It reports every operation or schema it had to skip as a warning.
    assert "Warning" not in output, f"openapi-python-client skipped parts of the document:\n{output}"
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_generated_client_provisions_configures_and_deletes_a_tenant(client_package, live_server):
    from postwire_client import AuthenticatedClient
    from postwire_client.api.email_settings import get_settings, put_settings
    from postwire_client.api.tenants import delete_tenant, get_tenant, put_tenant
    from postwire_client.models import (
        AuthMethod,
        AuthRequest,
        EmailSettingsRequest,
        EmailSettingsResponse,
        Encryption,
        FeatureKind,
        FeatureSendersRequest,
        Problem,
        ProviderId,
        ReceiverRequest,
        SenderRequest,
        ServerRequest,
        TenantRequest,
        TenantStatus,
        TenantView,
    )

    live_server.check_alive()
    tenant_id = f"contract-{secrets.token_hex(4)}"

    def client(token: str) -> AuthenticatedClient:
        return AuthenticatedClient(base_url=live_server.base_url, token=token, raise_on_unexpected_status=True, timeout=30)

    with client(live_server.token("cluster_admin")) as cluster:
        # Provision: 201 on creation, then 200 for the same body (idempotent).
        body = TenantRequest(name="Contract Corp", admin_emails=["admin@contract.example"])
        created = put_tenant.sync_detailed(tenant_id, client=cluster, body=body)
        assert created.status_code == 201, created.content
        assert isinstance(created.parsed, TenantView), created.parsed
        assert created.parsed.tenant_id == tenant_id
        assert created.parsed.status == TenantStatus.ACTIVE
        again = put_tenant.sync_detailed(tenant_id, client=cluster, body=body)
        assert again.status_code == 200, again.content

        # Read it back.
        read = get_tenant.sync_detailed(tenant_id, client=cluster)
        assert read.status_code == 200, read.content
        assert isinstance(read.parsed, TenantView)
        assert read.parsed.name == "Contract Corp"
        assert read.parsed.admin_emails == ["admin@contract.example"]

    with client(live_server.token("tenant_admin", tenant_id)) as admin:
        # Configure email: Microsoft 365 preset with username + password (README's example).
        settings = EmailSettingsRequest(
            provider=ProviderId.MICROSOFT365,
            server=ServerRequest(host="smtp.office365.com", port=587, encryption=Encryption.STARTTLS),
            auth=AuthRequest(method=AuthMethod.PASSWORD, username="scanner@contract.example", password="app-password"),
            senders=[SenderRequest(address="scanner@contract.example", name="Contract Scanner", default=True)],
            receivers=[ReceiverRequest(address="it@contract.example", purpose=FeatureKind.REPORT)],
            feature_senders=FeatureSendersRequest(scan_to_email="scanner@contract.example"),
        )
        stored = put_settings.sync_detailed(tenant_id, client=admin, body=settings)
        assert stored.status_code == 200, stored.content
        assert isinstance(stored.parsed, EmailSettingsResponse), stored.parsed

        got = get_settings.sync_detailed(tenant_id, client=admin)
        assert got.status_code == 200, got.content
        view = got.parsed
        assert isinstance(view, EmailSettingsResponse), view
        assert view.provider == ProviderId.MICROSOFT365
        assert view.server.host == "smtp.office365.com" and view.server.port == 587
        assert view.auth.method == AuthMethod.PASSWORD
        assert view.auth.password_set is True
        # Write-only: the password never comes back.
        assert "app-password" not in got.content.decode()
        assert [s.address for s in view.senders] == ["scanner@contract.example"]

    with client(live_server.token("cluster_admin")) as cluster:
        deleted = delete_tenant.sync_detailed(tenant_id, client=cluster)
        assert deleted.status_code == 204, deleted.content
        gone = get_tenant.sync_detailed(tenant_id, client=cluster)
        assert gone.status_code == 404, gone.content
        assert isinstance(gone.parsed, Problem), gone.parsed
        assert gone.parsed.status == 404
