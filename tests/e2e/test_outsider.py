"""The default `coordinator launch`, and a process on the same machine that is not part of it: it finds the
workers and the parameter service (the status API, the launcher's listening ports) and calls their internal
RPCs. Every call is refused; the stream in flight meanwhile finishes with the tokens it would have had, and
every worker keeps its layers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import psutil
import pytest

from shardline.auth import TOKEN_HEADER
from shardline.client import Client
from shardline.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    parameters_pb2,
    parameters_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.e2e.test_join_and_generate import free_port
from tests.launched import admin_key

pytestmark = pytest.mark.e2e
PROMPT = "Write a short story about a lighthouse keeper"


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return err.value.code()


def test_a_process_outside_the_default_launch_cannot_drive_its_workers(smollm2_store):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    env = {**os.environ, "SHARDLINE_STORE": str(smollm2_store.root)}
    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--model", "smollm2",
                                 "--workers", "2", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("serving; Ctrl-C to stop" in line for line in lines):
            line = launcher.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        with Client(endpoint, timeout=120, api_key=admin_key("".join(lines))) as client:
            status = client.cluster_status()
            reference = client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
        assert len(reference.token_ids) == 16
        layers = {w.address: (w.start_layer, w.end_layer) for w in status.workers}
        listening = {c.laddr.port for c in psutil.Process(launcher.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        # the default launch also serves the HTTP API (on a free port here: SHARDLINE_HTTP_PORT=0, conftest)
        (http_url,) = re.findall(r"HTTP API on https?://[^:]+:(\d+)/v1", "".join(lines))
        (parameters_port,) = listening - {port, int(http_url)}
        parameters_address = f"127.0.0.1:{parameters_port}"

        # a stream in flight while the outsider calls: its sessions live on both workers
        chunks: list = []
        first = threading.Event()

        def stream() -> None:
            with Client(endpoint, timeout=120) as c:
                for chunk in c.generate(PROMPT, max_tokens=48, temperature=0, ignore_eos=True, stream=True):
                    chunks.append(chunk)
                    first.set()

        streaming = threading.Thread(target=stream)
        streaming.start()
        assert first.wait(60)

        codes = []
        for address in layers:
            worker = worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(address))
            other = next(a for a in layers if a != address)
            codes += [
                refused(lambda w=worker: w.LoadShard(worker_pb2.LoadShardRequest(
                    model="smollm2", start_layer=0, end_layer=1, parameters_address=parameters_address),
                    timeout=10)),
                refused(lambda w=worker, o=other: w.Forward(iter([worker_pb2.ForwardRequest(
                    step_id=1, start_layer=0, token_ids=[1], route=[o],
                    sequences=[worker_pb2.SequenceSlice(session_id="x", num_tokens=1)])]), timeout=10)),
                refused(lambda w=worker: w.EndSession(worker_pb2.EndSessionRequest(session_ids=["x"]), timeout=10)),
                refused(lambda w=worker: w.SetPeers(worker_pb2.SetPeersRequest(addresses=["127.0.0.1:1"]),
                                                    timeout=10)),
                refused(lambda w=worker: w.GetStatus(worker_pb2.GetStatusRequest(), timeout=10)),
            ]
        params = parameters_pb2_grpc.ParametersStub(grpc.insecure_channel(parameters_address))
        codes += [
            refused(lambda: params.FetchTensors(parameters_pb2.FetchTensorsRequest(
                model="smollm2", tensors=[parameters_pb2.TensorRequest(name="model.embed_tokens.weight")]),
                timeout=10)),
            refused(lambda: params.GetManifest(parameters_pb2.GetManifestRequest(model="smollm2"), timeout=10)),
        ]
        registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(endpoint))
        codes.append(refused(lambda: registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(
            address="127.0.0.1:1", memory_budget_bytes=2**40), timeout=10)))
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * len(codes)

        streaming.join(120)
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == 48 and tokens[:16] == reference.token_ids
        with Client(endpoint, timeout=30, api_key=admin_key("".join(lines))) as client:
            after = client.cluster_status()
        assert after.recoveries == 0  # nothing was healed around: the stream never broke
        assert {w.address: (w.start_layer, w.end_layer) for w in after.workers} == layers
        # each worker's own view, asked with the cluster's token (a child's --cluster-token-file): the shard
        # the coordinator planned, loaded, never reloaded by the outsider's LoadShard
        args = psutil.Process(launcher.pid).children()[0].cmdline()
        token = Path(args[args.index("--cluster-token-file") + 1]).read_text().strip()
        for address, (start, end) in layers.items():
            reply = worker_pb2_grpc.ShardWorkerStub(grpc.insecure_channel(address)).GetStatus(
                worker_pb2.GetStatusRequest(), timeout=10, metadata=((TOKEN_HEADER, token),))
            assert reply.state == worker_pb2.WORKER_STATE_READY and reply.model == "smollm2"
            assert (reply.start_layer, reply.end_layer) == (start, end)
    finally:
        launcher.terminate()
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait(10)
