"""docs/configuration.md is generated from the settings, docs/operations.md names every log event the code emits,
and the corpora in data/ are the ones its README describes."""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from app.settings import REFERENCE_COMMAND, Settings, settings_reference_markdown

REPO = Path(__file__).resolve().parents[1]
LOG_LEVELS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
INDIRECT_EVENTS = {
    # Log calls whose event is an attribute set from a constructor argument, with every value it is given.
    ("app/supervisor.py", "self.spawned_event"): {"supervised_process_spawned", "drift_monitor_spawned"},
    ("app/supervisor.py", "self.exited_event"): {"supervised_process_exited", "drift_monitor_exited"},
}


def test_configuration_reference_is_generated_from_the_settings() -> None:
    """docs/configuration.md is exactly what the Settings field descriptions render, on any machine."""
    generated = settings_reference_markdown()
    assert str(REPO) not in generated, "a default renders as an absolute path of this checkout"
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == generated, f"docs/configuration.md is stale: run scripts/docs ({REFERENCE_COMMAND})"


def test_every_setting_has_a_description_in_the_reference() -> None:
    """Each setting appears in the reference with a description, so the generated table is complete."""
    generated = settings_reference_markdown()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description="
        assert f"| `SENTIMENT_{name.upper()}` |" in generated, name


def _event_names(expr: ast.expr, scope: ast.AST) -> set[str] | None:
    """The event names an expression can take: a string, either branch of a conditional, or a local variable
    assigned only such expressions in the enclosing function. None when it cannot be read statically."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.IfExp):
        body, orelse = _event_names(expr.body, scope), _event_names(expr.orelse, scope)
        return None if body is None or orelse is None else body | orelse
    if isinstance(expr, ast.Name):
        values = [
            node.value
            for node in ast.walk(scope)
            if isinstance(node, ast.Assign)
            and any(isinstance(target, ast.Name) and target.id == expr.id for target in node.targets)
        ]
        names = [_event_names(value, scope) for value in values]
        if not names or any(name is None for name in names):
            return None
        return set().union(*(name for name in names if name is not None))
    return None


def _log_calls(tree: ast.Module) -> Iterator[tuple[ast.Call, ast.AST]]:
    """Every ``<logger>.<level>(...)`` call on a module's ``structlog.get_logger`` loggers, with its enclosing
    function (or the module)."""
    loggers = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "get_logger"
        and isinstance(node.value.func.value, ast.Name)
        and node.value.func.value.id == "structlog"
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def visit(node: ast.AST, scope: ast.AST) -> Iterator[tuple[ast.Call, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else scope
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in LOG_LEVELS
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id in loggers
            ):
                yield child, scope
            yield from visit(child, inner)

    return visit(tree, tree)


def emitted_log_events() -> tuple[dict[str, list[str]], list[str]]:
    """Event name -> where app/ emits it; and the log calls whose event could not be read."""
    events: dict[str, list[str]] = {}
    unreadable: list[str] = []
    for path in sorted((REPO / "app").rglob("*.py")):
        module = path.relative_to(REPO).as_posix()
        for call, scope in _log_calls(ast.parse(path.read_text(), str(path))):
            where = f"{module}:{call.lineno}"
            if not call.args:
                unreadable.append(f"{where}: no event")
                continue
            names = _event_names(call.args[0], scope)
            if names is None:
                names = INDIRECT_EVENTS.get((module, ast.unparse(call.args[0])))
            if names is None:
                unreadable.append(f"{where}: {ast.unparse(call.args[0])}")
                continue
            for name in names:
                events.setdefault(name, []).append(where)
    return events, unreadable


def test_operations_guide_names_every_log_event() -> None:
    """Every structlog event app/ emits is named, in backticks, in docs/operations.md (its Logs table)."""
    events, unreadable = emitted_log_events()
    assert not unreadable, f"log calls whose event name cannot be read (add them to INDIRECT_EVENTS): {unreadable}"
    assert {"model_swapped", "drift_detected", "retrain_failed"} <= events.keys(), "the extraction finds nothing"
    for (module, _), names in INDIRECT_EVENTS.items():
        source = (REPO / module).read_text()
        assert all(f'"{name}"' in source for name in names), f"INDIRECT_EVENTS is stale for {module}: {names}"
    documented = (REPO / "docs" / "operations.md").read_text()
    missing = {name: where for name, where in sorted(events.items()) if f"`{name}`" not in documented}
    assert not missing, "log events missing from docs/operations.md:\n" + "\n".join(
        f"  {name} ({', '.join(where)})" for name, where in missing.items()
    )


def test_corpora_match_their_recorded_sha256() -> None:
    listed = dict(re.findall(r"^- (\S+) `([0-9a-f]{64})`$", (REPO / "data" / "README.md").read_text(), re.M))
    assert len(listed) == 3
    for name, digest in listed.items():
        assert hashlib.sha256((REPO / "data" / name).read_bytes()).hexdigest() == digest, name
