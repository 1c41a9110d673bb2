"""A fleet as a user runs it: `coordinator launch` serving SmolLM2 on two replicas and MiniLM beside it, driven
through the SDK (answers equal transformers') and through `coordinator models ...` and `coordinator status`
run as processes; SIGTERM then stops it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

import numpy as np
import psutil
import pytest
from transformers import AutoTokenizer

from shardline.client import Client
from shardline.errors import FailedPrecondition, ShardlineError, Unauthenticated
from tests.e2e.test_cli import cli
from tests.e2e.test_join_and_generate import free_port
from tests.integration.test_embeddings import SENTENCES, reference
from tests.integration.test_fleet import greedy
from tests.launched import admin_key

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]


class Launch:
    """`coordinator launch ...` in the background, its output read on a thread (`lines`)."""

    def __init__(self, store, *args: str) -> None:
        self.store = store
        self.endpoint = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "SHARDLINE_STORE": str(store.root)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "launch", *args, "--port", self.endpoint.split(":")[1]],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.serving = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "serving; Ctrl-C to stop" in line:
                self.serving.set()
        self.serving.set()  # it exited: let the waiter see why

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def admin_key(self) -> str:
        """The admin key launch made (its file named in a line of its output): admin calls need it."""
        return admin_key(self.output)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A `coordinator` client command against this cluster, as its admin."""
        return cli(*args, "--endpoint", self.endpoint, "--api-key", self.admin_key, store=self.store.root,
                   timeout=timeout)


@pytest.fixture(scope="module")
def fleet(smollm2_store, minilm_store):
    launch = Launch(smollm2_store, "--model", "smollm2", "--model", "minilm", "--replicas", "smollm2=2",
                    "--workers", "1")
    try:
        assert launch.serving.wait(180) and launch.process.poll() is None, launch.output
        # launch says ready once every replica is
        with Client(launch.endpoint, api_key=launch.admin_key, timeout=30) as client:
            assert all(m.replicas_ready == m.replicas for m in client.list_models()), client.cluster_status()
        yield launch
    finally:
        if launch.process.poll() is None:
            launch.process.kill()
            launch.process.wait(30)


@contextmanager
def launcher_log_on_error(fleet):
    """A failed call shows what the launcher printed (the coordinator logs an INTERNAL error's traceback)."""
    try:
        yield
    except ShardlineError as exc:
        pytest.fail(f"{exc!r}; the launcher printed:\n{fleet.output}")


def deployment(client, key):
    (found,) = [d for d in client.cluster_status().deployments if f"{d.name}@{d.version}" == key]
    return found


def test_a_keyless_caller_is_served_but_the_admin_calls_need_the_key_launch_printed(fleet):
    """The default launch serves callers without a key as clients; status, scale, load... need its admin key."""
    with Client(fleet.endpoint, timeout=30) as keyless:
        assert {m.name for m in keyless.list_models()} == {"smollm2", "minilm"}
        with pytest.raises(Unauthenticated) as err:
            keyless.cluster_status()
        assert "role admin" in err.value.message and "coordinator launch" in err.value.message
    refused = cli("models", "scale", "smollm2", "2", "--endpoint", fleet.endpoint, store=fleet.store.root,
                  timeout=60)
    assert refused.returncode != 0 and "role admin" in refused.stderr, refused.stderr
    assert fleet.admin_key not in fleet.output  # the key's file is printed, never the key


def test_list_models_shows_both_deployments(fleet):
    with Client(fleet.endpoint, api_key=fleet.admin_key, timeout=30) as client:
        models = {m.name: m for m in client.list_models()}
    assert set(models) == {"smollm2", "minilm"}
    smollm2, minilm = models["smollm2"], models["minilm"]
    assert (smollm2.task, smollm2.version, smollm2.is_default, smollm2.replicas, smollm2.replicas_ready,
            smollm2.state) == ("generate", "1", True, 2, 2, "ready")
    assert (minilm.task, minilm.replicas, minilm.replicas_ready, minilm.ready) == ("embed", 1, 1, True)


def test_greedy_smollm2_on_both_replicas_equals_transformers(fleet):
    tokenizer = AutoTokenizer.from_pretrained(fleet.store.path("smollm2"))
    with Client(fleet.endpoint, api_key=fleet.admin_key, timeout=120) as client, launcher_log_on_error(fleet):
        before = {r.name: r.requests for r in deployment(client, "smollm2@1").replicas}
        assert len(before) == 2
        for prompt in PROMPTS:  # one after the other: the balancer gives each replica one
            ids = tokenizer(prompt)["input_ids"]
            result = client.generate(prompt, model="smollm2", max_tokens=8, temperature=0, ignore_eos=True)
            assert result.prompt_tokens == len(ids)
            assert result.token_ids == greedy(fleet.store, "smollm2", ids, 8), prompt
        after = {r.name: r.requests for r in deployment(client, "smollm2@1").replicas}
    assert all(after[name] > before[name] for name in before), (before, after)


