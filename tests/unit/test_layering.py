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
