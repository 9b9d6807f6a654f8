"""Kubernetes manifests (deploy/kubernetes): rendered by kubectl's kustomize, validated against the API's schemas,
and held to the deployment policy: probes, non-root read-only pods, resources, autoscaling, disruption budget,
placeholder-only secrets, Prometheus annotations and rules.

No cluster runs here; kubectl only renders (scripts/system-deps installs it).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

import app.monitoring.metrics  # noqa: F401  (registers every metric in the default registry)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes"
# The Kubernetes version the objects must be valid for (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.32.0"
PLACEHOLDER = "REPLACE-ME"
WEB_LABELS = {"app.kubernetes.io/name": "sentiment", "app.kubernetes.io/component": "web"}
IMAGE_USER = 10001  # docker/Dockerfile: useradd --uid 10001
METRICS_DIR = "/srv/var/metrics"  # docker/Dockerfile: PROMETHEUS_MULTIPROC_DIR
STATE_DIR = "/srv/var"  # docker/Dockerfile: SENTIMENT_STATE_DIR
SECRETS_OF_THE_HTTP_SIDE = {"webhook_token", "admin_token", "feedback_token", "grafana_hmac_secret"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test installs it (scripts/system-deps)")
    return path


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(BASE)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(kind: str) -> list[dict[str, Any]]:
    return [o for o in rendered() if o["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects(kind) if o["metadata"]["name"] == name]
    return found


def pod_templates() -> Iterator[tuple[str, dict[str, Any]]]:
    """(object name, pod template) of every workload."""
    for obj in rendered():
        if obj["kind"] in {"Deployment", "Job"}:
            yield obj["metadata"]["name"], obj["spec"]["template"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def command(container: dict[str, Any]) -> str:
    return " ".join(container.get("command", []) + container.get("args", []))


def main_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return pod_spec["containers"][0]


def settings() -> dict[str, str]:
    (config,) = [c for c in objects("ConfigMap") if c["metadata"]["name"].startswith("sentiment-settings")]
    data: dict[str, str] = config["data"]
    return data


def prometheus_files() -> dict[str, str]:
    (config,) = [c for c in objects("ConfigMap") if c["metadata"]["name"].startswith("sentiment-prometheus")]
    data: dict[str, str] = config["data"]
    return data


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``640Mi``, ``1Gi``, ``256M``) as a number of cores or bytes."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, value
    return float(match.group(1)) * units[match.group(2)]


def test_kustomize_renders_every_object_the_service_needs() -> None:
    kinds = {(o["kind"], re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])) for o in rendered()}
    assert {
        ("Namespace", "sentiment"),
        ("Deployment", "sentiment-web"),
        ("Service", "sentiment"),
        ("HorizontalPodAutoscaler", "sentiment-web"),
        ("PodDisruptionBudget", "sentiment-web"),
        ("Deployment", "sentiment-monitor"),
        ("Deployment", "sentiment-retrain-worker"),
        ("Job", "sentiment-migrate"),
        ("ConfigMap", "sentiment-settings"),
        ("ConfigMap", "sentiment-prometheus"),
        ("Secret", "sentiment-secrets"),
    } <= kinds
    assert all(o["metadata"].get("namespace") == "sentiment" for o in rendered() if o["kind"] != "Namespace")


def test_every_object_is_valid_against_the_kubernetes_schema_in_strict_mode() -> None:
    """Strict: an unknown or misspelt field (``readinessprobe``) fails instead of being dropped by the API."""
    for obj in rendered():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_every_reference_to_a_config_map_or_secret_names_a_rendered_one() -> None:
    """kustomize appends a content hash to generated names; a reference it did not rewrite would dangle."""
    maps = {c["metadata"]["name"] for c in objects("ConfigMap")}
    secrets = {s["metadata"]["name"] for s in objects("Secret")}
    references = 0
    for name, template in pod_templates():
        for container in containers(template["spec"]):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, name
                references += 1
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, name
                    references += 1
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, name
                references += 1
    assert references >= 10


def test_web_pods_are_ready_on_readyz_and_live_on_healthz() -> None:
    pod = named("Deployment", "sentiment-web")["spec"]["template"]["spec"]
    web = main_container(pod)
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[web[probe]["httpGet"]["port"]] == 8000
    # Liveness must not kill a pod that is still loading and verifying its first model.
    startup = web["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_the_web_pods_run_gunicorn_alone_and_the_monitor_and_retrains_their_own_pods() -> None:
    web = command(main_container(named("Deployment", "sentiment-web")["spec"]["template"]["spec"]))
    assert "gunicorn -c app/gunicorn_conf.py 'app.main:create_app()'" in web
    assert "app.supervisor" not in web and "app.monitoring.monitor" not in web
    monitor = command(main_container(named("Deployment", "sentiment-monitor")["spec"]["template"]["spec"]))
    assert monitor.endswith("python -m app.monitoring.monitor")
    migrate = command(main_container(named("Job", "sentiment-migrate")["spec"]["template"]["spec"]))
    assert migrate.endswith("python -m app.cli db upgrade")
    assert named("Job", "sentiment-migrate")["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # Two monitors, one leader (app/monitoring/leader.py): a standby takes over when the leader's pod dies. They
    # serve their own /metrics on the annotated port, as no web service merges their files.
    monitor_deployment = named("Deployment", "sentiment-monitor")["spec"]
    assert monitor_deployment["replicas"] == 2
    monitor_pod = monitor_deployment["template"]
    env = {e["name"]: e.get("value") for e in main_container(monitor_pod["spec"])["env"]}
    assert env["SENTIMENT_MONITOR_METRICS_PORT"] == monitor_pod["metadata"]["annotations"]["prometheus.io/port"]
    assert env["SENTIMENT_MONITOR_METRICS_HOST"] == "0.0.0.0"


def test_web_pods_queue_retrains_and_the_worker_pods_run_them_and_serve_their_metrics() -> None:
    """SENTIMENT_RETRAIN_MODE=queue: a web pod never spawns a retrain; the worker Deployment runs
    app.retrain.worker with its own /metrics on the annotated port."""
    assert settings()["SENTIMENT_RETRAIN_MODE"] == "queue"
    worker_pod = named("Deployment", "sentiment-retrain-worker")["spec"]["template"]
    worker = main_container(worker_pod["spec"])
    assert command(worker).endswith("python -m app.retrain.worker")
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["SENTIMENT_RETRAIN_WORKER_METRICS_PORT"] == worker_pod["metadata"]["annotations"]["prometheus.io/port"]
    assert env["SENTIMENT_RETRAIN_WORKER_METRICS_HOST"] == "0.0.0.0"
    # The worker lets a retrain finish, then hands its job back, within the pod's grace period.
    assert float(env["SENTIMENT_RETRAIN_WORKER_STOP_SECONDS"]) < worker_pod["spec"]["terminationGracePeriodSeconds"]


def test_every_process_that_writes_metrics_starts_on_an_empty_metrics_directory() -> None:
    """An emptyDir outlives a container restart; the start command wipes it, as docker/entrypoint.sh does."""
    for name, template in pod_templates():
        first = main_container(template["spec"])
        if name != "sentiment-migrate":
            assert 'find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete &&' in command(first), name
        assert first["command"][:2] == ["/usr/bin/tini", "--"], name  # signals forwarded, orphans reaped


def test_every_pod_runs_as_the_image_user_without_privileges_on_a_read_only_root() -> None:
    for name, template in pod_templates():
        pod = template["spec"]
        pod_context = pod["securityContext"]
        assert pod_context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod_context["runAsUser"] == IMAGE_USER and pod_context["runAsGroup"] == IMAGE_USER, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(pod):
            context = {**pod_context, **container["securityContext"]}
            where = f"{name}/{container['name']}"
            assert context["runAsNonRoot"] is True, where
            assert context.get("runAsUser", IMAGE_USER) == IMAGE_USER, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert "privileged" not in context or context["privileged"] is False, where


def test_the_namespace_enforces_the_restricted_pod_security_standard() -> None:
    labels = named("Namespace", "sentiment")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_writable_paths_are_empty_dirs_in_every_long_running_pod() -> None:
    """/tmp, the state dir and the metrics dir are the only writes on a read-only root filesystem."""
    for name, template in pod_templates():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        main = main_container(pod)
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        wanted = ["/tmp"] if name == "sentiment-migrate" else ["/tmp", STATE_DIR, METRICS_DIR]
        for path in wanted:
            assert path in mounts, f"{name} does not mount {path}"
            assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} is not an emptyDir"
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                assert "emptyDir" in volume or mount.get("readOnly") is True, f"{name}: {mount['mountPath']}"


def test_every_container_requests_and_limits_cpu_and_memory() -> None:
    for name, template in pod_templates():
        for container in containers(template["spec"]):
            resources = container["resources"]
            where = f"{name}/{container['name']}"
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, where


def test_web_memory_holds_every_worker_at_its_benchmarked_rss() -> None:
    """docs/benchmarks.md's worker RSS times SENTIMENT_WORKERS, plus the master, fits in the request."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    (row,) = re.findall(r"^\| web-worker RSS after the load \| ([^|]+)\|", text, re.MULTILINE)
    rss_mb = max(int(mb) for mb in re.findall(r"(\d+) MB", row))
    workers = int(settings()["SENTIMENT_WORKERS"])
    web = main_container(named("Deployment", "sentiment-web")["spec"]["template"]["spec"])
    request = quantity(web["resources"]["requests"]["memory"])
    limit = quantity(web["resources"]["limits"]["memory"])
    assert request >= workers * rss_mb * 1e6 + 64 * 2**20
    assert limit >= request * 1.5  # a model swap holds two models in a worker for a moment
    assert quantity(web["resources"]["requests"]["cpu"]) >= workers / 2


