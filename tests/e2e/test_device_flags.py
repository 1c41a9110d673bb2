"""`shard-worker serve` refuses, at start and in one line, a device, dtype or engine it cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shard_worker.engine import deepspeed_installed


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shard_worker.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "listening" not in result.stdout
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_cuda_on_a_machine_without_one_exits_1_naming_what_torch_sees():
    line = one_line_error(serve("--device", "cuda:0"))
    assert "--device cuda:0: there is no such device" in line and "sees 0 CUDA devices" in line
    assert ("built without CUDA" in line) == (torch.version.cuda is None)


@pytest.mark.skipif(deepspeed_installed(), reason="deepspeed is installed here")
def test_deepspeed_without_the_extra_exits_1_naming_it():
    line = one_line_error(serve("--engine", "deepspeed"))
    assert "pip install 'shardline[deepspeed]'" in line
