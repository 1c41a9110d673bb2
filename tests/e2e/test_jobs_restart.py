"""A job outlives its coordinator: `coordinator jobs submit` a file of 100 requests (greedy, sampled with a
seed, sampled without one), SIGKILL the coordinator halfway, start it again on the same store, and the job
finishes with the results an uninterrupted run gives; the items finished before the kill are not run again.
Real processes: the coordinator (twice) and two workers, which join the new coordinator on their own."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from shardline.client import Client
from shardline.v1 import coordinator_pb2
from tests.e2e.standalone import Standalone

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]
N = 100


def line(i: int) -> dict:
    prompt = [(11 * i + j) % 120 + 1 for j in range(2 + i % 6)]
    kind = i % 3
    params = {"max_tokens": 48, "ignore_eos": True, "temperature": 0.0 if kind == 0 else 0.9}
    if kind == 1:
        params["seed"] = 1000 + i
    return {"custom_id": f"req-{i}", "prompt_token_ids": prompt, **params}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def stored(db, job_id):
    with sqlite3.connect(db) as con:
        return {i: (s, r, q) for i, s, r, q in con.execute(
            "SELECT idx, state, result, request FROM items WHERE job = ?", (job_id,))}


def test_a_job_survives_a_coordinator_sigkill_with_the_same_results(store, tmp_path):
    cluster = Standalone.serving(store.root, tmp_path, workers=2, job_concurrency=6, result_cache_mb=0)
    endpoint = cluster.endpoint
    try:
        cluster.add_workers(2)
        with Client(endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(line(0)) + "\n" + json.dumps({**line(1), "max_tokens": 0}) + "\n")
        refused = cli("jobs", "submit", str(bad), "--endpoint", endpoint)
        assert refused.returncode == 1 and "line 2 (item 1): max_tokens must be between 1 and" in refused.stderr
        bad.write_text(json.dumps(line(0)) + "\n" + json.dumps({**line(1), "temprature": 0}) + "\n")
        typo = cli("jobs", "submit", str(bad), "--endpoint", endpoint)  # as a user meets it: the line, the key, the fix
        assert typo.returncode == 1 and "line 2: unknown key 'temprature'; did you mean 'temperature'?" in typo.stderr
        jobs_file = tmp_path / "job.jsonl"
        jobs_file.write_text("".join(json.dumps(line(i)) + "\n" for i in range(N)))
        submitted = cli("jobs", "submit", str(jobs_file), "--endpoint", endpoint)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()

        with Client(endpoint, timeout=30) as client:
            deadline = time.monotonic() + 120
            while (done := client.get_job(job_id).done) < 20:
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.02)
        cluster.kill_coordinator()
        db = tmp_path / "jobs.sqlite3"
        before = {i: r for i, (s, r, _) in stored(db, job_id).items() if s == "done"}
        assert done <= len(before) < N, (done, len(before))  # killed halfway

        cluster.restart_coordinator()
        with Client(endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
            status = client.wait_job(job_id, timeout=300)
            assert (status.state, status.done, status.failed) == ("completed", N, 0)
            ran = sum(r.requests for d in client.cluster_status().deployments for r in d.replicas)
            after = stored(db, job_id)
            # the items finished before the kill kept their results, and only the others ran again
            assert {i: after[i][1] for i in before} == before
            assert ran == N - len(before), (ran, len(before))
            # the results are those of an uninterrupted run: the same requests, one at a time, interactively
            items = {i: coordinator_pb2.JobItem.FromString(q) for i, (_, _, q) in after.items()}
            expected = []
            for i in range(N):
                request = items[i].generate
                expected.append(client.generate(list(request.prompt_token_ids), max_tokens=48, ignore_eos=True,
                                                temperature=request.temperature, seed=request.seed).token_ids)
        fetched = cli("jobs", "results", job_id, "--endpoint", endpoint)
        assert fetched.returncode == 0, fetched.stderr
        results = [json.loads(x) for x in fetched.stdout.splitlines()]
        assert [r["custom_id"] for r in results] == [f"req-{i}" for i in range(N)]
        assert [r["token_ids"] for r in results] == expected
        assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 48 for r in results)
        assert items[2].generate.HasField("seed")  # sampled without a seed: it got one at submission
        shown = cli("jobs", "status", job_id, "--endpoint", endpoint)
        assert f"{job_id}  completed  {N}/{N} done" in shown.stdout
    finally:
        cluster.close()
