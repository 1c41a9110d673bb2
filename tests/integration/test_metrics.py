"""Prometheus metrics of a real coordinator and real workers (tiny-llama on 2 stages, token ids in and out),
scraped over HTTP and parsed with prometheus_client's own parser: after a known set of requests every
counter and histogram moved by exactly what they did (and by nothing else: cancelled, refused, cached and
job requests each land in their own series, once); a worker's step, bytes, busy and bubble series follow its
compute; a failover, a re-registration and a launch's worker restart are counted; every metric the Grafana
dashboard queries is served."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api.server import start_coordinator
from coordinator.config import CoordinatorConfig
from shard_worker.server import start_worker
from shardline.client import Client, generate_request
from shardline.errors import InvalidArgument, NotFound
from shardline.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2
from tests.helpers import worker_stub

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
N = 5  # tokens per request
PROMPTS = [[3, 14, 15, 92], [6, 53, 58], [9, 79, 32, 38, 46]]
FRESH = [[2, 71, 82], [8, 18, 28, 45], [90, 45, 23, 53, 60]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, parsed as Prometheus parses it."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample that must be served (a missing series is a failure, never a silent 0)."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} is not on the page"
    return samples[key]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How far a counter moved; a series on neither page did not move (its labels never happened)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in after:
        assert key not in before, f"{name}{labels} left the page"
        return 0.0
    return after[key] - before.get(key, 0.0)


def register(coordinator, servers) -> None:
    registry = coordinator_pb2_grpc.WorkerRegistryStub(grpc.insecure_channel(coordinator.address))
    for w in servers:
        registry.RegisterWorker(coordinator_pb2.RegisterWorkerRequest(address=w.address, memory_budget_bytes=2**30),
                                timeout=10)


def wait_for(condition, timeout: float = 10.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


@pytest.fixture(scope="module")
def cluster(loop, store, parameters, tmp_path_factory):
    """A coordinator and 2 workers, each with a metrics endpoint on a free port; the result cache on."""
    config = CoordinatorConfig(store=store.root, model=MODEL, workers=2, port=0, parameters_address=parameters.address,
                               heartbeat_timeout_ms=3_600_000, metrics_port=0, result_cache_mb=1,
                               jobs_dir=tmp_path_factory.mktemp("jobs"))
    coordinator = loop.run(start_coordinator(config))
    servers = [loop.run(start_worker(metrics_port=0)) for _ in range(2)]
    register(coordinator, servers)
    with Client(coordinator.address, timeout=60) as client:
        client.wait_ready(timeout=120)
    yield coordinator, servers
    for server in servers:
        loop.run(server.stop(0))
    loop.run(coordinator.stop())


def urls(cluster) -> tuple[str, list[str]]:
    coordinator, servers = cluster
    return coordinator.metrics_server.url, [s.servicer.metrics.server.url for s in servers]


def test_requests_move_the_coordinator_series_by_exactly_what_they_did(cluster):
    coordinator, _ = cluster
    url, _ = urls(cluster)
    before = scrape(url)
    m = dict(model=MODEL)
    with Client(coordinator.address, timeout=60) as client:
        for prompt in PROMPTS:
            result = client.generate(prompt, max_tokens=N, temperature=0, ignore_eos=True)
            assert result.completion_tokens == N and result.finish_reason == "length"
        with pytest.raises(InvalidArgument):
            client.generate(PROMPTS[0], max_tokens=N, temperature=-1)
        with pytest.raises(NotFound):
            client.generate(PROMPTS[0], max_tokens=N, model="no-such-model")
    after = scrape(url)

    assert moved(before, after, "shardline:request_success_total", finished_reason="length", **m) == 3
    assert moved(before, after, "shardline:generation_tokens_total", **m) == 3 * N
    assert moved(before, after, "shardline:prompt_tokens_total", **m) == sum(len(p) for p in PROMPTS)
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert moved(before, after, f"shardline:{histogram}_count", **m) == 3, histogram
        assert moved(before, after, f"shardline:{histogram}_sum", **m) > 0, histogram
    assert moved(before, after, "shardline:request_queue_time_seconds_count", priority="interactive", **m) == 3
    # the refused requests: one error each, with the status the caller got; an unknown model never becomes a label
    assert moved(before, after, "shardline:request_errors_total", code="INVALID_ARGUMENT", **m) == 1
    assert moved(before, after, "shardline:request_errors_total", code="NOT_FOUND", model="(unknown)") == 1
    assert not any("no-such-model" in str(labels) for _, labels in after)
    assert sum(v for (name, _), v in after.items() if name == "shardline:request_errors_total") \
        - sum(v for (name, _), v in before.items() if name == "shardline:request_errors_total") == 2
    # TTFT <= e2e for each request, so for their sums
    assert moved(before, after, "shardline:time_to_first_token_seconds_sum", **m) \
        <= moved(before, after, "shardline:e2e_request_latency_seconds_sum", **m)


def test_the_state_gauges_describe_the_cluster(cluster):
    coordinator, _ = cluster
    url, _ = urls(cluster)
    replica = coordinator.fleet.first
    kv = replica.scheduler.policy.kv
    wait_for(lambda: kv.held + kv.releasing == 0)  # the streams of the other tests are gone
    samples = scrape(url)
    r = dict(model=MODEL, replica=replica.name)
    assert value(samples, "shardline:replica_ready", **r) == 1
    assert value(samples, "shardline:num_requests_running", **r) == 0
    assert value(samples, "shardline:num_requests_waiting", priority="interactive", **r) == 0
    assert value(samples, "shardline:workers", state="ready") == 2
    for stage in ("0", "1"):
        capacity = value(samples, "shardline:kv_cache_capacity_blocks", stage=stage, **r)
        assert capacity >= kv.blocks_total > 0
        assert value(samples, "shardline:kv_cache_used_blocks", stage=stage, **r) == 0
    assert min(value(samples, "shardline:kv_cache_capacity_blocks", stage=s, **r) for s in "01") == kv.blocks_total
    assert value(samples, "shardline:jobs_unfinished") == 0
    assert value(samples, "process_resident_memory_bytes") > 0

    with Client(coordinator.address, timeout=60) as client:  # a stream in flight holds blocks on every stage
        chunks = client.generate(PROMPTS[0], stream=True, max_tokens=400, temperature=0, ignore_eos=True)
        next(chunks)
        during = scrape(url)
        chunks.close()
    assert value(during, "shardline:num_requests_running", **r) == 1
    for stage in ("0", "1"):
        assert value(during, "shardline:kv_cache_used_blocks", stage=stage, **r) >= 1
    assert 0 < value(during, "shardline:kv_cache_usage_perc", **r) <= 1


def test_a_caller_that_goes_away_counts_as_cancelled(cluster):
    coordinator, _ = cluster
    url, _ = urls(cluster)
    before = scrape(url)
    with Client(coordinator.address, timeout=60) as client:
        chunks = client.generate(PROMPTS[1], stream=True, max_tokens=500, temperature=0, ignore_eos=True)
        next(chunks)
        next(chunks)
        chunks.close()
    wait_for(lambda: moved(before, scrape(url), "shardline:request_errors_total", model=MODEL, code="CANCELLED") == 1)
    after = scrape(url)
    assert moved(before, after, "shardline:request_success_total", model=MODEL, finished_reason="length") == 0
    assert moved(before, after, "shardline:time_to_first_token_seconds_count", model=MODEL) == 1
    assert moved(before, after, "shardline:e2e_request_latency_seconds_count", model=MODEL) == 0


def test_a_cached_answer_and_a_job_item_are_each_counted_once_where_they_belong(cluster):
    coordinator, _ = cluster
    url, _ = urls(cluster)
    m = dict(model=MODEL)
    prompt = [11, 12, 13, 14, 15, 16]
    with Client(coordinator.address, timeout=60) as client:
        client.generate(prompt, max_tokens=N, temperature=0, ignore_eos=True)
        before = scrape(url)
        assert client.generate(prompt, max_tokens=N, temperature=0, ignore_eos=True).cached
        cached = scrape(url)
        job_id = client.submit_job([generate_request([21, 22, 23], model=MODEL, max_tokens=N, temperature=0,
                                                     ignore_eos=True)])
        assert client.wait_job(job_id, timeout=60).done == 1
    after = scrape(url)
    # the cached answer: a success and a hit, nothing computed, no token timing
    assert moved(before, cached, "shardline:result_cache_hits_total") == 1
    assert moved(before, cached, "shardline:request_success_total", finished_reason="length", **m) == 1
    assert moved(before, cached, "shardline:generation_tokens_total", **m) == 0
    assert moved(before, cached, "shardline:time_to_first_token_seconds_count", **m) == 0
    # the job's item: one request, queued at background priority
    assert moved(cached, after, "shardline:request_success_total", finished_reason="length", **m) == 1
    assert moved(cached, after, "shardline:generation_tokens_total", **m) == N
    assert moved(cached, after, "shardline:request_queue_time_seconds_count", priority="background", **m) == 1
    assert moved(cached, after, "shardline:request_queue_time_seconds_count", priority="interactive", **m) == 0
    assert value(after, "shardline:jobs_unfinished") == 0


def test_worker_series_follow_the_compute(cluster):
    coordinator, servers = cluster  # prompts not asked before: the result cache holds none of them
    _, worker_urls = urls(cluster)
    wait_for(lambda: all(s.servicer.shard.runtime.sessions == {} for s in servers))  # earlier tests' streams ended
    started = time.monotonic()
    before = [scrape(u) for u in worker_urls]
    with Client(coordinator.address, timeout=60) as client:
        for prompt in FRESH:
            client.generate(prompt, max_tokens=N, temperature=0, ignore_eos=True)
    wait_for(lambda: all(s.servicer.shard.runtime.sessions == {} for s in servers))
    after = [scrape(u) for u in worker_urls]
    elapsed = time.monotonic() - started
    chain = [w.address for w in coordinator.fleet.first.assignment]
    for server, b, a in zip(servers, before, after, strict=True):
        stage = chain.index(server.address)
        # each request: one prefill step, then one step per token after the first
        assert moved(b, a, "shardline:stage_step_duration_seconds_count") >= len(FRESH) * N
        assert moved(b, a, "shardline:stage_steps_total") == moved(b, a, "shardline:stage_step_duration_seconds_count")
        assert moved(b, a, "shardline:stage_tokens_total") >= sum(len(p) for p in FRESH) + len(FRESH) * (N - 1)
        assert moved(b, a, "shardline:stage_received_bytes_total") > 0
        assert moved(b, a, "shardline:stage_sent_bytes_total") > 0
        busy = moved(b, a, "shardline:stage_busy_seconds_total")
        bubble = moved(b, a, "shardline:stage_bubble_seconds_total")
        # two stages and one stream at a time: each stage waits while the other computes
        assert busy > 0 and bubble > 0, (stage, busy, bubble)
        assert busy + bubble <= elapsed
        assert value(a, "shardline:stage_sessions") == 0
        info = [labels for (name, labels), v in a.items() if name == "shardline:stage_info" and v == 1]
        spec = server.servicer.shard.spec
        assert info == [(("end_layer", str(spec.end)), ("model", MODEL), ("start_layer", str(spec.start)),
                         ("state", "ready"))]
        assert value(a, "shardline:stage_kv_cache_capacity_bytes") > 0
        assert value(a, "shardline:stage_weight_bytes") > 0
    # with no live session, idling is not a bubble (an EndSession makes the compute thread account its idle time)
    idle = [scrape(u) for u in worker_urls]
    time.sleep(0.3)
    for server in servers:
        worker_stub(server.address).EndSession(worker_pb2.EndSessionRequest(session_ids=["none"]), timeout=10)
    later = [scrape(u) for u in worker_urls]
    for b, a in zip(idle, later, strict=True):
        assert moved(b, a, "shardline:stage_bubble_seconds_total") == 0


def test_each_server_has_its_own_registry_and_a_scrape_on_the_event_loop_does_not_wait_for_itself(loop, cluster):
    coordinator, _ = cluster
    _, worker_urls = urls(cluster)
    a, b = (scrape(u) for u in worker_urls)
    assert value(a, "shardline:stage_steps_total") > 0 and value(b, "shardline:stage_steps_total") > 0
    assert not any(name.startswith("shardline:request") for name, _ in a)  # no coordinator series on a worker

    async def on_the_loop() -> tuple[float, str]:
        began = time.monotonic()
        text = generate_latest(coordinator.fleet.metrics.registry).decode()
        return time.monotonic() - began, text

    took, text = loop.run(on_the_loop())
    assert took < 1 and 'shardline:replica_ready{model="tiny-llama",replica="tiny-llama@1/r0"} 1.0' in text


@pytest.fixture()
def failover_cluster(loop, store, parameters, workers):
    config = CoordinatorConfig(store=store.root, model=MODEL, workers=2, port=0, parameters_address=parameters.address,
                               heartbeat_timeout_ms=3_600_000, probe_timeout_ms=1000, metrics_port=0)
    coordinator = loop.run(start_coordinator(config))
    servers = workers(3)
    register(coordinator, servers)
    with Client(coordinator.address, timeout=60) as client:
        client.wait_ready(timeout=120)
    yield coordinator, servers
    loop.run(coordinator.stop())


def test_a_failover_and_a_reregistration_are_counted(loop, failover_cluster):
    coordinator, servers = failover_cluster
    url = coordinator.metrics_server.url
    fleet = coordinator.fleet
    replica = fleet.first
    before = scrape(url)
    spare = next(s for s in servers if s.address not in [w.address for w in replica.assignment])
    register(coordinator, [spare])  # the same address again: its process restarted
    victim = next(s for s in servers if s.address == replica.assignment[1].address)
    loop.run(victim.stop(0))
    with Client(coordinator.address, timeout=60) as client:
        assert client.generate(PROMPTS[0], max_tokens=N, temperature=0, ignore_eos=True).completion_tokens == N
    after = scrape(url)
    assert moved(before, after, "shardline:worker_reregistrations_total") == 1
    assert moved(before, after, "shardline:recoveries_total", model=MODEL, replica=replica.name) == 1
    assert moved(before, after, "shardline:worker_replacements_total", model=MODEL) == 1
    assert moved(before, after, "shardline:recovery_duration_seconds_count", model=MODEL) == 1
    assert value(after, "shardline:workers", state="lost") == 1
    assert value(after, "shardline:workers", state="ready") == 2
    assert moved(before, after, "shardline:request_success_total", model=MODEL, finished_reason="length") == 1


def exposed(url: str) -> set[str]:
    """The series names a /metrics page exposes (declared by HELP/TYPE, with samples or not yet)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {f.name + suffix for f in text_string_to_metric_families(text) for suffix in suffixes.get(f.type, ("",))}


