"""deploy/k8s rendered with ``kubectl kustomize`` and checked without a cluster: every resource against
the Kubernetes schemas (kubernetes-validate, offline), then the wiring a typo would break silently:
selectors and labels, probes against the app's real routes and ports, settings against the ones the
service reads, volumes and claims, the security context."""
from __future__ import annotations

import base64
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from recsys.bundle import set_current
from service.app import app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")
K8S_VERSION = "1.31"  # the oldest minor version the manifests are validated for (kubernetes-validate's schemas)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (.ci/run installs kubernetes-client)")]


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / "deploy" / "k8s")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict], kind: str, name: str) -> dict:
    found = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(resources: list[dict]) -> list[tuple[str, dict]]:
    """(owner, pod spec) of every workload, the CronJob's included."""
    out = []
    for r in resources:
        if r["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{r['kind']}/{r['metadata']['name']}", r["spec"]["template"]))
        elif r["kind"] == "CronJob":
            out.append((f"CronJob/{r['metadata']['name']}", r["spec"]["jobTemplate"]["spec"]["template"]))
    return out


def test_the_rendered_set_is_what_the_readme_describes(resources):
    kinds = Counter(r["kind"] for r in resources)
    assert kinds == {"ConfigMap": 2, "PersistentVolumeClaim": 1, "Service": 2, "StatefulSet": 1, "Deployment": 1,
                     "HorizontalPodAutoscaler": 1, "PodDisruptionBudget": 1, "Job": 1, "CronJob": 1, "Secret": 1}


def test_every_resource_validates_against_the_kubernetes_schemas(resources):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for r in resources:
        try:
            kubernetes_validate.validate(r, desired_version=K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{r['kind']}/{r['metadata']['name']}: {err.message} at {list(err.path)}")


def test_selectors_match_the_pods_they_select(resources):
    workloads = {r["metadata"]["name"]: r for r in resources if r["kind"] in ("Deployment", "StatefulSet")}
    for w in workloads.values():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
    for service in of_kind(resources, "Service"):
        targets = [w for w in workloads.values()
                   if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service/{service['metadata']['name']} selects {len(targets)} workloads"
        ports = {p["name"]: p["containerPort"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports or port["targetPort"] in ports.values(), port
    pdb = one(resources, "PodDisruptionBudget", "recommender")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= workloads["recommender"]["spec"]["template"]["metadata"]["labels"].items()
    hpa = one(resources, "HorizontalPodAutoscaler", "recommender")
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == ("Deployment", "recommender")
    assert hpa["spec"]["minReplicas"] >= 2 and "replicas" not in workloads["recommender"]["spec"]  # the HPA's alone
    assert workloads["redis"]["spec"]["serviceName"] == "redis"


def test_probes_name_real_routes_and_ports(resources):
    routes = {route.path for route in app.routes}
    container = one(resources, "Deployment", "recommender")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    assert ports["http"] == int(command[command.index("--port") + 1])
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] in ports
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"  # drain before the server stops
    annotations = one(resources, "Deployment", "recommender")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes and int(annotations["prometheus.io/port"]) == ports["http"]


def test_configmap_and_secret_keys_are_settings_the_service_reads(resources):
    settings = {f"RECSYS_{name.upper()}" for name in Settings.model_fields}
    config = one(resources, "ConfigMap", "recsys-settings")["data"]
    assert set(config) <= settings, set(config) - settings
    Settings(**{k.removeprefix("RECSYS_").lower(): v for k, v in config.items()})  # and values it accepts
    assert config["RECSYS_STATE_BACKEND"] == "redis" and "RECSYS_REDIS_URL" not in config  # a secret: it may hold a password
    url = base64.b64decode(one(resources, "Secret", "recsys-redis")["data"]["RECSYS_REDIS_URL"]).decode()
    assert url.startswith("redis://redis:")
    container = one(resources, "Deployment", "recommender")["spec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "recsys-settings"}} in container["envFrom"]
    secret_refs = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_refs and all(e["name"] == e["valueFrom"]["secretKeyRef"]["key"] and e["name"] in settings for e in secret_refs)
    assert "RECSYS_ADMIN_TOKEN" in {e["name"] for e in secret_refs}
    assert {"RECSYS_REDIS_URL": "recsys-redis"}.items() <= {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in secret_refs}.items()
    retrain = one(resources, "CronJob", "recsys-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert retrain["command"][retrain["command"].index("--events") + 1] == "$(RECSYS_REDIS_URL)"  # the replicas' store
    assert {"name": "RECSYS_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "recsys-redis", "key": "RECSYS_REDIS_URL"}}} in retrain["env"]


def test_claims_exist_and_the_replicas_mount_the_bundle_read_only(resources):
    claims = {c["metadata"]["name"]: c for c in of_kind(resources, "PersistentVolumeClaim")}
    assert claims["recsys-artifacts"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for owner, pod in pod_specs(resources):
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, owner
    recommender = one(resources, "Deployment", "recommender")["spec"]["template"]["spec"]
    mount = next(m for m in recommender["containers"][0]["volumeMounts"] if m["mountPath"] == "/artifacts")
    assert mount["readOnly"] is True
    writers = [o for o, pod in pod_specs(resources) if o.startswith(("Job/", "CronJob/"))]
    assert sorted(writers) == ["CronJob/recsys-retrain", "Job/recsys-train"]
    redis = one(resources, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    assert redis["args"][redis["args"].index("--appendfsync") + 1] == "always"


def test_a_replica_waits_for_the_first_bundle_instead_of_crash_looping(resources, tmp_path):
    """The init container's own script, run here on a bundle root: it waits while the root is empty, and lets
    the replica start once the trainer has moved ``current`` there."""
    pod = one(resources, "Deployment", "recommender")["spec"]["template"]["spec"]
    (wait,) = pod["initContainers"]
    assert wait["image"] == pod["containers"][0]["image"] and wait["envFrom"] == pod["containers"][0]["envFrom"]
    assert {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True} in wait["volumeMounts"]
    env = {"PATH": "/usr/bin:/bin", "RECSYS_BUNDLE_DIR": str(tmp_path)}
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(wait["command"], env=env, capture_output=True, timeout=1)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "manifest.json").write_text("{}")
    set_current(tmp_path, "v1")  # as the trainer moves it, after writing the version
    assert subprocess.run(wait["command"], env=env, capture_output=True, timeout=5).returncode == 0


def test_every_pod_runs_unprivileged_with_a_read_only_root(resources):
    for owner, pod in pod_specs(resources):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, owner
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, owner
            assert sc["capabilities"]["drop"] == ["ALL"], owner
            assert "requests" in container["resources"] and "limits" in container["resources"], owner


def test_the_alert_rules_ship_as_a_configmap(resources):
    rules = one(resources, "ConfigMap", "recsys-alert-rules")
    assert yaml.safe_load(rules["data"]["recsys.rules.yml"]) == yaml.safe_load((ROOT / "deploy/k8s/alert-rules.yml").read_text())
