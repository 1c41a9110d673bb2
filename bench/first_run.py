"""The first `make run` on a fresh machine, timed: a new clone of this repository's HEAD, no venv, no pip
cache (PIP_NO_CACHE_DIR=1), an empty model store. Split as `make run` runs it: install (`make setup`, from the
lock) and start (`coordinator launch`: import the built-in model into the store, start the cluster, until it
prints "ready in"). A second launch on the same store shows the start without the import.

    python bench/first_run.py [--keep DIR]

No baseline: these are latencies of one command, not ratios; the machine's load and the registry's speed move
them (the install downloads every wheel of the lock, about 1 GB with torch's CPU wheel read from disk here).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_until_ready(checkout: Path, store: Path) -> tuple[float, str]:
    """Seconds from `coordinator launch` to its "ready in" line, and that line; the cluster is stopped after."""
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    began = time.perf_counter()
    process = subprocess.Popen([str(checkout / ".venv" / "bin" / "coordinator"), "launch", "--port", str(free_port()),
                                "--http-port", "0"], cwd=checkout, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert process.stdout is not None
    said: list[str] = []
    try:
        for line in process.stdout:
            said.append(line.rstrip())
            if line.startswith("ready in"):
                return time.perf_counter() - began, line.strip()
        raise RuntimeError("coordinator launch exited before ready:\n" + "\n".join(said[-15:]))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="clone here and keep it (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="shardline-first-run-"))
    checkout, store = work / "shardline", work / "store"
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                              text=True, check=True).stdout.strip()
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
        began = time.perf_counter()
        subprocess.run(["make", "setup"], cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        install = time.perf_counter() - began
        first, first_line = launch_until_ready(checkout, store)
        again, again_line = launch_until_ready(checkout, store)
        match = re.search(r"ready in ([\d.]+) s", first_line)
        print(f"commit {head}, Python {sys.version.split()[0]}, PIP_NO_CACHE_DIR=1, empty store")
        print(f"install (make setup, from the lock): {install:.1f} s")
        print(f"start (coordinator launch, model import included): {first:.1f} s  [{first_line}]")
        print(f"first make run to ready: {install + first:.1f} s")
        print(f"start again (model in the store): {again:.1f} s  [{again_line}]")
        if match is None:
            raise RuntimeError(f"no time in {first_line!r}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
