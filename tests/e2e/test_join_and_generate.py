"""As a user runs it: a coordinator, two workers started on their own that join it, and `coordinator
generate` printing what transformers' greedy generation prints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardline.client import Client

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_workers_join_and_cli_generate_matches_transformers(smollm2_store):
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    env = {**os.environ, "SHARDLINE_STORE": str(smollm2_store.root)}
    processes = [subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--workers", "2", "--port",
                                   str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "shard_worker.cli", "serve", "--port", "0", "--coordinator", endpoint,
                 "--log-level", "WARNING"], stdout=subprocess.DEVNULL))
        with Client(endpoint, timeout=30) as client:
            client.wait_ready(timeout=180)
            status = client.cluster_status()
        assert [(w.start_layer, w.end_layer) for w in status.workers][0][0] == 0
        assert len(status.workers) == 2 and all(w.state == "ready" for w in status.workers)

        result = subprocess.run([sys.executable, "-m", "coordinator.cli", "generate", "The capital of France is",
                                 "--max-tokens", "16", "--temperature", "0", "--endpoint", endpoint],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        path = smollm2_store.path("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        assert result.stdout == tokenizer.decode(out, skip_special_tokens=True) + "\n"
        assert "Paris" in result.stdout
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(10)
