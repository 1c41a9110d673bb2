"""The checked-in generated code is what the protos generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_changes_nothing(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    checked_in = sorted(p.relative_to(ROOT) for d in ("v1", "kserve") for p in (ROOT / "shardline" / d).glob("*_pb2*"))
    assert generated == checked_in
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), f"{rel} is stale: run `make protos`"
