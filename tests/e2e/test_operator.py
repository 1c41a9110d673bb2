"""What an operator meets in the first hour, as they meet it: real processes, one launched cluster shared by
the module (a generator and an encoder on one pool), its request log read from the launcher's stderr."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest

from tests.e2e.test_cli import cli
from tests.e2e.test_join_and_generate import free_port

pytestmark = pytest.mark.e2e
SECRET = "zebra-quartz-lighthouse"  # a prompt word the request log must not show without --log-prompts


@dataclass
class Launched:
    endpoint: str
    store: object
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    def requests(self) -> list[str]:
        return [line for line in list(self.err) if "shardline.requests" in line]

    def wait_for_requests(self, count: int, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.requests()) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.requests()


def _pump(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, minilm_store):
    from coordinator.store.importer import import_random, random_config
    from coordinator.store.models import ModelStore

    store = tmp_path_factory.mktemp("operator") / "store"
    imported = cli("import", "minilm", store=store)  # no --name: the built-in's own
    assert imported.returncode == 0 and "imported minilm" in imported.stdout, imported.stderr
    import_random(ModelStore(store), "tok", random_config("llama", hidden=64, layers=2, vocab=30522,
                                                          positions=512), tokenizer_dir=minilm_store.path("minilm"))
    port = free_port()
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--model", "tok", "--model",
                                 "minilm", "--workers", "1", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    cluster = Launched(f"127.0.0.1:{port}", store)
    threading.Thread(target=_pump, args=(launcher.stdout, cluster.out), daemon=True).start()
    threading.Thread(target=_pump, args=(launcher.stderr, cluster.err), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any("serving; Ctrl-C to stop" in line for line in cluster.out):
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(cluster.out + cluster.err)
            time.sleep(0.1)
        yield cluster
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()


def test_launch_shows_the_plan_before_loading_and_progress_to_100(launched):
    text = "".join(launched.out)
    assert text.index("plan for tok") < text.index("loading weights")
    # its 2 workers share the machine: each offers half of 80% of what is available, never 80% each
    offered = int(re.search(r"each of the 2 workers may use (\d+) MiB in all", text).group(1))
    assert 0 < offered * 2 <= psutil.virtual_memory().total * 0.8 / 2**20, offered
    assert "loading weights: 100%" in text and text.index("loading weights: 100%") < text.index("ready in")


def test_a_second_cluster_on_the_same_store_takes_its_own_http_port_and_jobs_folder(launched):
    """The README's second cluster, as a user starts it beside the first: it neither fails on port 8000 nor
    runs with jobs off; it says where it went."""
    port = free_port()
    second = subprocess.run([sys.executable, "-m", "coordinator.cli", "launch", "--model", "tok", "--workers", "1",
                             "--port", str(port), "--exit-when-ready"], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "SHARDLINE_STORE": str(launched.store)})
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"this cluster keeps its jobs and run-time changes in {launched.store / f'launch-{port}'}" in second.stdout
    assert "jobs are off" not in second.stdout + second.stderr
    first_http, second_http = (text.split("HTTP API on http://127.0.0.1:")[1].split("/")[0]
                               for text in ("".join(launched.out), second.stdout))
    assert first_http != second_http, second.stdout  # side by side, not on each other's port
    assert (first_http == "8000") == ("port 8000 is taken (another cluster?)" in second.stdout), second.stdout


def test_one_request_log_line_per_request_without_the_prompt(launched):
    before = len(launched.requests())
    done = cli("generate", f"{SECRET} once upon a time", "--model", "tok", "--max-tokens", "4", "--ignore-eos",
               "--temperature", "0", "--endpoint", launched.endpoint, store=launched.store, timeout=120)
    assert done.returncode == 0, done.stderr
    refused = cli("generate", SECRET, "--model", "minilm", "--endpoint", launched.endpoint, store=launched.store,
                  timeout=120)
    assert refused.returncode == 1 and "is an encoder" in refused.stderr and "coordinator embed" in refused.stderr
    assert refused.stderr.count("\n") == 1
    embedded = cli("embed", SECRET, "two words", "--model", "minilm", "--endpoint", launched.endpoint,
                   store=launched.store, timeout=120)
    assert embedded.returncode == 0, embedded.stderr
    rows = [json.loads(line) for line in embedded.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and len(rows[0]["embedding"]) == 384
    lines = launched.wait_for_requests(before + 3)[before:]
    assert len(lines) == 3, lines
    fields = [dict(re.findall(r"(\w+)=(\S+)", line.partition(" request ")[2])) for line in lines]
    generated, refusal, infer = fields
    assert " INFO " in lines[0]
    for f in fields:
        assert {"id", "model", "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms", "outcome"} <= set(f)
    assert generated["model"] == "tok" and generated["outcome"] == "length"
    assert generated["completion_tokens"] == "4" and int(generated["prompt_tokens"]) > 0
    assert float(generated["ttft_ms"]) <= float(generated["duration_ms"])
    assert refusal["outcome"] == "FAILED_PRECONDITION" and refusal["model"] == "minilm"
    assert infer["kind"] == "infer" and infer["outcome"] == "infer" and infer["inputs"] == "2"
    assert not any(SECRET in line or "prompt=" in line for line in lines)


def test_embed_refuses_an_over_long_text_unless_asked_to_truncate(launched):
    long = " ".join(["word"] * 2000)
    refused = cli("embed", "short", long, "--endpoint", launched.endpoint, "--model", "minilm", store=launched.store,
                  timeout=120)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "texts[1] is 2002 tokens" in refused.stderr and "--truncate" in refused.stderr
    cut = cli("embed", "short", long, "--truncate", "--endpoint", launched.endpoint, "--model", "minilm",
              store=launched.store, timeout=120)
    assert cut.returncode == 0, cut.stderr
    assert len(cut.stdout.splitlines()) == 2 and "1 truncated to the model's positions" in cut.stderr


def test_models_shows_a_header_and_explains_its_sizes(launched, tmp_path):
    listed = cli("models", store=launched.store, timeout=60)
    assert listed.returncode == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "FAMILY", "LAYERS", "SIZE", "LOADED"]
    assert rows[0].startswith("minilm") and rows[1].startswith("tok") and f"store: {launched.store}" in listed.stdout
    empty = cli("models", store=tmp_path / "nothing", timeout=60)
    assert empty.returncode == 0 and "no models" in empty.stdout and "does not exist yet" in empty.stdout


def test_import_names_the_model_itself_and_never_overwrites_silently(launched, tmp_path):
    again = cli("import", "minilm", store=launched.store, timeout=60)
    assert again.returncode == 1 and "already holds a model named 'minilm'" in again.stderr
    assert "--overwrite" in again.stderr and again.stderr.count("\n") == 1
    missing = cli("import", str(tmp_path / "nowhere"), store=tmp_path / "s", timeout=60)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "minilm" in missing.stderr
    assert "--random" in missing.stderr
    unnamed = cli("import", "--random", "llama", "--layers", "2", "--hidden", "64", store=tmp_path / "s", timeout=60)
    assert unnamed.returncode == 1 and "needs a --name" in unnamed.stderr


def _launch_watching_children(*args: str, store) -> tuple[subprocess.CompletedProcess, list[str], float]:
    """`launch ...` run to its end, noting every child process it ever had."""
    env = {**os.environ, "SHARDLINE_STORE": str(store)}
    began = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", *args, "--port", str(free_port())],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: set[str] = set()
    parent = psutil.Process(process.pid)
    while process.poll() is None and time.monotonic() - began < 120:
        try:
            children |= {" ".join(c.cmdline()) for c in parent.children(recursive=True)}
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), sorted(children), \
        time.monotonic() - began


def test_a_plan_that_cannot_fit_fails_before_any_worker_is_spawned_once(tmp_path):
    made = cli("import", "--random", "llama", "--hidden", "64", "--layers", "4", "--vocab", "128", "--name", "four",
               store=tmp_path)
    assert made.returncode == 0, made.stderr
    result, children, seconds = _launch_watching_children("--model", "four", "--workers", "5", store=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "cannot split 4 layers into 5 stages" in lines[0] and "--workers" in lines[0]
    assert not [c for c in children if "shard_worker" in c], children
    assert seconds < 30
    big = cli("import", "--random", "llama", "--hidden", "512", "--layers", "4", "--vocab", "4096", "--name", "big",
              store=tmp_path)
    assert big.returncode == 0, big.stderr
    result, children, _ = _launch_watching_children("--model", "big", "--workers", "2", "--worker-memory-mb", "2",
                                                     store=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "MiB missing" in lines[0] and "--worker-memory-mb" in lines[0]
    assert not [c for c in children if "shard_worker" in c], children
    assert "Traceback" not in result.stderr


def test_status_says_lost_and_shows_no_empty_tables():
    from types import SimpleNamespace

    from coordinator.cli.tables import worker_lines

    lost = SimpleNamespace(address="127.0.0.1:4000", state="lost", start_layer=0, end_layer=2, weight_bytes=0,
                           rss_bytes=0, memory_budget_bytes=2**30, sessions=0, kv_cache_bytes=0,
                           last_heartbeat_age_ms=315_900, last_error="", busy_ms=0, idle_ms=0, queue_depth=0,
                           bytes_in=0, bytes_out=0, tokens_per_second=0.0)
    row = worker_lines([lost])[1]
    assert row.split()[-1] == "lost" and "315.9" not in row and " 0 MiB" not in row and "1024 MiB" in row