def test_every_metric_the_dashboard_queries_is_served(cluster):
    """deploy/grafana/shardline-dashboard.json against the real /metrics pages of a coordinator and a worker."""
    url, worker_urls = urls(cluster)
    served = exposed(url) | exposed(worker_urls[0])
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "shardline-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"\b(?:shardline:[a-z0-9_:]+|process_[a-z0-9_]+)", target["expr"])}
    assert len(queried) >= 20
    assert queried <= served, sorted(queried - served)
    assert "shardline:recoveries_total" in served and "shardline:stage_bubble_seconds_total" in served


def free_ports(n: int) -> int:
    """A port P such that P .. P+n-1 are free now (launch gives its workers the ports after its own)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")


@pytest.mark.e2e
def test_launch_serves_metrics_on_consecutive_ports_and_counts_a_worker_restart(store):
    port, metrics = free_ports(1), free_ports(3)
    env = {**os.environ, "SHARDLINE_STORE": str(store.root), "SHARDLINE_HTTP_PORT": "0"}
    launcher = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "launch", "--model", MODEL, "--workers", "2",
                                 "--port", str(port), "--metrics-port", str(metrics), "--drain-seconds", "1"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True).start()
    try:
        wait_for(lambda: any("serving; Ctrl-C" in line for line in lines), 120, every=0.2)
        said = [line.split()[-1] for line in lines if line.startswith("metrics: ")]
        # the coordinator on P, its workers on P+1 and P+2, listed in stage order (each with its layers)
        assert said[0] == f"http://127.0.0.1:{metrics}/metrics" and sorted(said[1:]) == \
            [f"http://127.0.0.1:{metrics + i}/metrics" for i in (1, 2)], lines
        coordinator_url, *worker_urls = said
        stages = [(int(labels["start_layer"]), int(labels["end_layer"])) for url in worker_urls
                  for (name, pairs), v in scrape(url).items() if name == "shardline:stage_info"
                  for labels in [dict(pairs)] if labels["model"] == MODEL and labels["state"] == "ready"]
        assert len(stages) == 2 and stages[0][0] == 0 and stages[0][1] == stages[1][0], stages  # the whole chain
        listed = [re.search(r"layers \[(\d+), (\d+)\)", line) for line in lines if line.startswith("metrics: worker")]
        assert [(int(m[1]), int(m[2])) for m in listed if m] == stages, lines  # what each line says it serves
        assert value(scrape(coordinator_url), "shardline:worker_restarts_total") == 0

        victim = psutil.Process(launcher.pid).children()[0]
        victim.kill()
        victim.wait(10)

        def healed() -> bool:
            samples = scrape(coordinator_url)
            return value(samples, "shardline:worker_restarts_total") == 1 \
                and value(samples, "shardline:workers", state="ready") == 2 \
                and sum(v for (name, _), v in samples.items() if name == "shardline:recoveries_total") >= 1

        wait_for(healed, 120, every=0.3)
        for url in worker_urls:  # the restarted worker took the port of the one it replaced
            assert value(scrape(url), "shardline:stage_sessions") == 0
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(60)
    for url in (coordinator_url, *worker_urls):
        with pytest.raises(OSError):
            scrape(url)
