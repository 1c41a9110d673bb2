"""The lock check `make setup` runs first: a current lock passes; one out of date, missing, or made for
another Python is refused in one line naming the command that fixes it, before anything is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = ("pyproject.toml", "requirements.in", "requirements-models.in", "requirements.lock",
         "requirements-models.lock", "scripts/lock.py")


@pytest.fixture()
def checkout(tmp_path):
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(root / "scripts" / "lock.py"), "check"], capture_output=True,
                          text=True, timeout=60)


def test_the_committed_lock_is_current():
    result = check(ROOT)
    assert result.returncode == 0, result.stderr


def test_the_lock_pins_every_package_with_hashes_and_holds_the_tested_transformers():
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith((" ", "#"))]
    assert len(pins) > 50
    for pin in pins:
        assert "==" in pin and pin.endswith("\\"), f"{pin!r} is not pinned with hashes"
    assert any(p.startswith("transformers==5.25.") for p in pins)
    assert any(p.startswith("torch==2.13.0") for p in pins)


@pytest.mark.parametrize("edit", [
    lambda root: (root / "pyproject.toml").write_text(
        (root / "pyproject.toml").read_text().replace('"tqdm>=4.66"', '"tqdm>=4.67"')),
    lambda root: (root / "requirements.in").write_text((root / "requirements.in").read_text() + "rich\n"),
], ids=["pyproject-changed", "requirements-in-changed"])
def test_a_lock_out_of_date_is_refused_in_one_line(checkout, edit):
    edit(checkout)
    result = check(checkout)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "make setup: requirements.lock is out of date with pyproject.toml or requirements*.in: run `make lock`"]


def test_a_missing_lock_is_refused_naming_the_fix(checkout):
    (checkout / "requirements.lock").unlink()
    result = check(checkout)
    assert result.returncode == 2
    assert "requirements.lock is missing: run `make lock`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_lock_for_another_python_is_refused_naming_the_python(checkout):
    lock = checkout / "requirements.lock"
    lock.write_text(lock.read_text().replace("python=3.11", "python=3.99", 1))
    result = check(checkout)
    assert result.returncode == 2
    assert f"requirements.lock is for Python 3.99, this is Python {sys.version_info[0]}.{sys.version_info[1]}" \
        in result.stderr
    assert "make setup PYTHON=python3.99" in result.stderr
