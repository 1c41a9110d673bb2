"""README.md's snippets run as written (issue 34): every ```bash and ```python block is either run here, against a
cluster launched as the README launches one, or skipped for a reason this file names. A block that is neither
fails the test, so the README cannot grow a snippet nobody ran.

The clusters are the README's, launched by its own lines: its multi-model one (`coordinator launch --model
smollm2 --model minilm --replicas smollm2=2 --workers 1 --spares 3`) where it says 50051, and its encoder
(`coordinator launch --model minilm --workers 2`) where it says 50052, on a store of the test's own (the session's
models linked in). What is substituted, and only this: the ports (50051 and 50052 -> those clusters' ports,
8000 -> the first one's HTTP port), the admin key path launch printed, `.venv/bin/` (this environment's), and,
as a user's shell would hold them, the store (`SHARDLINE_STORE`), the endpoint (`SHARDLINE_ENDPOINT`) and the
admin key (`SHARDLINE_API_KEY`, which the README exports once; each block runs in a shell of its own). The Node
block runs in a copy of clients/node, so that its `npm ci` leaves the checkout alone. ```js, ```yaml and
```json blocks are not run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_join_and_generate import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCH = "coordinator launch --model smollm2 --model minilm --replicas smollm2=2 --workers 1 --spares 3"
ENCODER = "coordinator launch --model minilm --workers 2"

# blocks not run here, by their first line, and why
SKIPPED = {
    "make run": "the README's first command: its `coordinator launch` is what this test starts; `make test` (its "
                "second) is what CI runs",
    "SHARDLINE_CA=": "the Node client over TLS needs a --secure cluster's CA and a client key",
    "coordinator serve --config c.toml": "standby coordinators on other hosts and an etcd (tests/e2e/"
                                         "test_standby_failover.py runs them on one machine)",
    'Client("host-a:50051,host-b:50051")': "other hosts (tests/unit/test_leader.py, "
                                           "tests/e2e/test_standby_failover.py)",
    "coordinator http --endpoint coordinator.internal": "another host, and certificates of its own",
    "coordinator launch --metrics-port 9400": "a second cluster on fixed ports 9400..; the metrics pages are "
                                              "tests/integration/test_metrics.py's",
    "export OTEL_EXPORTER_OTLP_ENDPOINT": "needs an OTLP collector (tests/integration/test_tracing.py has one)",
}


@dataclass
class Block:
    language: str
    text: str
    line: int  # in README.md

    @property
    def first(self) -> str:
        return self.text.strip().splitlines()[0]


def blocks() -> list[Block]:
    readme = (ROOT / "README.md").read_text()
    return [Block(m.group(1), m.group(2), readme.count("\n", 0, m.start()) + 1)
            for m in re.finditer(r"```(bash|python|sh)\n(.*?)```", readme, re.S)]


@dataclass
class Cluster:
    port: int
    http_port: int
    admin_key_file: str
    out: list[str]
    store: Path
    encoder_port: int = 0

    def substituted(self, text: str) -> str:
        text = text.replace("127.0.0.1:50051", f"127.0.0.1:{self.port}")
        text = text.replace("127.0.0.1:50052", f"127.0.0.1:{self.encoder_port}")
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{self.http_port}")
        text = re.sub(r"/tmp/shardline-launch-\w+/admin\.key", self.admin_key_file, text)
        return text.replace(".venv/bin/", f"{BIN}/")

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SHARDLINE_ENDPOINT": f"127.0.0.1:{self.port}",
                "SHARDLINE_API_KEY": Path(self.admin_key_file).read_text().strip(), "SHARDLINE_STORE": str(self.store)}


def launched(argv: list[str], store: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """`coordinator launch ...` (as the README writes it, and its ports), once it serves: the process and what
    it said."""
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", SHARDLINE_STORE=str(store)))
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(launcher.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 300
    while not any("serving; Ctrl-C to stop" in line for line in list(out)):
        if launcher.poll() is not None or time.monotonic() > deadline:
            stop(launcher)
            raise AssertionError(f"{' '.join(argv)} did not serve:\n{''.join(out)}")
        time.sleep(0.2)
    return launcher, out


def stop(launcher: subprocess.Popen[str]) -> None:
    launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(120)
    except subprocess.TimeoutExpired:
        launcher.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_store, minilm_store):
    # a store of its own: the clusters' run-time changes (the models block's) and `my-finetune` stay in it
    store = tmp_path_factory.mktemp("readme") / "store"
    store.mkdir()
    for model in ("smollm2", "minilm"):
        (store / model).symlink_to(smollm2_store.path(model), target_is_directory=True)
    port, http_port, encoder_port = free_port(), free_port(), free_port()
    main, out = launched([*LAUNCH.split(), "--port", str(port), "--http-port", str(http_port)], store)
    try:
        # the README's second cluster beside the first: it takes a free HTTP port itself (8000 is the first's)
        encoder, _ = launched([*ENCODER.split(), "--port", str(encoder_port)], store)
        try:
            key = next(re.search(r"admin API key in (\S+)", line) for line in out if "admin API key in" in line)
            yield Cluster(port, http_port, key.group(1), out, store, encoder_port)
        finally:
            stop(encoder)
    finally:
        stop(main)


def run(block: Block, cluster: Cluster, cwd: Path, skip_first_line: bool = False) -> str:
    text = cluster.substituted(block.text)
    if skip_first_line:  # the launch line: this test started that cluster itself
        text = text.split("\n", 1)[1]
    argv = ["bash", "-e", "-o", "pipefail", "-c", text] if block.language in ("bash", "sh") \
        else [sys.executable, "-c", text]
    done = subprocess.run(argv, cwd=cwd, env=cluster.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README.md line {block.line} failed:\n{text}\n--- stdout\n{done.stdout}\n" \
                                 f"--- stderr\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_snippet_in_the_readme_runs_or_is_skipped_for_a_named_reason(cluster, tmp_path):
    import shutil

    for prefix in SKIPPED:  # no stale reasons: each names one block
        assert len([b for b in blocks() if b.first.startswith(prefix)]) == 1, prefix
    node = shutil.which("node") is not None and shutil.which("npm") is not None
    if node:  # the Node block's `cd clients/node && npm ci`, in a copy
        shutil.copytree(ROOT / "clients" / "node", tmp_path / "clients" / "node",
                        ignore=shutil.ignore_patterns("node_modules"))
        shutil.copytree(ROOT / "protos", tmp_path / "protos")  # generate.js reads ../../protos
    ran = []
    # the `models` block changes what is served (a random fine-tune promoted, version 1 unloaded): it runs last,
    # so that the other snippets meet the model they describe
    for block in sorted(blocks(), key=lambda b: b.first.startswith(LAUNCH)):
        first = block.first
        if any(first.startswith(prefix) for prefix in SKIPPED) or (first.startswith("cd clients/node") and not node):
            continue
        out = run(block, cluster, tmp_path, skip_first_line=first.startswith(LAUNCH))
        ran.append((block, out))
    said = {b.first: out for b, out in ran}

    def output(prefix: str) -> str:
        found = [out for first, out in said.items() if first.startswith(prefix)]
        assert len(found) == 1, f"no (or several) README block starting {prefix!r} ran"
        return found[0]

    assert "Paris" in output(".venv/bin/coordinator generate")  # greedy, as the README says
    assert "Paris" in output("from shardline.client import Client")
    assert output("# first: coordinator launch --model minilm").split() == ["(2,", "384)", "1"]
    if node:
        assert output("cd clients/node").strip()
    assert "smollm2" in output(LAUNCH) and "minilm" in output(LAUNCH)
    assert "Paris" in output("# pip install")  # KServe v2 (tritonclient)
    assert "Paris" in output("from openai import OpenAI")
    assert "data: [DONE]" in output("curl -N")
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["a", "b"]
    assert all(r["token_ids"] and r["finish_reason"] for r in results), results
    assert len(ran) >= (9 if node else 8)
