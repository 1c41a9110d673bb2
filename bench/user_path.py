"""Generation on the user's path: `coordinator launch` as a real subprocess (as `make run` starts it) and the
SDK (`shardline.client.AsyncClient`) in this process, against transformers `generate` in a process of its own
with torch's default threads (the threads each worker gets). Same prompts, greedy, exactly NEW new tokens on
both sides (`ignore_eos` here, `min_new_tokens` there; the counts are checked), interleaved rounds, medians.

    python bench/user_path.py [--rounds 3] [--variant NAME=LAUNCH_ARGS ...] [--profile DIR]

Each variant is a `coordinator launch` with extra arguments, and environment variables given as KEY=VALUE
among them (default: one variant, "launch", with none); all variants are started at once and measured in the
same interleaved rounds. For each run it also reads every stage's busy and bubble seconds (the workers'
/metrics, so launch gets `--metrics-port 0`) and the CPU seconds of the launch process, of its workers and of
this process. A variant with IN_PROCESS=1 among its words is the cluster as bench/generate.py runs it
(`LocalCluster` in this process; WORKERS=N). VENV=DIR among its words launches that virtual environment's
`coordinator` (another checkout's `make setup`: two commits measured in the same rounds).
`--in-process-baseline`: transformers also on a thread of this process, as bench/generate.py measures it.
`--profile DIR`: after the rounds, py-spy records every process of the first variant during three more
16-stream runs (speedscope files in DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    Baseline,
    cpu_seconds,
    first_token_seconds,
    free_port,
    generate_exactly,
    long_prompts,
    result,
    scrape,
    table,
)
from coordinator.cli.launcher import LocalCluster  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.store.models import ModelStore, default_store  # noqa: E402
from shardline.client import AsyncClient, Client  # noqa: E402

NEW = 64
CITIES = ["Paris", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Tokyo", "Madrid", "Berlin", "Vienna", "Lagos",
          "Quito", "Seoul", "Dublin", "Athens", "Nairobi"]
PROMPTS = [f"The history of the city of {c} began" for c in CITIES]
BUSY, BUBBLE = "shardline:stage_busy_seconds", "shardline:stage_bubble_seconds"


@dataclass
class Launched:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    endpoint: str = ""
    stages: list[tuple[str, str]] = field(default_factory=list)   # (layers, metrics url), in chain order
    worker_pids: list[int] = field(default_factory=list)

    def start(self, store: Path) -> None:
        port = free_port()
        # VENV=DIR among a variant's words: that install's coordinator (another commit, for an A/B in one run)
        venv_bin = Path(self.env["VENV"]) / "bin" if "VENV" in self.env else Path(sys.executable).parent
        command = [str(venv_bin / "coordinator"), "launch", "--store", str(store), "--port",
                   str(port), "--http-port", "0", "--metrics-port", "0", *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        cwd=ROOT, start_new_session=True, env={**os.environ, **self.env})
        assert self.process.stdout is not None
        urls: dict[str, str] = {}
        said: list[str] = []
        children: list[int] = []
        for line in self.process.stdout:
            said.append(line.rstrip())
            if m := re.match(r"metrics: worker (\S+) (\S+)", line):
                urls[m.group(1)] = m.group(2)
            if line.startswith("ready in"):
                children = [int(c) for c in
                            Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()]
            if children and len(urls) >= len(children):
                break
        else:
            raise RuntimeError("coordinator launch exited:\n" + "\n".join(said[-10:]))
        # keep reading what it says, so that a full pipe never blocks it
        threading.Thread(target=collections.deque, args=(self.process.stdout, 100), daemon=True).start()
        self.endpoint = f"127.0.0.1:{port}"
        self.worker_pids = children
        with Client(self.endpoint, timeout=60) as client:
            chain = sorted((w for w in client.cluster_status().workers if w.replica), key=lambda w: w.start_layer)
        self.stages = [(f"[{w.start_layer}, {w.end_layer})", urls[w.address]) for w in chain]
        print(f"{self.name}: {' '.join(f'{k}={v}' for k, v in self.env.items())} coordinator launch "
              f"{' '.join(self.args)} -> stages {[s for s, _ in self.stages]}", flush=True)

    def busy(self) -> list[dict[str, float]]:
        return [scrape(url, BUSY, BUBBLE) for _, url in self.stages]

    def cpu(self) -> tuple[float, float]:
        assert self.process is not None
        return cpu_seconds(self.process.pid), sum(cpu_seconds(p) for p in self.worker_pids)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # drains (nothing in flight), then stops every worker
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


class InProcess(Launched):
    """The cluster as bench/generate.py runs it: `LocalCluster` in this process (coordinator on this event loop),
    its workers as child processes; for comparison with the user's path."""

    cluster: LocalCluster | None = None

    async def start_here(self, store: Path) -> None:
        config = CoordinatorConfig(store=store, model="smollm2", workers=int(self.env.get("WORKERS", "3")),
                                   port=free_port(), micro_batch_groups=1, metrics_port=0)
        self.cluster = LocalCluster(config)
        await self.cluster.start()
        assert self.cluster.coordinator is not None
        replica = self.cluster.coordinator.fleet.replicas[0]
        urls = {p.address: p.metrics_url for p in self.cluster.processes}
        self.stages = [(f"[{s.start}, {s.end})", urls[w.address]) for w, s in zip(replica.assignment, replica.stages,
                                                                                   strict=True)]
        self.worker_pids = [p.process.pid for p in self.cluster.processes]
        self.endpoint = f"127.0.0.1:{config.port}"
        print(f"{self.name}: LocalCluster in the benchmark's process -> stages {[s for s, _ in self.stages]}",
              flush=True)

    def cpu(self) -> tuple[float, float]:
        return cpu_seconds(os.getpid()), sum(cpu_seconds(p) for p in self.worker_pids)


