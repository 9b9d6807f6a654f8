"""Docker files: the compose file against the Compose Specification schema, mounts, what is published, the
build context, and the image's basics.

No Docker engine runs here; check-jsonschema validates against its vendored compose-spec schema.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent


def host_ips(port: str | int | dict[str, Any]) -> str:
    """The host address a compose port mapping binds to ("" for every interface)."""
    if isinstance(port, dict):  # long syntax
        return str(port.get("host_ip", ""))
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else ""


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(DOCKER / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_mounted_path_exists_in_the_repository() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    sources = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                sources.append((name, source))
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert len(sources) >= 5
    for name, source in sources:
        assert (DOCKER / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_drift_reaches_the_webhook_through_alertmanager_and_grafana() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert {"sentiment", "prometheus", "alertmanager", "grafana"} <= compose["services"].keys()
    service_env = compose["services"]["sentiment"]["environment"]
    grafana_env = compose["services"]["grafana"]["environment"]
    # The service and Grafana share the HMAC secret and the timestamp header Grafana's contact point sends.
    assert service_env["SENTIMENT_GRAFANA_HMAC_SECRET"] == grafana_env["SENTIMENT_GRAFANA_HMAC_SECRET"]
    assert service_env["SENTIMENT_GRAFANA_TIMESTAMP_HEADER"] == "X-Grafana-Alerting-Timestamp"
    # Alertmanager reads the bearer token from the same compose secret the service reads.
    assert "webhook_token" in compose["services"]["alertmanager"]["secrets"]
    assert service_env["SENTIMENT_WEBHOOK_TOKEN_FILE"] == "/run/secrets/webhook_token"
    alertmanager = yaml.safe_load((DOCKER.parent / "prometheus" / "alertmanager.yml").read_text())
    hook = alertmanager["receivers"][1]["webhook_configs"][0]
    assert hook["http_config"]["authorization"]["credentials_file"] == "/run/secrets/webhook_token"
    assert hook["url"].startswith("http://sentiment:8000/")


def test_dockerfile_is_multi_stage_slim_non_root_with_a_readiness_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) >= 2 and all(s.endswith("-slim") for s in stages)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.MULTILINE)
    assert "download.pytorch.org/whl/cpu" in text  # CPU torch, never the CUDA build
    assert (DOCKER / "entrypoint.sh").stat().st_mode & 0o111


def test_only_the_service_and_grafana_are_published() -> None:
    """Alertmanager forwards any alert posted to it with the webhook token: it must not be reachable from outside."""
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert services["sentiment"]["ports"] and services["grafana"]["ports"]
    assert "ports" not in services["alertmanager"]
    for name in ("prometheus", "alertmanager"):
        for port in services[name].get("ports", []):
            assert host_ips(port) == "127.0.0.1", f"{name} publishes {port} beyond the host's loopback"
    assert {n for n, s in services.items() if any(host_ips(p) != "127.0.0.1" for p in s.get("ports", []))} == {
        "sentiment",
        "grafana",
    }


def test_dockerignore_keeps_state_secrets_model_versions_caches_and_history_out() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {"var/", "**/secrets", ".env", "model_store/*", ".venv", "**/__pycache__", ".git"} <= set(patterns)
    assert {".mypy_cache", ".ruff_cache", ".pytest_cache"} <= set(patterns)
    # Nothing the image copies is ignored (no exception patterns needed).
    assert not [p for p in patterns if p.startswith("!")]
    copied = re.findall(r"^COPY (?!--from)(\S+)", (DOCKER / "Dockerfile").read_text(), re.MULTILINE)
    assert {"app", "data", "docker/entrypoint.sh", "requirements.txt"} <= set(copied)
    for source in copied:
        prefixes = [str(Path(*Path(source).parts[: i + 1])) for i in range(len(Path(source).parts))]
        for pattern in patterns:
            bare = pattern.rstrip("/").removeprefix("**/")
            assert not any(fnmatch.fnmatch(prefix, bare) for prefix in prefixes), f"{pattern} hides {source}"


def test_the_image_runs_under_an_init_that_forwards_signals_and_reaps() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"apt-get install .*\btini\b", text)
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)
    assert json.loads(entrypoint) == ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
    # One init is enough: compose's own (init: true) would run tini under docker-init.
    assert not yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["sentiment"].get("init")
