"""Run schemathesis's own engine (its ``st run`` command) against a live service and read its NDJSON report.

The command line is schemathesis's stable interface: it runs every phase (schema examples, coverage
of boundaries and unexpected methods, random fuzzing, stateful sequences over the inferred links) with
one seed, and its NDJSON report records every case it sent, every check and every response.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Response checks from the brief: no 5xx, a documented status code, the documented content type and a
# body matching the documented schema; plus undocumented methods answered 405 (the coverage phase sends them).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "unsupported_method",
)

# Fuzzing-dictionary strings mixed into every generated string (path parameters and JSON bodies alike),
# for the inputs random generation hardly draws: NUL, a name longer than a file name may be, a path escape.
HOSTILE_STRINGS = ("a\x00b", "v" * 300, "../CURRENT.json", "%00", "\u202e", " " * 5)


@dataclass
class Failure:
    """One failed check on one case, with what it takes to reproduce it."""

    operation: str
    check: str
    phase: str
    request: str
    status: int | None
    response: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.operation}: {self.check} failed in the {self.phase} phase: {self.message}\n"
            f"    request:  {self.request}\n    response: {self.status} {self.response}"
        )


@dataclass
class FuzzRun:
    """What one schemathesis run did: cases sent per operation, statuses seen per operation, failures."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def total(self) -> int:
        return sum(self.cases.values())


def write_config(
    path: Path,
    *,
    seed: int,
    max_examples: int,
    headers_by_path: dict[str, dict[str, str]] | None = None,
) -> Path:
    """A ``schemathesis.toml``: fixed seed and case count, no example database (nothing carried between
    runs), NUL bytes allowed, the hostile dictionary, the checks above and per-path credentials."""
    lines = [
        f"seed = {seed}",
        "workers = 1",
        "request-timeout = 30",
        "[generation]",
        f"max-examples = {max_examples}",
        'database = "none"',
        "allow-x00 = true",
        "[generation.dictionaries.string]",
        'dictionary = "hostile"',
        "probability = 0.05",
        "[dictionaries.hostile]",
        f"values = {json.dumps(list(HOSTILE_STRINGS))}",
        "[checks]",
        "enabled = false",
        *(f"{check}.enabled = true" for check in CHECKS),
    ]
    for regex, headers in (headers_by_path or {}).items():
        lines += ["[[operations]]", f"include-path-regex = {json.dumps(regex)}", "[operations.headers]"]
        lines += [f"{json.dumps(name)} = {json.dumps(value)}" for name, value in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_schemathesis(
    schema_url: str, config: Path, report: Path, *extra: str, timeout: float = 240
) -> tuple[FuzzRun, subprocess.CompletedProcess[str]]:
    """Run ``st run`` once and parse its NDJSON report (exit code 1 means failures: parsed, not raised)."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        schema_url,
        "--no-color",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
        *extra,
    ]
    # cwd: schemathesis keeps a cache folder (.schemathesis/) in its working directory, not in the checkout.
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd=config.parent)
    if not report.exists():
        raise RuntimeError(f"schemathesis wrote no report (exit {completed.returncode}):\n{completed.stdout[-4000:]}")
    return parse_report(report), completed


def _request_line(interaction: dict[str, Any]) -> str:
    request = interaction.get("request", {})
    body = request.get("body")
    text = ""
    if isinstance(body, dict) and "$base64" in body:
        raw = base64.b64decode(body["$base64"])
        text = " body=" + repr(raw[:300]) + ("..." if len(raw) > 300 else "")
    return f"{request.get('method')} {request.get('uri', '')[:400]}{text}"


def _response_line(interaction: dict[str, Any]) -> tuple[int | None, str]:
    response = interaction.get("response") or {}
    content = response.get("content")
    text = ""
    if isinstance(content, dict) and "$base64" in content:
        text = base64.b64decode(content["$base64"]).decode(errors="replace")[:300]
    return response.get("status_code"), text


def parse_report(report: Path) -> FuzzRun:
    """Count every case that reached the server, by operation, and collect every failed check."""
    run = FuzzRun()
    seen: set[tuple[str, str]] = set()
    for line in report.read_text().splitlines():
        event = json.loads(line)
        (kind, data), *_ = event.items()
        if kind == "Initialize":
            run.seed = data.get("seed")
        elif kind in {"NonFatalError", "FatalError"}:
            run.errors.append(json.dumps(data)[:1000])
        elif kind == "ScenarioFinished":
            recorder = data["recorder"]
            interactions = recorder.get("interactions", {})
            for case_id, case in recorder.get("cases", {}).items():
                value = case["value"]
                operation = f"{value['method'].upper()} {value['path']}"
                interaction = interactions.get(case_id)
                if interaction is None or (operation, case_id) in seen:
                    continue
                seen.add((operation, case_id))
                run.cases[operation] += 1
                status, body = _response_line(interaction)
                if status is not None:
                    run.statuses.setdefault(operation, Counter())[status] += 1
                for check in recorder.get("checks", {}).get(case_id, []):
                    if check["status"] == "failure":
                        failure = (check.get("failure_info") or {}).get("failure") or {}
                        run.failures.append(
                            Failure(
                                operation=operation,
                                check=check["name"],
                                phase=data.get("phase", "?"),
                                request=_request_line(interaction),
                                status=status,
                                response=body,
                                message=f"{failure.get('code')} {failure.get('title')}: {failure.get('message')}"[:500],
                            )
                        )
    return run
