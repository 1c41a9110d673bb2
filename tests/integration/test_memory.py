"""Slow: loading a >= 1.5 GB model over 4 worker processes keeps every process's memory bounded."""

from __future__ import annotations

import pytest

from bench.memory import measure, report


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_memory_stays_bounded_while_loading(tmp_path):
    rows = measure(tmp_path)
    assert all(r.ok for r in rows), report(rows)
