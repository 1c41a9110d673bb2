"""`make bench`: every benchmark, one after another (each in a process of its own, its output shown as it
runs), then one table of their results. A benchmark reports a row with `bench.common.result` (a RESULT line);
one that reports none gets a row saying whether it ran.

    python bench/all.py [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, table  # noqa: E402

# (name, arguments, arguments with --quick)
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("hop", ["bench/hop.py"], ["bench/hop.py"]),
    ("parameters", ["bench/parameters.py"], ["bench/parameters.py"]),
    ("memory", ["bench/memory.py"], ["bench/memory.py"]),
    ("generate", ["bench/generate.py", "--groups", "1"], ["bench/generate.py", "--groups", "1"]),
    ("user_path", ["bench/user_path.py"], ["bench/user_path.py", "--rounds", "1"]),
    ("pipeline", ["bench/pipeline.py"], ["bench/pipeline.py", "--rounds", "1", "--micro-batches", "8"]),
    ("embeddings", ["bench/embeddings.py"], ["bench/embeddings.py", "--rounds", "1"]),
    ("recovery", ["bench/recovery.py"], ["bench/recovery.py"]),
    ("prefix", ["bench/prefix.py"], ["bench/prefix.py", "--rounds", "1"]),
    ("compression", ["bench/compression.py"], ["bench/compression.py", "--repeats", "1"]),
]


def run(name: str, args: list[str]) -> tuple[int, float, list[list[str]]]:
    print(f"\n=== {name}: python {' '.join(args)}", flush=True)
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    rows = []
    for line in process.stdout:
        if line.startswith("RESULT "):
            rows.append([str(x) for x in json.loads(line.removeprefix("RESULT "))])
        else:
            print(line, end="", flush=True)
    return process.wait(), time.perf_counter() - began, rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", choices=[b[0] for b in BENCHMARKS])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a check, not for figures)")
    args = parser.parse_args()
    rows: list[list[str]] = []
    failed = 0
    for name, full, quick in BENCHMARKS:
        if args.only and name not in args.only:
            continue
        code, seconds, reported = run(name, quick if args.quick else full)
        failed += code != 0
        rows += reported or [[name, "(no summary row: see its output above)", "", "", "", ""]]
        if code:
            rows.append([name, f"FAILED (exit code {code})", "", "", "", ""])
        print(f"=== {name}: exit {code} in {seconds:.0f} s", flush=True)
    print("\n" + table(["benchmark", "case", "baseline (same run)", "shardline", "ratio", "target"], rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
