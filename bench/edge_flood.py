"""Keyless callers flooding the HTTP gateway must not hurt the cluster (issue 28): `coordinator launch` with API
keys as a real subprocess; SENDERS threads post 4 MB JSON bodies without a key to /v1/completions for SECONDS,
while a keyed caller times a 16-token greedy completion (through the same gateway) over and over. Compared: the
keyed completion's median time before the flood and during it (same process, same prompt, same tokens), and
after it: how the flood was answered, and whether any worker was marked lost or any recovery ran.

    python bench/edge_flood.py [--seconds 25] [--senders 8] [--rate POSTS_PER_S] [--coordinator PATH] [--secure]

The senders run in this process, on the same 2 cores as the cluster: unbounded, a gateway that refuses fast
lets them send (and burn) more. `--rate` offers the same load to both gateways compared; the CPU seconds the
launch process (coordinator and gateway) spent per post is the cost of a refused request.

`--coordinator PATH`: another install's `coordinator` (another commit's `make setup`), to measure the old
gateway the same way. `--secure`: mutual TLS everywhere and HTTPS on the gateway (launch --secure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, cpu_seconds, free_port, result  # noqa: E402
from shardline.auth import hash_key, new_api_key  # noqa: E402

BODY_BYTES = 4 * 2**20
PROMPT = "The history of the city of Rome began"


def body() -> bytes:
    text = "x" * (BODY_BYTES - 64)
    return json.dumps({"model": "smollm2", "prompt": text, "max_tokens": 16}).encode()


def flood_once(host: str, port: int, payload: bytes, tls: ssl.SSLContext | None) -> str:
    """One keyless POST of `payload`, sent in 64 KiB pieces, the answer read as soon as one comes: the status,
    or how the connection ended."""
    try:
        raw = socket.create_connection((host, port), timeout=10)
        sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        with sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(payload)}\r\n\r\n".encode())
            for start in range(0, len(payload), 65536):
                if select.select([sock], [], [], 0)[0]:
                    break  # answered before the body was sent
                sock.sendall(payload[start:start + 65536])
            answer = sock.recv(64)
            return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        return "closed while sending"
    except (TimeoutError, OSError) as exc:
        return type(exc).__name__


def launch(coordinator: str, keys: Path, secure: bool) -> tuple[subprocess.Popen[str], str, str, list[str]]:
    port = free_port()
    command = [coordinator, "launch", "--workers", "2", "--port", str(port), "--http-port", str(free_port()),
               "--api-keys", str(keys), "--metrics-port", "0", *(["--secure"] if secure else [])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               start_new_session=True)
    assert process.stdout is not None
    said: list[str] = []
    url = ""
    for line in process.stdout:
        said.append(line.rstrip())
        if m := re.search(r"HTTP API on (\S+)", line):
            url = m.group(1)
        if line.startswith("serving; Ctrl-C to stop"):
            break
    else:
        raise RuntimeError("coordinator launch exited:\n" + "\n".join(said[-15:]))
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    return process, f"127.0.0.1:{port}", url, said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--coordinator", default=str(Path(sys.executable).parent / "coordinator"))
    parser.add_argument("--secure", action="store_true")
    parser.add_argument("--rate", type=float, default=0.0, help="keyless posts per second, all senders together "
                        "(0: as fast as they are answered)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="edge-flood-"))
    key = new_api_key()
    keys = folder / "api-keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "bench", "role": "admin", "sha256": hash_key(key)}]}))
    process, endpoint, url, said = launch(args.coordinator, keys, args.secure)
    certs = next((Path(m.group(1)) for line in said if (m := re.search(r"certificates in (\S+)", line))), None)
    tls: ssl.SSLContext | None = None
    verify: ssl.SSLContext | bool = True
    if url.startswith("https"):
        assert certs is not None, "launch --secure did not say where its certificates are"
        tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        verify = tls
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    keyed = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120, verify=verify)
    request = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}

    def timed() -> float:
        began = time.perf_counter()
        answer = keyed.post("/completions", json=request)
        answer.raise_for_status()
        assert answer.json()["usage"]["completion_tokens"] == 16
        return time.perf_counter() - began

    try:
        timed()  # warm
        idle = [timed() for _ in range(8)]
        payload = body()
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        interval = args.senders / args.rate if args.rate else 0.0

        def sender() -> None:
            due = time.monotonic()
            while time.monotonic() < stop_at:
                outcome = flood_once(host, int(port), payload, tls)
                with lock:
                    outcomes[outcome] += 1
                due += interval
                time.sleep(max(0.0, due - time.monotonic()))

        senders = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
        cpu_before = cpu_seconds(process.pid)
        for s in senders:
            s.start()
        time.sleep(1.0)
        flooded = []
        while time.monotonic() < stop_at - 1:
            flooded.append(timed())
        for s in senders:
            s.join(30)
        cpu_flood = cpu_seconds(process.pid) - cpu_before
        status = httpx.get(f"{url}/models", headers={"authorization": f"Bearer {key}"}, verify=verify, timeout=30)
        status.raise_for_status()
        from shardline.client import Client
        from shardline.tls import ClientTLS

        client_tls = ClientTLS.from_certs_dir(certs) if certs is not None else None
        with Client(endpoint, api_key=key, timeout=30, tls=client_tls) as client:
            cluster = client.cluster_status()
        lost = [w.address for w in cluster.workers if w.state == "lost"]
        ratio = statistics.median(flooded) / statistics.median(idle)
        print(f"keyed 16-token completion: idle median {statistics.median(idle) * 1000:.0f} ms (n={len(idle)}), "
              f"during the flood {statistics.median(flooded) * 1000:.0f} ms (n={len(flooded)}): {ratio:.2f}x")
        posts = sum(outcomes.values())
        print(f"flood: {posts} keyless 4 MB posts by {args.senders} senders in {args.seconds:g} s: {dict(outcomes)}; "
              f"the launch process spent {cpu_flood:.1f} CPU s, {cpu_flood / max(posts, 1) * 1000:.2f} ms a post "
              "(with the keyed completions)")
        print(f"workers lost: {lost or 'none'}; recoveries: {cluster.recoveries}")
        result("edge_flood", f"{args.senders} keyless 4 MB senders{' (HTTPS)' if tls else ''}",
               f"{statistics.median(idle) * 1000:.0f} ms idle", f"{statistics.median(flooded) * 1000:.0f} ms flooded",
               f"{ratio:.2f}x", "<= 1.3x, no worker lost, no recovery")
    finally:
        keyed.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
