"""`coordinator launch --standby` as an operator tries it (issue 29.6): etcd, two coordinators and the workers on
one machine. The leader's pid is printed; SIGKILL it and the SDK (given both addresses) and the HTTP gateway
carry on with the other, the launcher starts the dead one again (it stands by), and SIGTERM stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from shardline.client import Client
from tests.e2e.test_join_and_generate import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.slow]


def two_free_ports() -> int:
    while True:
        port = free_port()
        if port < 65535 and subprocess.run([sys.executable, "-c", f"import socket; socket.socket().bind(('127.0.0.1', "
                                            f"{port + 1}))"], capture_output=True).returncode == 0:
            return port


def wait_for(out: list[str], pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(out):
            if found := re.search(pattern, line):
                return found
        time.sleep(0.1)
    raise AssertionError(f"the launcher never said {pattern!r}; it said:\n{''.join(out)}")


def test_launch_standby_survives_a_sigkill_of_its_leader(store):
    port = two_free_ports()
    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--standby", "--model",
                                 "tiny-llama", "--store", str(store.root), "--workers", "2", "--port", str(port),
                                 "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # a group of its own: Ctrl-C below is the terminal's
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(launcher.stdout.readline, "")), daemon=True).start()
    children: list[psutil.Process] = []
    try:
        wait_for(out, "serving; Ctrl-C to stop", 180)
        leader_pid = int(wait_for(out, r"then kill (\d+) \(the leader\)", 1).group(1))
        http = wait_for(out, r"OpenAI-compatible HTTP API on (\S+), in front of both", 1).group(1)
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert leader_pid in {c.pid for c in children}
        endpoint = f"127.0.0.1:{port},127.0.0.1:{port + 1}"
        prompt = [5, 9, 17, 33]
        with Client(endpoint, timeout=30) as client:
            before = client.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True).token_ids
            os.kill(leader_pid, signal.SIGKILL)
            client.wait_ready(timeout=60)
            after = client.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True).token_ids
        assert after == before and len(after) == 8
        wait_for(out, r"coordinator \d exited with code -9; starting it again \(it stands by\)", 30)
        assert httpx.get(f"{http}/models", timeout=30).status_code == 200  # the gateway follows the new leader
        children = psutil.Process(launcher.pid).children(recursive=True)
    finally:
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in its terminal: the whole foreground group
        try:
            code = launcher.wait(90)
        except subprocess.TimeoutExpired:
            launcher.kill()
            raise
    assert code == 0, "".join(out)
    assert not any("etcd" in line and "Unavailable" in line for line in out), "etcd went first"
    time.sleep(0.5)
    assert not [c.pid for c in children if running(c)], "children left running"


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
