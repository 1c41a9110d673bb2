"""`coordinator launch --metrics-port P --spares N` (issue 34.9): the coordinator's page on P, the serving
workers' on P+1 .. P+stages, the spares' after them, as the README's static scrape config assumes. The spares
are started once the planned workers have registered, so the plan never takes one of them."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def free_run(count: int) -> int:
    """A port P with P .. P+count-1 all free now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise AssertionError("no run of free ports")


def test_the_serving_workers_take_the_first_metrics_ports_and_the_spares_the_ones_after(store):
    base = free_run(5)
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "launch", "--model", "tiny-llama", "--store",
                           str(store.root), "--workers", "3", "--spares", "1", "--port", str(free_run(1)),
                           "--http-port", "0", "--metrics-port", str(base), "--exit-when-ready"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"metrics: coordinator http://127.0.0.1:{base}/metrics" in done.stdout
    workers = re.findall(r"metrics: worker \S+ \((.*?)\) http://127\.0\.0\.1:(\d+)/metrics", done.stdout)
    serving = sorted(int(port) for what, port in workers if what != "spare")
    spares = [int(port) for what, port in workers if what == "spare"]
    assert serving == [base + 1, base + 2, base + 3], done.stdout
    assert spares == [base + 4], done.stdout
    assert re.search(r"ready in [\d.]+ s: 3 workers serving tiny-llama@1 .*, and 1 spare\b", done.stdout), done.stdout
