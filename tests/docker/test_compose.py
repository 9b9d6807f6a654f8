"""Docker files: the compose file against the Compose Specification schema, mounts, and the image's basics.

No Docker engine runs here; check-jsonschema validates against its vendored compose-spec schema.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


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
