"""Offline checks of the Helm chart in helm/postwire.

The chart is linted and rendered by helm-python-sdk (Helm's Go SDK in a bundled shared
library: no helm binary, no cluster) and every rendered manifest is validated by
kubernetes-validate in strict mode (unknown fields refused) against the Kubernetes versions
in K8S_VERSIONS, from the schemas that package ships.

Run with scripts/test, or: python -m pytest -q tests/chart
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import helm_python as helm
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "helm" / "postwire"
VALUES_DIR = HERE / "values"

RELEASE = "pw"
NAMESPACE = "mail"
FULLNAME = "pw-postwire"
K8S_VERSIONS = ["1.30", "1.35"]

# name -> values file (None: the chart's defaults, nothing overridden)
CASES = {
    "default": None,
    "production": "production.yaml",
    "two-site-mailers": "two-site-mailers.yaml",
}

# Kinds from CRDs: kubernetes-validate has no schema for them (checked by hand below).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# The Management Service's environment: ARCHITECTURE.md §2, plus the external identity
# provider settings the service reads (services/management/src/config.rs).
MANAGEMENT_ENV = {
    "POSTWIRE_LISTEN",
    "POSTWIRE_DATA_DIR",
    "DATABASE_URL",
    "REDIS_URL",
    "POSTWIRE_MASTER_KEY",
    "POSTWIRE_CACHE_KEY",
    "POSTWIRE_JWT_SECRET",
    "POSTWIRE_PUBLIC_URL",
    "POSTWIRE_EXTRA_CA_FILE",
    "POSTWIRE_EGRESS_ALLOW",
    "POSTWIRE_INVITATION_URL_TEMPLATE",
    "POSTWIRE_GRANT_KEEPALIVE",
    "POSTWIRE_LOG_FORMAT",
    "POSTWIRE_JWT_ISSUER",
    "POSTWIRE_JWT_AUDIENCE",
    "POSTWIRE_JWT_ALGORITHMS",
    "POSTWIRE_JWT_PUBLIC_KEY_FILE",
}
MANAGEMENT_SECRET_ENV = {
    "DATABASE_URL",
    "POSTWIRE_MASTER_KEY",
    "POSTWIRE_CACHE_KEY",
    "POSTWIRE_JWT_SECRET",
    "REDIS_URL",
}
SITE_MAILER_ENV = {
    "POSTWIRE_LISTEN",
    "POSTWIRE_DATA_DIR",
    "POSTWIRE_MANAGEMENT_URL",
    "POSTWIRE_EGRESS_ALLOW",
    "POSTWIRE_LOG_FORMAT",
    "POSTWIRE_EXTRA_CA_FILE",
    "POSTWIRE_SITE_ID",
    "POSTWIRE_SITE_SECRET",
    "POSTWIRE_API_KEY",
    "REDIS_URL",
    "POSTWIRE_CACHE_KEY",
}
SITE_MAILER_SECRET_ENV = {
    "POSTWIRE_SITE_ID",
    "POSTWIRE_SITE_SECRET",
    "POSTWIRE_API_KEY",
    "REDIS_URL",
    "POSTWIRE_CACHE_KEY",
}


# ---------------------------------------------------------------------------------------
# helpers


def load_values(case: str) -> dict | None:
    name = CASES[case]
    if name is None:
        return None
    return yaml.safe_load((VALUES_DIR / name).read_text())


def render(values: dict | None) -> tuple[list[dict], str]:
    """Renders the chart; returns its manifests (parsed) and NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_template", path)
                docs.append(doc)
    return docs, notes


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "_template"}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(docs: list[dict]):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]


def container_env(docs: list[dict], workload: dict) -> dict[str, dict]:
    """The effective environment of a workload's first container: name -> source."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, dict] = {}
    for src in container.get("envFrom", []):
        cm = one(docs, "ConfigMap", src["configMapRef"]["name"])
        for k, v in cm["data"].items():
            env[k] = {"value": v, "from": "configmap"}
    for e in container.get("env", []):
        assert e["name"] not in env, f"{e['name']} set twice"
        env[e["name"]] = e
    return env


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/definitions/"), ref
        node = root["definitions"][ref.rsplit("/", 1)[1]]
    return node


# Definitions documented as one value (Kubernetes-shaped objects, probe timings).
WHOLE_VALUE_DEFS = {"resources", "affinity", "probeTiming"}


def schema_leaf_paths(node: dict, root: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every value the schema allows (`[]` for list items)."""
    if node.get("$ref", "").rsplit("/", 1)[-1] in WHOLE_VALUE_DEFS:
        return [prefix]
    node = resolve(node, root)
    if node.get("properties"):
        paths = []
        for key, sub in node["properties"].items():
            paths += schema_leaf_paths(sub, root, f"{prefix}.{key}" if prefix else key)
        return paths
    items = node.get("items")
    if node.get("type") == "array" and items and resolve(items, root).get("properties"):
        # Lists of Kubernetes objects (EnvVar, Toleration, ...) are one value; lists of
        # chart objects (ingress hosts, site mailers) are documented field by field.
        if "$ref" in items:
            return [prefix]
        return schema_leaf_paths(items, root, prefix + "[]")
    return [prefix]


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> str:
    return request.param


