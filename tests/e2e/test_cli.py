"""The CLI as a user runs it: real processes, real ports on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e


def cli(*args, store, timeout=300):
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_import_refuses_a_corrupt_file_and_keeps_the_store_clean(tmp_path):
    store = tmp_path / "store"
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    result = cli("import", str(bad), "--name", "broken", store=store)
    assert result.returncode == 1
    assert "config.json: not a valid llama config" in result.stderr and "Traceback" not in result.stderr
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}')
    (bad / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all}")
    result = cli("import", str(bad), "--name", "broken", store=store)
    assert result.returncode == 1
    assert "model.safetensors" in result.stderr and "corrupt" in result.stderr
    assert not store.exists() or not any(store.iterdir())
    result = cli("import", str(tmp_path / "nothing.bin"), "--name", "x", store=store)
    assert result.returncode == 1 and "nothing.bin" in result.stderr


def test_launch_serves_then_sigterm_leaves_no_child(tmp_path):
    store = tmp_path / "store"
    made = cli("import", "--random", "llama", "--hidden", "64", "--layers", "4", "--vocab", "128",
               "--name", "tiny", store=store)
    assert made.returncode == 0, made.stderr
    assert "4 layers" in made.stdout
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    from tests.e2e.test_join_and_generate import free_port

    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--model", "tiny",
                                 "--workers", "2", "--port", str(free_port())], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            lines.append(line)
            if "serving; Ctrl-C to stop" in line or not line:
                break
        text = "".join(lines)
        assert "serving; Ctrl-C to stop" in text, text
        assert "[0, 2)" in text and "[2, 4)" in text and "ready in" in text
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) == 2
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
