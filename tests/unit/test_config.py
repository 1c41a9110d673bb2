from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_cluster_config_loads_and_flags_win():
    config = load_config(ROOT / "deploy" / "cluster.example.toml", port=6000)
    assert config.workers == 4 and config.advertise == "10.0.0.10" and config.parameters_port == 50052
    assert config.port == 6000


def test_unknown_or_bad_fields_are_refused(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('workers = 0\n')
    with pytest.raises(ValueError, match="workers"):
        load_config(bad)
    bad.write_text('wrokers = 3\n')
    with pytest.raises(ValueError, match="wrokers"):
        load_config(bad)
