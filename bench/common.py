"""Shared by the benchmarks: processes on loopback and timing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_process(args: list[str], prefix: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start `python -m ARGS` and wait for its 'PREFIX HOST:PORT' line; returns the process and address."""
    process = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, **(env or {})})
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return process, line.strip().removeprefix(prefix)
    process.kill()
    raise RuntimeError(f"{args} did not start")


def peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def stop(processes: list[subprocess.Popen[str]]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
