"""A client in another language: the Node example in clients/node streams the same text the Python SDK gets."""

from __future__ import annotations

import subprocess

from shardline.client import Client


def test_node_client_streams_the_same_text(node_client, smollm2_cluster):
    coordinator, _ = smollm2_cluster
    with Client(coordinator.address, timeout=120) as client:
        client.wait_ready(timeout=120)
        expected = client.generate("The capital of France is", max_tokens=12, temperature=0)
    result = subprocess.run(["node", str(node_client), coordinator.address, "The capital of France is", "12"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert "12 tokens" in result.stderr or "FINISH_REASON_STOP" in result.stderr
