"""The CLI as a user runs it: real processes, real ports on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
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
        # the OpenAI-compatible HTTP API serves beside it (on a free port: SHARDLINE_HTTP_PORT=0 in conftest)
        http = re.search(r"OpenAI-compatible HTTP API on (http://\S+/v1)", text).group(1)
        assert [m["id"] for m in httpx.get(f"{http}/models", timeout=30).json()["data"]] == ["tiny"]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        with pytest.raises(httpx.ConnectError):  # and its port is free again
            httpx.get(f"{http}/models", timeout=5)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_busy_port_is_one_line_before_anything_starts(tmp_path):
    import socket

    from tests.e2e.test_join_and_generate import free_port

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        for command in (["launch", "--model", "anything", "--workers", "1"], ["serve", "--model", "anything"]):
            result = cli(*command, "--port", str(port), store=tmp_path / "store", timeout=60)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 1 and 1 <= len(lines) <= 3, result.stderr
            assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0]
            assert "Traceback" not in result.stderr and "worker" not in result.stdout


def test_a_damaged_fleet_state_is_one_line_naming_the_file_and_nothing_starts(tmp_path, store):
    from coordinator.config import load_config
    from coordinator.fleet.durable import configuration_digest
    from tests.e2e.test_join_and_generate import free_port

    config = tmp_path / "coordinator.toml"
    config.write_text(f'store = "{store.root}"\nport = {free_port()}\nmodel = "tiny-llama"\nworkers = 1\n'
                      f'jobs_dir = "{tmp_path}"\nhttp = false\n')
    state = tmp_path / f"fleet-{configuration_digest(load_config(config).initial_deployments())}.sqlite"
    state.write_bytes(b"not a database" * 100)
    result = cli("serve", "--config", str(config), store=store.root, timeout=60)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: the fleet state {state} is not a fleet state") and "move it away" in errors[0]
    assert "listening" not in result.stdout


def test_a_client_command_without_a_cluster_says_so_in_one_line(tmp_path):
    from tests.e2e.test_join_and_generate import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    for command in (["generate", "hello", "--endpoint", endpoint], ["status", "--endpoint", endpoint]):
        result = cli(*command, store=tmp_path, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"no shardline cluster answers at {endpoint}" in result.stderr and "launch" in result.stderr
    bad = cli("generate", "hello", "--endpoint", "50081", store=tmp_path, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --endpoint must be HOST:PORT (standby")
    assert bad.stderr.endswith("got '50081'\n")


@pytest.mark.chaos  # stops a cluster on purpose: in the default suite after passing 20 runs in a row
def test_a_cluster_that_stops_mid_request_is_one_line(tmp_path, smollm2_store):
    from coordinator.store.importer import import_random, random_config
    from coordinator.store.models import ModelStore
    from tests.e2e.test_join_and_generate import free_port

    store = ModelStore(tmp_path / "store")
    import_random(store, "tok", random_config("llama", hidden=64, layers=2, vocab=49152, positions=4096),
                  tokenizer_dir=smollm2_store.path("smollm2"))
    port = free_port()
    env = {**os.environ, "SHARDLINE_STORE": str(store.root)}
    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--model", "tok", "--workers",
                                 "1", "--port", str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        while "serving; Ctrl-C to stop" not in (line := launcher.stdout.readline()):
            assert line, "the launcher exited"
        generate = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "generate", "hello", "--endpoint",
                                     f"127.0.0.1:{port}", "--max-tokens", "2000", "--ignore-eos"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert generate.stdout.read(64)  # text is streaming
        launcher.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)  # again: stop now, mid-request
        _, err = generate.communicate(timeout=60)
        assert generate.returncode == 1 and err.count("\n") == 1, err
        assert f"the cluster at 127.0.0.1:{port} stopped while answering" in err
    finally:
        launcher.kill()
        launcher.wait(30)


def test_import_overwrite_of_a_model_a_running_coordinator_serves_is_refused(tmp_path):
    """Issue 27.5: served weights never change under a running deployment. The coordinator runs in this
    process (its lock is what a separate `coordinator import` meets); the import is a real CLI process."""
    from coordinator.api.server import start_coordinator
    from coordinator.config import CoordinatorConfig
    from coordinator.store.importer import import_random, random_config
    from coordinator.store.models import ModelStore
    from tests.helpers import LoopThread

    store = tmp_path / "store"
    models = ModelStore(store)
    for name in ("served", "idle"):
        import_random(models, name, random_config("llama", hidden=64, layers=2, vocab=256))
    before = models.manifest("served").digest
    loop = LoopThread()
    coordinator = loop.run(start_coordinator(CoordinatorConfig(store=store, model="served", workers=1, port=0,
                                                               http=False, durable_fleet=False)))
    try:
        new = ("import", "--random", "llama", "--hidden", "64", "--layers", "2", "--seed", "7", "--overwrite")
        refused = cli(*new, "--name", "served", store=store)
        assert refused.returncode == 1 and "'served' is served by a running coordinator" in refused.stderr
        assert "--version 2 --source NEW-NAME" in refused.stderr and refused.stderr.count("\n") == 1
        assert models.manifest("served").digest == before
        assert cli(*new, "--name", "idle", store=store).returncode == 0  # a model nobody serves is replaced
    finally:
        loop.run(coordinator.stop())
        loop.close()
    replaced = cli(*new, "--name", "served", store=store)  # the coordinator is gone: the lock fell with it
    assert replaced.returncode == 0, replaced.stderr
    assert models.manifest("served").digest != before


def test_a_worker_memory_bound_below_its_runtime_is_one_line_saying_how_much_to_give():
    """--worker-memory-mb bounds the whole process (issue 27.5): 100 MiB cannot hold the runtime itself."""
    result = subprocess.run([sys.executable, "-m", "shard_worker.cli", "serve", "--port", "0", "--worker-memory-mb",
                             "100"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --worker-memory-mb 100 bounds the whole worker process") and "give at least" in line
    least = int(re.search(r"give at least (\d+)", line).group(1))
    assert 200 < least < 1200, line