def test_the_autoscaler_scales_the_web_deployment_on_cpu() -> None:
    (hpa,) = objects("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "sentiment-web")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # The autoscaler owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in named("Deployment", "sentiment-web")["spec"]


def test_the_disruption_budget_and_the_service_select_the_web_pods_and_nothing_else() -> None:
    web = named("Deployment", "sentiment-web")["spec"]
    assert web["selector"]["matchLabels"] == WEB_LABELS
    assert WEB_LABELS.items() <= web["template"]["metadata"]["labels"].items()
    (pdb,) = objects("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == {"matchLabels": WEB_LABELS}
    (hpa,) = objects("HorizontalPodAutoscaler")
    # Drains never take every web pod at once.
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    (service,) = objects("Service")
    assert service["spec"]["selector"] == WEB_LABELS
    for name, template in pod_templates():
        labels = template["metadata"]["labels"]
        selected = WEB_LABELS.items() <= labels.items()
        assert selected == (name == "sentiment-web"), name


def test_every_secret_value_is_a_placeholder() -> None:
    """Real secrets come from an overlay or a secret operator, never from this repository."""
    (secret,) = objects("Secret")
    assert "stringData" not in secret
    values = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert {"webhook_token", "admin_token", "feedback_token", "grafana_hmac_secret", "database_url"} <= values.keys()
    assert {"aws_access_key_id", "aws_secret_access_key"} <= values.keys()
    for key, value in values.items():
        assert PLACEHOLDER in value, f"Secret key {key} holds something other than a placeholder"
    for config in objects("ConfigMap"):
        for key in config["data"]:
            assert not re.search(r"TOKEN$|SECRET|PASSWORD|ACCESS_KEY|DATABASE_URL", key), f"{key} belongs in the Secret"


def test_only_the_web_pods_see_the_http_side_credentials() -> None:
    """The monitor, the retrain worker and the migration get the database and store credentials alone (as a
    retrain process does today: app/retrain/launcher.py JOB_SETTINGS)."""
    for name, template in pod_templates():
        keys = set()
        for container in containers(template["spec"]):
            keys |= {e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", []) if "valueFrom" in e}
        for volume in template["spec"]["volumes"]:
            if "secret" in volume:
                keys |= {item["key"] for item in volume["secret"]["items"]}
        assert "database_url" in keys, name
        assert (keys & SECRETS_OF_THE_HTTP_SIDE == SECRETS_OF_THE_HTTP_SIDE) == (name == "sentiment-web"), name
        assert name == "sentiment-web" or not keys & SECRETS_OF_THE_HTTP_SIDE, name


def test_every_long_running_pod_is_annotated_for_prometheus_on_a_port_it_serves() -> None:
    for obj in objects("Deployment"):
        template = obj["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        name = obj["metadata"]["name"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == "/metrics", name
        ports = {p["containerPort"] for c in containers(template["spec"]) for p in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, name
        # The metrics server mounts the directory the pod's processes write.
        mounts = {
            m["mountPath"]
            for c in containers(template["spec"])
            if any(p["containerPort"] == int(annotations["prometheus.io/port"]) for p in c.get("ports", []))
            for m in c["volumeMounts"]
        }
        assert METRICS_DIR in mounts, name


def test_the_scrape_job_keeps_annotated_pods_and_reads_their_port_and_path() -> None:
    config = yaml.safe_load(prometheus_files()["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "sentiment"  # the rules read job="sentiment"
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["sentiment"]
    relabel = job["relabel_configs"]
    keep = [r for r in relabel if r.get("action") == "keep"]
    assert {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "regex": "true",
        "action": "keep",
    } in keep
    targets = {r["target_label"]: r["source_labels"] for r in relabel if "target_label" in r}
    assert "__meta_kubernetes_pod_annotation_prometheus_io_port" in targets["__address__"]
    assert targets["__metrics_path__"] == ["__meta_kubernetes_pod_annotation_prometheus_io_path"]
    assert {"pod", "component", "namespace"} <= targets.keys()


def test_the_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    """Debian's promtool has no Kubernetes discovery: the scrape job is checked with static targets instead."""
    files = prometheus_files()
    config = yaml.safe_load(files["prometheus.yml"])
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "sentiment.rules.yml").write_text(files["sentiment.rules.yml"])
    result = subprocess.run(
        [tool("promtool"), "check", "config", "prometheus.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "15 rules found" in result.stdout


def test_the_rules_unit_tests_pass_with_series_labelled_per_pod() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "sentiment.rules.test.yml"],
        capture_output=True,
        text=True,
        cwd=BASE / "prometheus",
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_rules_are_the_repository_alerts_aggregated_over_pods() -> None:
    """Same alerts, severities, 'for' and annotations as prometheus/rules; only expressions differ, and none
    groups or matches by instance (every pod is its own instance)."""
    ours = yaml.safe_load(prometheus_files()["sentiment.rules.yml"])
    theirs = yaml.safe_load((REPO / "prometheus" / "rules" / "sentiment.rules.yml").read_text())

    def alerts(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
        found = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
        return {name: {k: v for k, v in rule.items() if k != "expr"} for name, rule in found.items()}

    assert alerts(ours) == alerts(theirs)
    for group in ours["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert", rule.get("record"))
            assert not re.search(r"\b(by|on)\s*\([^)]*\binstance\b", rule["expr"]), name
    # Tested by promtool: every alert whose expression differs has a case in sentiment.rules.test.yml.
    exprs = {r["alert"]: r["expr"] for g in ours["groups"] for r in g["rules"] if "alert" in r}
    original = {r["alert"]: r["expr"] for g in theirs["groups"] for r in g["rules"] if "alert" in r}
    changed = {name for name in exprs if exprs[name].strip() != original[name].strip()}
    tests = yaml.safe_load((BASE / "prometheus" / "sentiment.rules.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert changed and changed <= tested, changed - tested


def test_every_metric_the_kubernetes_rules_read_is_declared_in_the_metrics_module() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    declared = set()
    for family in REGISTRY.collect():
        declared |= {family.name + suffix for suffix in suffixes.get(family.type, ())}
    rules = yaml.safe_load(prometheus_files()["sentiment.rules.yml"])
    read = {
        name
        for group in rules["groups"]
        for rule in group["rules"]
        for text in (rule["expr"], *rule.get("annotations", {}).values())
        for name in re.findall(r"(?<![:\w])sentiment_[a-z_]*[a-z]\b", text)
    }
    assert read <= declared, read - declared
