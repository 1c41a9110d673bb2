"""guidellm, the real package, unchanged, runs a synchronous and a concurrent benchmark against `coordinator launch`
(issue 30.7's must-show): zero errored requests, every request completed. Only what it needs offline is given:
the tokenizer's local path (no hub here) and a bounded request count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_fleet_cli import Launch
from tests.e2e.test_join_and_generate import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def launched(smollm2_store):
    http = free_port()
    launch = Launch(smollm2_store, "--model", "smollm2", "--http-port", str(http))
    try:
        assert launch.serving.wait(180) and launch.process.poll() is None, launch.output
        yield launch, f"http://127.0.0.1:{http}"
    finally:
        launch.process.terminate()
        launch.process.wait(60)


@pytest.mark.parametrize(("profile", "count"), [("kind=synchronous", 4), ("kind=concurrent,streams=4", 12)])
def test_guidellm_benchmarks_launch_with_no_errored_request(launched, smollm2_store, tmp_path: Path, profile, count):
    launch, target = launched
    report = tmp_path / "report.json"
    guidellm = Path(sys.executable).parent / "guidellm"
    done = subprocess.run(
        [str(guidellm), "run", "--backend", f"kind=openai_http,target={target}", "--profile", profile,
         "--constraint", f"kind=max_requests,count={count}",
         "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=16",
         "--tokenizer", f"kind=hf_auto,model={smollm2_store.path('smollm2')}",
         "--output", f"kind=json,path={report}", "--disable-console-interactive"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": count, "errored": 0, "incomplete": 0, "total": count}, totals
    assert launch.process.poll() is None
