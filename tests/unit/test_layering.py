"""coordinator and shard_worker speak only protos: neither imports the other; shardline never imports torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("coordinator", {"shard_worker"}),
    ("shard_worker", {"coordinator"}),
    ("shardline", {"coordinator", "shard_worker", "torch", "transformers"}),
])
def test_packages_do_not_import_each_other(package, forbidden):
    offenders = {path: names & forbidden for path, names in imported_modules(package).items() if names & forbidden}
    assert not offenders, offenders


def test_no_pickle_on_any_load_path():
    for package in ("shardline", "coordinator", "shard_worker"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "torch.load(" not in text, path


def full_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ["coordinator/serving/policy.py", "coordinator/serving/streams.py"])
def test_the_scheduler_policy_holds_no_wire_type_and_does_no_io(module):
    """The policy decides; the driver (coordinator/serving/driver.py) alone converts to protos and talks to
    the chain."""
    forbidden = ("shardline.v1", "grpc", "coordinator.chain", "coordinator.pipeline", "coordinator.serving.driver",
                 "coordinator.fleet", "coordinator.replica")
    imports = full_imports(ROOT / module)
    offenders = {name for name in imports if name.startswith(forbidden)}
    assert not offenders, f"{module} imports {sorted(offenders)}"
    source = (ROOT / module).read_text()
    assert "await " not in source and "async def" not in source, f"{module} awaits"


def test_only_the_transformers_adapter_imports_transformers_internals():
    """Everything relying on transformers' internals goes through shard_worker/transformers_adapter.py (its
    contract tests name what changed); other modules may use its public loading API only."""
    offenders = {}
    for path in (ROOT / "shard_worker").rglob("*.py"):
        if path.name == "transformers_adapter.py":
            continue
        internal = {n for n in full_imports(path) if n.startswith("transformers.")
                    or n == "transformers" and "AttentionInterface" in path.read_text()}
        if internal:
            offenders[str(path.relative_to(ROOT))] = internal
    assert not offenders, offenders
