"""`coordinator launch --secure` as a user meets it: a throwaway CA and an admin API key in a private temp
directory; the Python SDK (tls=, api_key=) and the Node client (SHARDLINE_CA, SHARDLINE_API_KEY) get the same
greedy text a plain launch gives; a client without the key, without TLS or trusting another CA is refused;
SIGTERM leaves no key file behind.

The plain launch runs first and is stopped before the secure one starts (never both at once: 2 cores)."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from shardline.client import Client, GenerateResult
from shardline.errors import Unauthenticated, Unavailable

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, in a small village by the sea,"
TOKENS = 12
READY_S = 150


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while picked, so that no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Launch:
    """A `coordinator launch` process, its stdout collected line by line."""

    process: subprocess.Popen[str]
    endpoint: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, store: Path, *flags: str, cluster_port: bool = True) -> Launch:
        """`cluster_port`: give it one (else launch chooses a free one itself, as a user's does)."""
        port, registry = free_ports(2)
        env = {**os.environ, "SHARDLINE_STORE": str(store)}
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "launch", "--model", "smollm2", "--workers", "2",
             "--port", str(port), *(["--cluster-port", str(registry)] if cluster_port else []),
             "--drain-seconds", "5", *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        launch = cls(process, f"127.0.0.1:{port}")
        launch.reader = threading.Thread(target=launch._read, daemon=True)
        launch.reader.start()
        return launch

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_serving(self, timeout: float = READY_S) -> None:
        deadline = time.monotonic() + timeout
        while "serving; Ctrl-C to stop" not in self.text:
            if self.process.poll() is not None:
                if self.reader is not None:
                    self.reader.join(timeout=5)  # the last lines
                raise AssertionError(f"launch exited with {self.process.returncode}:\n{self.text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"launch was not serving within {timeout} s:\n{self.text}")
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM (then kill, if it does not exit), and make sure no worker outlives it; its exit status."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            child.kill()
        if self.reader is not None:
            self.reader.join(timeout=5)  # the last lines
        assert alive == [], f"workers outlived the launcher: {alive}"
        return self.process.returncode


def generate(endpoint: str, **security: object) -> GenerateResult:
    with Client(endpoint, timeout=60, **security) as client:
        client.wait_ready(timeout=60)
        return client.generate(PROMPT, max_tokens=TOKENS, temperature=0)


@pytest.fixture(scope="module")
def reference(smollm2_store) -> GenerateResult:
    """The greedy text of a plain launch (random cluster token, plaintext public API open to callers without
    a key; an admin key for its admin calls), stopped again."""
    launch = Launch.start(smollm2_store.root)
    try:
        launch.wait_serving()
        assert "mutual TLS" not in launch.text and "admin API key in " in launch.text, launch.text
        result = generate(launch.endpoint)
    finally:
        code = launch.stop()
    assert code == 0, launch.text
    assert result.completion_tokens == TOKENS and result.finish_reason == "length", result
    return result


@dataclass
class Secure:
    launch: Launch
    private: Path  # the launcher's temp directory: ca.crt, node.crt/.key, admin.key, api-keys.json
    key: str

    @property
    def endpoint(self) -> str:
        return self.launch.endpoint


@pytest.fixture(scope="module")
def secure(smollm2_store, reference) -> Iterator[Secure]:
    """`launch --secure`, started once the plain launch (`reference`) has stopped."""
    launch = Launch.start(smollm2_store.root, "--secure", cluster_port=False)
    try:
        launch.wait_serving()
        tls = re.search(r"^mutual TLS on every link: throwaway CA and certificates in (\S+) \(clients trust "
                        r"(\S+)\)$", launch.text, re.M)
        api = re.search(r"^admin API key in (\S+) \(every call needs it: export SHARDLINE_API_KEY=\$\(cat \1\)\)$",
                        launch.text, re.M)
        assert tls and api, launch.text
        private = Path(tls[1])
        assert Path(tls[2]) == private / "ca.crt" and Path(api[1]) == private / "admin.key", launch.text
        yield Secure(launch, private, (private / "admin.key").read_text().strip())
    finally:
        launch.stop()


def test_secure_launch_keeps_its_ca_and_key_private_and_never_prints_the_key(secure):
    assert secure.private.name.startswith("shardline-launch-")
    assert stat.S_IMODE(secure.private.stat().st_mode) == 0o700
    assert stat.S_IMODE((secure.private / "admin.key").stat().st_mode) == 0o600
    assert (secure.private / "ca.crt").is_file() and (secure.private / "node.crt").is_file()
    assert len(secure.key) >= 20 and secure.key not in secure.launch.text
    assert "ready in" in secure.launch.text
    # no fixed port taken unasked: launch chose a free one for its workers' registration, and said which
    registers = re.search(r"^workers register on port (\d+) \(mutual TLS", secure.launch.text, re.M)
    assert registers and int(registers[1]) != 50053, secure.launch.text


def test_tls_mistakes_are_told_apart_from_a_closed_port_in_one_line(secure, tmp_path):
    """Issue 34.1, as a user meets it: the CLI without --certs-dir, with another cluster's CA, against a closed
    port, and the SDK's wait_ready without tls: each says its own cause, at once, in one line."""
    from tests.e2e.test_cli import cli
    from tests.e2e.test_join_and_generate import free_port

    plain = cli("status", "--endpoint", secure.endpoint, store=tmp_path, timeout=60)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1, plain.stderr
    assert "speaks TLS and this call does not" in plain.stderr and "--certs-dir" in plain.stderr, plain.stderr
    other = tmp_path / "other-ca"
    assert cli("certs", "create-ca", "--certs-dir", str(other), store=tmp_path).returncode == 0
    foreign = cli("status", "--endpoint", secure.endpoint, "--certs-dir", str(other), store=tmp_path, timeout=60)
    assert foreign.returncode == 1 and "did not sign" in foreign.stderr, foreign.stderr
    closed = cli("status", "--endpoint", f"127.0.0.1:{free_port()}", store=tmp_path, timeout=60)
    assert closed.returncode == 1 and "nothing listens there" in closed.stderr, closed.stderr
    began = time.monotonic()
    with Client(secure.endpoint, timeout=10) as client, pytest.raises(Exception) as err:
        client.wait_ready(timeout=2)
    assert "speaks TLS" in str(err.value) and time.monotonic() - began < 10, err.value


def test_greedy_text_over_tls_with_the_key_is_the_plain_launchs(secure, reference):
    result = generate(secure.endpoint, tls=secure.private, api_key=secure.key)
    assert result.completion_tokens == reference.completion_tokens == TOKENS
    assert result.token_ids == reference.token_ids and len(result.token_ids) == TOKENS
    assert result.text == reference.text and result.text.strip()


def test_secure_cluster_refuses_no_key_a_wrong_key_plaintext_and_an_untrusted_ca(secure, tmp_path):
    from coordinator.cli.certs import create_ca

    def attempt(**security: object) -> None:
        with Client(secure.endpoint, timeout=20, **security) as client:
            client.generate(PROMPT, max_tokens=2, temperature=0)

    with pytest.raises(Unauthenticated) as no_key:
        attempt(tls=secure.private)
    assert secure.key not in str(no_key.value)
    with pytest.raises(Unauthenticated):
        attempt(tls=secure.private, api_key="sl_" + "0" * 40)
    with pytest.raises(Unavailable):  # a plaintext client meets a TLS server: never a deadline, never served
        attempt(api_key=secure.key)
    with pytest.raises(Unauthenticated, match="TLS handshake failed"):  # the system's roots: no such CA
        attempt(tls=True, api_key=secure.key)
    other = tmp_path / "other-ca"
    create_ca(other, days=1)
    with pytest.raises(Unauthenticated, match="TLS handshake failed"):
        attempt(tls=other, api_key=secure.key)
    # still serving the right client after all that
    assert generate(secure.endpoint, tls=secure.private, api_key=secure.key).completion_tokens == TOKENS


def run_node(script: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")}
    return subprocess.run(["node", str(script), endpoint, PROMPT, str(TOKENS)], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_node_client_over_tls_with_the_key_prints_the_sdks_text(secure, reference, node_client, tmp_path):
    from coordinator.cli.certs import create_ca

    ca = str(secure.private / "ca.crt")
    result = run_node(node_client, secure.endpoint, SHARDLINE_CA=ca, SHARDLINE_API_KEY=secure.key)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference.text + "\n"
    assert result.stderr == f"\n[FINISH_REASON_LENGTH: {TOKENS} tokens]\n"  # no warning either
    assert secure.key not in result.stdout + result.stderr

    # with a client certificate too (mutual TLS: the node certificate may act as a client)
    both = run_node(node_client, secure.endpoint, SHARDLINE_CA=ca, SHARDLINE_API_KEY=secure.key,
                    SHARDLINE_CLIENT_CERT=str(secure.private / "node.crt"),
                    SHARDLINE_CLIENT_KEY=str(secure.private / "node.key"))
    assert both.returncode == 0, both.stderr
    assert both.stdout == reference.text + "\n"

    no_key = run_node(node_client, secure.endpoint, SHARDLINE_CA=ca)
    assert no_key.returncode == 1 and no_key.stdout == ""
    assert no_key.stderr.startswith("error: UNAUTHENTICATED "), no_key.stderr

    wrong_key = run_node(node_client, secure.endpoint, SHARDLINE_CA=ca, SHARDLINE_API_KEY="sl_" + "1" * 40)
    assert wrong_key.returncode == 1 and wrong_key.stderr.startswith("error: UNAUTHENTICATED "), wrong_key.stderr
    assert "1" * 40 not in wrong_key.stderr

    plaintext = run_node(node_client, secure.endpoint, SHARDLINE_API_KEY=secure.key)
    assert plaintext.returncode == 1 and plaintext.stderr.startswith("error: UNAVAILABLE "), plaintext.stderr
    assert secure.key not in plaintext.stderr

    create_ca(tmp_path, days=1)
    untrusted = run_node(node_client, secure.endpoint, SHARDLINE_CA=str(tmp_path / "ca.crt"),
                         SHARDLINE_API_KEY=secure.key)
    assert untrusted.returncode == 1 and untrusted.stderr.startswith("error: UNAVAILABLE "), untrusted.stderr
    assert "not signed by SHARDLINE_CA" in untrusted.stderr
    assert untrusted.stdout == "" and secure.key not in untrusted.stderr

    missing = run_node(node_client, secure.endpoint, SHARDLINE_CA=str(secure.private / "nothing.crt"))
    assert missing.returncode == 1 and "cannot read SHARDLINE_CA" in missing.stderr, missing.stderr


def test_the_curl_hint_launch_prints_works_as_printed(secure):
    """Issue 34.6: the hint names the cluster's CA and sends the admin key (from its file, never printed)."""
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    hint = re.search(r"^OpenAI-compatible HTTP API on https://\S+ \(try: (.+)\)$", secure.launch.text, re.M)
    assert hint and secure.key not in hint[1], secure.launch.text
    ran = subprocess.run(["bash", "-c", hint[1]], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and '"data"' in ran.stdout and "smollm2" in ran.stdout, (hint[1], ran)
    # issue 28.6: HTTPS is served with the gateway's own certificate, never the node's
    import ssl

    port = int(re.search(r"https://[^:/]+:(\d+)/", hint[0])[1])
    served = ssl.get_server_certificate(("127.0.0.1", port))
    assert served.strip() == (secure.private / "server.crt").read_text().strip(), served


def test_sigterm_stops_the_secure_launch_and_removes_its_private_directory(secure):
    """Runs last in this module: it stops the secure cluster."""
    assert secure.private.is_dir()
    children = psutil.Process(secure.launch.process.pid).children(recursive=True)
    assert len(children) == 2
    assert secure.launch.stop() == 0, secure.launch.text
    assert not any(child.is_running() for child in children)
    assert not secure.private.exists(), sorted(p.name for p in secure.private.iterdir())
    assert "stopping" in secure.launch.text
