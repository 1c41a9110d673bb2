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
    forbidden = ("shardline.v1", "grpc", "coordinator.serving.chain", "coordinator.serving.pipeline",
                 "coordinator.serving.driver", "coordinator.fleet", "coordinator.api")
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


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (at any level, TYPE_CHECKING included)."""
    modules = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p
               for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in full_imports(path) if m in modules and m != name} for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", ["shardline", "coordinator", "shard_worker"])
def test_no_import_circles(package):
    """TYPE_CHECKING imports count: a circle of types is a circle of understanding."""
    found = circles(import_graph(package))
    assert not found, [sorted(c) for c in found]


# Which rooms of coordinator/ may import which (README "How it works"), floor by floor: store and transitions
# (how every state machine checks its moves) are the ground; then config; metrics; serving (the scheduler and a
# request's work on one replica); fleet (deployments, replicas, placement, and a request's way onto them); wire
# (protos <-> domain values); jobs; the edge (api); standby coordinators (ha); and the CLI on top.
ROOMS_MAY_IMPORT = {
    "store": set(),
    "transitions": set(),
    "config": {"store"},
    "metrics": set(),
    "serving": {"config", "metrics", "transitions"},
    "fleet": {"config", "metrics", "serving", "store", "transitions"},
    "jobs": {"config", "fleet", "serving", "wire"},
    "wire": {"config", "serving"},
    "api": {"config", "fleet", "jobs", "metrics", "serving", "store", "wire"},
    "ha": {"api", "config", "fleet", "serving", "store"},  # standby coordinators: etcd, the election, a leader
    "cli": {"api", "config", "fleet", "ha", "jobs", "store"},
}


def test_the_rooms_table_has_floors():
    """The table itself is acyclic: no room may import a room that may import it back."""
    assert not circles({room: set(allowed) for room, allowed in ROOMS_MAY_IMPORT.items()})


def test_coordinator_rooms_import_only_what_their_role_allows():
    wrong = []
    for path in (ROOT / "coordinator").rglob("*.py"):
        parts = path.relative_to(ROOT / "coordinator").with_suffix("").parts
        if parts == ("__init__",):
            continue
        room = parts[0]
        for name in full_imports(path):
            if not name.startswith("coordinator."):
                continue
            target = name.split(".")[1]
            if target != room and target not in ROOMS_MAY_IMPORT[room]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name} ({room} may import "
                             f"{sorted(ROOMS_MAY_IMPORT[room]) or 'nothing of coordinator'})")
    assert not wrong, "\n".join(wrong)