def test_minilm_embeds_as_sentence_transformers_pools(fleet):
    with Client(fleet.endpoint, api_key=fleet.admin_key, timeout=60) as client, launcher_log_on_error(fleet):
        ours = client.embed(SENTENCES, model="minilm")
    expected = reference(fleet.store.path("minilm"), SENTENCES)
    assert ours.shape == expected.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_generate_on_the_encoder_is_a_failed_precondition(fleet):
    with Client(fleet.endpoint, timeout=30) as client, pytest.raises(FailedPrecondition) as err:
        client.generate("hello", model="minilm", max_tokens=4)
    assert "minilm@1" in err.value.message and "is an encoder" in err.value.message


def test_models_list_and_status_print_the_deployments(fleet):
    listed = fleet.cli("models", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "VERSION", "DEFAULT", "TASK", "REPLICAS", "STATE", "CONTEXT"]
    assert [row.split()[:6] for row in rows] == [["minilm", "1", "*", "embed", "1/1", "ready"],
                                                 ["smollm2", "1", "*", "generate", "2/2", "ready"]]
    status = fleet.cli("status")
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "smollm2@1 (default): ready" in text and "minilm@1 (default): ready" in text
    assert "smollm2@1/r0" in text and "smollm2@1/r1" in text and "minilm@1/r0" in text
    assert "worker" in text and "busy %" in text  # the workers' tables are still there
    stored = cli("models", store=fleet.store.root, timeout=60)  # without a command: the store's models
    assert stored.returncode == 0 and "smollm2" in stored.stdout and "minilm" in stored.stdout, stored.stderr


def test_scale_and_bad_admin_commands(fleet):
    scaled = fleet.cli("models", "scale", "smollm2", "1")
    assert scaled.returncode == 0, scaled.stderr
    status = fleet.cli("status")
    assert status.returncode == 0, status.stderr
    section = status.stdout.split("smollm2@1 (default)")[1].split("minilm@1")[0]
    assert section.count("smollm2@1/r") == 1 and "scaled 2 -> 1 replicas" in section, status.stdout
    with Client(fleet.endpoint, api_key=fleet.admin_key, timeout=30) as client:
        assert len(deployment(client, "smollm2@1").replicas) == 1

    negative = fleet.cli("models", "scale", "smollm2", "-1")
    assert negative.returncode == 1 and negative.stderr.count("\n") == 1, negative.stderr
    assert "INVALID_ARGUMENT" in negative.stderr and "replicas must be >= 0" in negative.stderr
    missing = fleet.cli("models", "unload", "nope")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert "NOT_FOUND" in missing.stderr and "'nope'" in missing.stderr
    assert "smollm2" in missing.stderr and "minilm" in missing.stderr  # it lists what is served
    assert "Traceback" not in negative.stderr + missing.stderr


def test_load_promote_unload_from_the_cli(fleet):
    """On the worker that scaling down gave back: a second version, promoted, then the first unloaded."""
    loaded = fleet.cli("models", "load", "smollm2@2", "--source", "smollm2")
    assert loaded.returncode == 0, loaded.stderr
    assert "smollm2@2 serves on 1 replica(s)" in loaded.stdout
    promoted = fleet.cli("models", "promote", "smollm2@2")
    assert promoted.returncode == 0 and promoted.stdout == "smollm2@2 is the default (was version 1)\n", \
        promoted.stderr
    unloaded = fleet.cli("models", "unload", "smollm2@1", "--grace-seconds", "5")
    assert unloaded.returncode == 0, unloaded.stderr
    freed = float(unloaded.stdout.splitlines()[-1].removeprefix("freed ").removesuffix(" MiB"))
    assert freed > 100  # SmolLM2-135M's weights, in float32 or 16-bit
    listed = fleet.cli("models", "list")
    assert [row.split()[:5] for row in listed.stdout.splitlines()[1:]] == [
        ["minilm", "1", "*", "embed", "1/1"], ["smollm2", "2", "*", "generate", "1/1"]], listed.stdout
    with Client(fleet.endpoint, api_key=fleet.admin_key, timeout=60) as client, launcher_log_on_error(fleet):
        ids = client.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True).token_ids
        tokenizer = AutoTokenizer.from_pretrained(fleet.store.path("smollm2"))
        assert ids == greedy(fleet.store, "smollm2", tokenizer(PROMPTS[0])["input_ids"], 8)


def test_sigterm_stops_the_fleet_with_exit_0(fleet):
    children = psutil.Process(fleet.process.pid).children(recursive=True)
    assert len(children) == 3  # 2 replicas of smollm2 and minilm, one stage each
    fleet.process.send_signal(signal.SIGTERM)
    assert fleet.process.wait(60) == 0, fleet.output
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    fleet.reader.join(10)
    assert "draining" in fleet.output and "stopping" in fleet.output