_RENDERED: dict[str, tuple[list[dict], str]] = {}


@pytest.fixture(scope="module")
def rendered(case) -> tuple[list[dict], str]:
    if case not in _RENDERED:
        _RENDERED[case] = render(load_values(case))
    return _RENDERED[case]


@pytest.fixture
def docs(rendered) -> list[dict]:
    return rendered[0]


# ---------------------------------------------------------------------------------------
# the chart itself


def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "postwire"
    for f in ("values.yaml", "values.schema.json", "README.md", "templates/NOTES.txt"):
        assert (CHART / f).is_file(), f


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_lint_strict(case, version):
    report = helm.lint(CHART, load_values(case), strict=True, kube_version=f"v{version}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_schema_is_valid_and_accepts_the_defaults():
    s = schema()
    jsonschema.Draft7Validator.check_schema(s)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(s).validate(defaults)
    for name in CASES.values():
        if name:
            jsonschema.Draft7Validator(s).validate(yaml.safe_load((VALUES_DIR / name).read_text()))


def test_schema_closes_every_object():
    """additionalProperties: false at the root and on each object the chart defines; maps
    (labels, resource lists) say what their values are; Kubernetes pass-through objects are
    marked open explicitly."""
    s = schema()
    assert s["additionalProperties"] is False
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            is_object = node.get("type") == "object" or "properties" in node
            if is_object:
                assert "additionalProperties" in node, f"{path}: additionalProperties missing"
                if "properties" in node:
                    assert node["additionalProperties"] is False, f"{path} is not closed"
                elif node["additionalProperties"] is True:
                    open_objects.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(s, "#")
    # Only Helm's `global` and the insides of Kubernetes affinity types stay open.
    assert all(
        p == "#/properties/global" or p.startswith("#/definitions/affinity/") for p in open_objects
    ), open_objects


def test_values_yaml_keeps_no_secret_values():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    for value in strings(defaults):
        assert not re.search(r"://[^/\s:@]+:[^@\s]+@", value), f"credentials in a URL: {value}"
        assert not re.search(r"[A-Za-z0-9+/]{32,}={0,2}", value), f"something like a key: {value}"
    for name, ref in defaults["secrets"].items():
        assert set(ref) == {"existingSecret", "key"}, name
        assert ref["existingSecret"] == "postwire", name


def test_readme_lists_every_value():
    readme = (CHART / "README.md").read_text()
    values_section = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", values_section, re.M))
    s = schema()
    paths = set(schema_leaf_paths(s, s)) - {"global"}
    # A site mailer entry takes every key of siteMailerDefaults; the README says so once.
    paths = {p for p in paths if not p.startswith("siteMailers[].")} | {
        "siteMailers",
        "siteMailers[].name",
        "siteMailers[].existingSecret",
    }
    missing = sorted(paths - documented)
    assert not missing, f"values not in helm/postwire/README.md: {missing}"
    unknown = sorted(documented - paths)
    assert not unknown, f"README.md documents values the schema does not have: {unknown}"


# ---------------------------------------------------------------------------------------
# rendered manifests


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(docs, version):
    failures = []
    for doc in docs:
        resource = strip(doc)
        key = (resource["apiVersion"], resource["kind"])
        try:
            kv.validate(resource, version, strict=True)
        except kv.SchemaNotFoundError:
            if key not in CRD_KINDS:
                failures.append(f"{doc['_template']}: no schema for {key} in {version}")
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            failures.append(f"{doc['_template']} {kv.kn(resource)}: {where}: {e.message}")
    assert not failures, "\n".join(failures)


def test_kubernetes_validate_cli_strict(rendered, tmp_path):
    """The same check through the `kubernetes-validate --strict` command line."""
    docs, _ = rendered
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all([strip(d) for d in docs]))
    args = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for v in K8S_VERSIONS:
        args += ["-k", f"{v}.0"]
    proc = subprocess.run(args + [str(manifest)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        assert line.startswith("WARN") and "ServiceMonitor" in line, line


def test_service_monitor_shape():
    docs, _ = render(load_values("production"))
    sm = one(docs, "ServiceMonitor", FULLNAME)
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(sm["spec"]) == {"namespaceSelector", "selector", "endpoints"}
    assert sm["spec"]["endpoints"] == [
        {"port": "http", "path": "/metrics", "scheme": "http", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    # It selects the Services of this release, all of which name their port `http`.
    services = find(docs, "Service")
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(
        all(s["metadata"]["labels"].get(k) == v for k, v in sel.items()) for s in services
    )
    assert all(s["spec"]["ports"][0]["name"] == "http" for s in services)


def test_expected_resources(case, docs):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    base = {
        ("ConfigMap", f"{FULLNAME}-config"),
        ("Deployment", FULLNAME),
        ("Service", FULLNAME),
        ("HorizontalPodAutoscaler", FULLNAME),
        ("PodDisruptionBudget", FULLNAME),
        ("Job", f"{FULLNAME}-migrate"),
    }
    extra = {
        "default": set(),
        "production": {
            ("Ingress", FULLNAME),
            ("ServiceMonitor", FULLNAME),
            ("NetworkPolicy", FULLNAME),
        },
        "two-site-mailers": {
            ("ConfigMap", f"{FULLNAME}-site-head-office-config"),
            ("Service", f"{FULLNAME}-site-head-office"),
            ("StatefulSet", f"{FULLNAME}-site-head-office"),
            ("ConfigMap", f"{FULLNAME}-site-branch-office-config"),
            ("Service", f"{FULLNAME}-site-branch-office"),
            ("PersistentVolumeClaim", f"{FULLNAME}-site-branch-office-data"),
            ("Deployment", f"{FULLNAME}-site-branch-office"),
            ("NetworkPolicy", FULLNAME),
            ("NetworkPolicy", f"{FULLNAME}-site-mailers"),
        },
    }[case]
    assert kinds == sorted(base | extra)
    for d in docs:
        assert d["metadata"]["namespace"] == NAMESPACE
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_pods_are_hardened(docs):
    for workload, pod in pod_templates(docs):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        assert pod["enableServiceLinks"] is False, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["runAsNonRoot"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert c["resources"]["requests"] and c["resources"]["limits"], name
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name
            assert "/var/lib/postwire" in mounts, name
            for e in c.get("env", []):
                if e["name"] in MANAGEMENT_SECRET_ENV | SITE_MAILER_SECRET_ENV:
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (name, e)


def test_management_deployment(case, docs):
    dep = one(docs, "Deployment", FULLNAME)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["serve"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    env = container_env(docs, dep)
    extra = {e["name"] for e in ((load_values(case) or {}).get("management", {}).get("extraEnv", []))}
    assert set(env) - extra <= MANAGEMENT_ENV, set(env) - extra - MANAGEMENT_ENV
    assert env["POSTWIRE_LISTEN"]["value"] == "0.0.0.0:8080"
    assert env["POSTWIRE_EGRESS_ALLOW"]["value"] == "public"
    data_dir = env["POSTWIRE_DATA_DIR"]["value"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == data_dir)
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mount["name"])
    for name in MANAGEMENT_SECRET_ENV:
        assert "secretKeyRef" in env[name]["valueFrom"], name

    # The Service points at the pods' http port, and the config checksum rolls the pods.
    svc = one(docs, "Service", FULLNAME)
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert re.fullmatch(r"[0-9a-f]{64}", dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


def test_default_secrets_come_from_the_postwire_secret():
    docs, _ = render(None)
    env = container_env(docs, one(docs, "Deployment", FULLNAME))
    refs = {n: env[n]["valueFrom"]["secretKeyRef"] for n in MANAGEMENT_SECRET_ENV}
    assert refs == {
        "DATABASE_URL": {"name": "postwire", "key": "database-url"},
        "POSTWIRE_MASTER_KEY": {"name": "postwire", "key": "master-key"},
        "POSTWIRE_CACHE_KEY": {"name": "postwire", "key": "cache-key"},
        "POSTWIRE_JWT_SECRET": {"name": "postwire", "key": "jwt-secret"},
        "REDIS_URL": {"name": "postwire", "key": "redis-url"},
    }


def test_default_replicas_hpa_and_pdb():
    docs, _ = render(None)
    hpa = one(docs, "HorizontalPodAutoscaler", FULLNAME)
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    # With an HPA the Deployment leaves `replicas` to it (an upgrade would reset it otherwise).
    assert "replicas" not in one(docs, "Deployment", FULLNAME)["spec"]
    pdb = one(docs, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1

    docs, _ = render({"management": {"autoscaling": {"enabled": False}}})
    assert one(docs, "Deployment", FULLNAME)["spec"]["replicas"] == 2
    assert not find(docs, "HorizontalPodAutoscaler")


def test_migration_job_is_a_hook(docs):
    job = one(docs, "Job", f"{FULLNAME}-migrate")
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["args"] == ["migrate"]
    assert c["image"] == one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]["image"]
    # A pre-install hook runs before the release's ConfigMap exists: no envFrom.
    assert "envFrom" not in c
    env = {e["name"]: e for e in c["env"]}
    assert set(env) == {"POSTWIRE_DATA_DIR", "POSTWIRE_LOG_FORMAT", "DATABASE_URL"}
    assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]


def test_production_values():
    docs, _ = render(load_values("production"))
    dep = one(docs, "Deployment", FULLNAME)
    env = container_env(docs, dep)
    assert env["POSTWIRE_PUBLIC_URL"]["value"] == "https://mail-admin.example.com"
    assert env["POSTWIRE_EXTRA_CA_FILE"]["value"] == "/etc/postwire/extra-ca/ca-bundle.pem"
    assert env["POSTWIRE_JWT_PUBLIC_KEY_FILE"]["value"] == "/etc/postwire/jwt/public-key.pem"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "postwire-db-app", "key": "uri"}
    assert env["RUST_LOG"]["value"] == "info"
    pod = dep["spec"]["template"]["spec"]
    (tsc,) = pod["topologySpreadConstraints"]
    assert tsc["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "management"
    assert pod["containers"][0]["image"] == "registry.example.com/platform/postwire:0.1.0"
    assert one(docs, "PodDisruptionBudget", FULLNAME)["spec"] == {
        "minAvailable": 2,
        "selector": dep["spec"]["selector"],
    }
    hpa = one(docs, "HorizontalPodAutoscaler", FULLNAME)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu", "memory"]
    ing = one(docs, "Ingress", FULLNAME)
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"secretName": "postwire-tls", "hosts": ["mail-admin.example.com"]}]
    np = one(docs, "NetworkPolicy", FULLNAME)
    (rule,) = np["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "site-mailer"
    assert len(rule["from"]) == 3


def test_two_site_mailers():
    docs, notes = render(load_values("two-site-mailers"))
    head = one(docs, "StatefulSet", f"{FULLNAME}-site-head-office")
    branch = one(docs, "Deployment", f"{FULLNAME}-site-branch-office")
    for w in (head, branch):
        assert w["spec"]["replicas"] == 1
        (c,) = w["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["/usr/local/bin/site-mailer"]
        assert c["ports"][0]["containerPort"] == 8025
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        env = container_env(docs, w)
        assert set(env) <= SITE_MAILER_ENV, set(env) - SITE_MAILER_ENV
        assert env["POSTWIRE_LISTEN"]["value"] == "0.0.0.0:8025"
        assert env["POSTWIRE_DATA_DIR"]["value"] == "/var/lib/postwire"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/var/lib/postwire"] == "data"

    # head-office: the defaults, a StatefulSet with a volumeClaimTemplate and Redis.
    env = container_env(docs, head)
    assert head["spec"]["serviceName"] == f"{FULLNAME}-site-head-office"
    (vct,) = head["spec"]["volumeClaimTemplates"]
    assert vct["metadata"]["name"] == "data"
    assert vct["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert env["POSTWIRE_MANAGEMENT_URL"]["value"] == f"http://{FULLNAME}.{NAMESPACE}.svc:8080"
    assert env["POSTWIRE_EGRESS_ALLOW"]["value"] == "public,private,loopback"
    assert env["POSTWIRE_SITE_ID"]["valueFrom"]["secretKeyRef"] == {"name": "postwire-site-head-office", "key": "site-id"}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "postwire-site-cache", "key": "redis-url"}
    assert env["POSTWIRE_CACHE_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "postwire-site-cache", "key": "cache-key"}

    # branch-office: overrides merged over the defaults.
    env = container_env(docs, branch)
    assert branch["spec"]["strategy"] == {"type": "Recreate"}
    pvc = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-site-branch-office-data")
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in branch["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert env["POSTWIRE_MANAGEMENT_URL"]["value"] == "https://mail-admin.example.com"
    assert env["POSTWIRE_EGRESS_ALLOW"]["value"] == "public,10.20.0.0/16"
    assert env["POSTWIRE_EXTRA_CA_FILE"]["value"] == "/etc/postwire/extra-ca/ca.crt"
    assert env["POSTWIRE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "postwire-site-branch-office", "key": "local-api-key"}
    assert env["POSTWIRE_SITE_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "site-secret"
    assert "REDIS_URL" not in env and "POSTWIRE_CACHE_KEY" not in env
    assert branch["spec"]["template"]["spec"]["nodeSelector"] == {"example.com/site": "branch"}

    # Each Service selects exactly its own site mailer.
    for w in (head, branch):
        svc = one(docs, "Service", w["metadata"]["name"])
        assert svc["spec"]["selector"] == w["spec"]["selector"]["matchLabels"]
    assert "head-office" in notes and "branch-office" in notes


def test_notes(rendered):
    _, notes = rendered
    assert "kubectl -n mail create secret generic" in notes
    assert "management-service token --role cluster_admin" in notes


# ---------------------------------------------------------------------------------------
# values that must be refused


def _refused(values: dict) -> str:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(err.value)


def test_bad_values_file_is_refused():
    bad = yaml.safe_load((VALUES_DIR / "bad-misspelled-key.yaml").read_text())
    message = _refused(bad)
    assert "replicaCont" in message and "additional properties" in message, message
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
    report = helm.lint(CHART, bad, strict=True)
    assert any("replicaCont" in e for e in report["errors"]), report


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"imagePullSecret": []}, "'imagePullSecret' not allowed"),
        ({"management": {"logFormat": "xml"}}, "/management/logFormat"),
        ({"management": {"grantKeepalive": "1 day"}}, "/management/grantKeepalive"),
        ({"secrets": {"masterKey": {"existingSecret": "postwire", "key": "k", "value": "x"}}}, "'value' not allowed"),
        ({"management": {"ingress": {"enabeld": True}}}, "'enabeld' not allowed"),
        ({"siteMailers": [{"name": "a"}]}, "missing property 'existingSecret'"),
        ({"siteMailers": [{"name": "a", "existingSecret": "s", "persistance": {}}]}, "'persistance' not allowed"),
        ({"siteMailers": [{"name": "Bad_Name", "existingSecret": "s"}]}, "/siteMailers/0/name"),
        ({"siteMailerDefaults": {"kind": "DaemonSet"}}, "/siteMailerDefaults/kind"),
        ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
        ({"management": {"resources": {"request": {"cpu": "1"}}}}, "'request' not allowed"),
    ],
)
def test_schema_refuses(values, needle):
    message = _refused(values)
    assert needle in message, message


@pytest.mark.parametrize(
    "values, needle",
    [
        # Several replicas share the access-token cache through Redis.
        ({"secrets": {"redisUrl": {"existingSecret": "", "key": "redis-url"}}}, "Redis is required"),
        (
            {"siteMailers": [{"name": "a", "existingSecret": "s"}, {"name": "a", "existingSecret": "t"}]},
            "used twice",
        ),
        ({"management": {"autoscaling": {"minReplicas": 4, "maxReplicas": 3}}}, "maxReplicas"),
        ({"management": {"externalIssuer": {"enabled": True, "issuer": ""}}}, "externalIssuer.issuer"),
    ],
)
def test_template_checks_refuse(values, needle):
    message = _refused(values)
    assert needle in message, message


def test_single_replica_without_redis_renders():
    values = {
        "secrets": {"redisUrl": {"existingSecret": "", "key": "redis-url"}},
        "management": {"replicaCount": 1, "autoscaling": {"enabled": False}},
    }
    docs, _ = render(values)
    env = container_env(docs, one(docs, "Deployment", FULLNAME))
    assert "REDIS_URL" not in env
    assert one(docs, "Deployment", FULLNAME)["spec"]["replicas"] == 1


def test_site_mailer_overrides_do_not_leak_into_later_entries():
    """Each entry is merged over its own copy of siteMailerDefaults."""
    values = load_values("two-site-mailers")
    values["siteMailers"].append({"name": "warehouse", "existingSecret": "postwire-site-warehouse"})
    docs, _ = render(values)
    env = container_env(docs, one(docs, "StatefulSet", f"{FULLNAME}-site-warehouse"))
    assert env["POSTWIRE_EGRESS_ALLOW"]["value"] == "public,private,loopback"
    assert env["POSTWIRE_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "api-key"
    assert "POSTWIRE_EXTRA_CA_FILE" not in env
    assert "REDIS_URL" in env