def baseline_run(baseline: Baseline, prompts: list[str]) -> tuple[float, int]:
    reply = baseline.call("generate", prompts=prompts, new=NEW)
    if reply["tokens"] != NEW * len(prompts):
        raise RuntimeError(f"transformers produced {reply['tokens']} tokens, not {NEW * len(prompts)}")
    return reply["seconds"], int(reply["tokens"])


async def measured(v: Launched, prompts: list[str]) -> dict[str, object]:
    busy0, (launch0, workers0), me0 = v.busy(), v.cpu(), cpu_seconds(os.getpid())
    seconds, tokens = await generate_exactly(v.endpoint, prompts, NEW)
    busy1, (launch1, workers1), me1 = v.busy(), v.cpu(), cpu_seconds(os.getpid())
    return {"rate": tokens / seconds, "seconds": seconds,
            "busy": [(b[BUSY] - a[BUSY]) / seconds for a, b in zip(busy0, busy1, strict=True)],
            "bubble": [(b[BUBBLE] - a[BUBBLE]) / seconds for a, b in zip(busy0, busy1, strict=True)],
            "cpu": ((launch1 - launch0) / seconds, (workers1 - workers0) / seconds, (me1 - me0) / seconds)}


async def profile(v: Launched, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    assert v.process is not None
    pids = {"launch": v.process.pid, **{f"stage{i}": p for i, p in enumerate(v.worker_pids)}}
    recorders = [subprocess.Popen([spy, "record", "-p", str(pid), "-d", "12", "-r", "50", "-f", "speedscope",
                                   "-o", str(out / f"{name}.json"), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]
    await asyncio.sleep(1)
    for _ in range(3):
        await generate_exactly(v.endpoint, PROMPTS, NEW)
    for r in recorders:
        r.wait(60)
    print(f"py-spy profiles of {', '.join(pids)} in {out}", flush=True)


class HereBaseline:
    """transformers in this process, run on a thread while the event loop goes on (bench/generate.py's way)."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, prompts: list[str]) -> tuple[float, int]:
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        began = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return time.perf_counter() - began, int(out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)


async def main(args: argparse.Namespace) -> None:
    store = args.store or default_store()
    if not ModelStore(store).has("smollm2"):
        subprocess.run([str(Path(sys.executable).parent / "coordinator"), "import", "smollm2", "--store", str(store)],
                       check=True)
    variants = []
    for name, _, launch_args in (v.partition("=") for v in (args.variant or ["launch="])):
        words = launch_args.split()
        env = dict(w.split("=", 1) for w in words if re.match(r"[A-Z_]+=", w))
        kind = InProcess if "IN_PROCESS=1" in words else Launched
        variants.append(kind(name, [w for w in words if not re.match(r"[A-Z_]+=", w)], env))
    baseline = Baseline(ModelStore(store).path("smollm2"))
    try:
        for v in variants:
            if isinstance(v, InProcess):
                await v.start_here(store)
            else:
                v.start(store)
        here = HereBaseline(ModelStore(store).path("smollm2")) if args.in_process_baseline else None
        cases = [("1 stream", PROMPTS[:1]), ("16 streams", PROMPTS)]
        for v in variants:  # warm up
            async with AsyncClient(v.endpoint, timeout=600) as client:
                await client.wait_ready(timeout=120)
            await generate_exactly(v.endpoint, PROMPTS[:2], NEW)
        baseline_run(baseline, PROMPTS[:2])
        runs: dict[tuple[str, str], list[dict[str, object]]] = {}
        ttft: dict[str, list[float]] = {}
        longs = long_prompts(args.rounds)  # a new one each round: no prefix a cache could reuse
        for r in range(args.rounds):  # interleaved: every side of every case in each round
            for case, prompts in cases:
                seconds, tokens = await asyncio.to_thread(baseline_run, baseline, prompts)
                runs.setdefault((case, "transformers"), []).append({"rate": tokens / seconds})
                if here is not None:
                    seconds, tokens = await asyncio.to_thread(here.generate, prompts)
                    runs.setdefault((case, "transformers, bench process"), []).append({"rate": tokens / seconds})
                for v in variants:
                    runs.setdefault((case, v.name), []).append(await measured(v, prompts))
                line = ", ".join(f"{n} {x[-1]['rate']:.1f}" for (c, n), x in runs.items() if c == case)
                print(f"round {r + 1}, {case}: {line} tok/s", flush=True)
            long_ids = longs[r]
            reply = await asyncio.to_thread(baseline.call, "prefill", batches=[[long_ids]])
            ttft.setdefault("transformers", []).append(reply["seconds"])
            for v in variants:
                ttft.setdefault(v.name, []).append(await first_token_seconds(v.endpoint, long_ids))
            print(f"round {r + 1}, time to first token: " + ", ".join(f"{n} {x[-1] * 1000:.0f} ms"
                                                                       for n, x in ttft.items()), flush=True)
        rows = []
        for case, _ in cases:
            base = statistics.median(float(x["rate"]) for x in runs[(case, "transformers")])  # type: ignore[arg-type]
            for v in variants:
                mine = runs[(case, v.name)]
                rate = statistics.median(float(x["rate"]) for x in mine)  # type: ignore[arg-type]
                mid = sorted(mine, key=lambda x: float(x["rate"]))[len(mine) // 2]  # type: ignore[arg-type]
                busy = " / ".join(f"{b:.2f}" for b in mid["busy"])  # type: ignore[attr-defined]
                bubble = " / ".join(f"{b:.2f}" for b in mid["bubble"])  # type: ignore[attr-defined]
                cpu = " / ".join(f"{c:.2f}" for c in mid["cpu"])  # type: ignore[attr-defined]
                rows.append([case, v.name, f"{base:.1f} tok/s", f"{rate:.1f} tok/s", f"{rate / base:.2f}x", busy,
                             bubble, cpu])
                target = ">= 0.9x" if case == "1 stream" else ">= 0.8x"
                result("user path", f"{case}, {v.name}", f"{base:.1f} tok/s", f"{rate:.1f} tok/s",
                       f"{rate / base:.2f}x", target)
        base_ttft = statistics.median(ttft["transformers"])
        for v in variants:
            mine_ttft = statistics.median(ttft[v.name])
            rows.append([f"time to first token, {len(long_ids)} tokens", v.name,
                         f"{base_ttft * 1000:.0f} ms prefill (logits_to_keep=1)", f"{mine_ttft * 1000:.0f} ms",
                         f"{mine_ttft / base_ttft:.2f}x the time", "", "", ""])
            result("user path", f"time to first token, {len(long_ids)} tokens, {v.name}", f"{base_ttft * 1000:.0f} ms",
                   f"{mine_ttft * 1000:.0f} ms", f"{mine_ttft / base_ttft:.2f}x the time", "<= 1.1x")
        if here is not None:
            for case, _ in cases:
                rate = statistics.median(float(x["rate"]) for x in runs[(case, "transformers, bench process")])  # type: ignore[arg-type]
                print(f"{case}: transformers on a thread of the benchmark's process (as bench/generate.py runs it): "
                      f"{rate:.1f} tok/s")
        for v in variants:
            print(f"{v.name}: stages {', '.join(s for s, _ in v.stages)}")
        print(table(["case", "cluster", "transformers (own process)", "shardline via launch + SDK", "ratio",
                     "busy per stage (of wall)", "bubble per stage", "CPU cores: launch / workers / SDK process"],
                    rows))
        if args.profile:
            await profile(variants[0], args.profile)
    finally:
        for v in variants:
            if isinstance(v, InProcess) and v.cluster is not None:
                await v.cluster.stop()
            else:
                v.stop()
        baseline.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", help="NAME=ARGS for coordinator launch (repeatable)")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--in-process-baseline", action="store_true", help="also transformers on a thread of this "
                        "process, as bench/generate.py measures it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends it: still stop the clusters
    asyncio.run(main(parser.parse_args()))
