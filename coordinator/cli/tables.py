"""The tables `coordinator status` and `coordinator plan` print, as lines: each worker (state, memory, load),
where each computes, each deployment with its replicas, and each stage of a replica's plan."""

from __future__ import annotations

from typing import Any


def worker_lines(workers: list[Any]) -> list[str]:
    """`status`'s tables: each worker (a lost one says so, not a stale heartbeat), then each stage's load."""
    lines = [f"{'worker':<22} {'state':<10} {'layers':<10} {'weights':>9} {'RSS':>9} {'offered':>9} "
             f"{'sessions':>8} {'KV cache':>9} {'heartbeat':>9}"]
    for w in workers:
        layers = f"[{w.start_layer}, {w.end_layer})" if w.end_layer else "-"
        if w.state == "lost" or not w.rss_bytes:  # no answer to the status call: nothing measured to show
            measured = f"{'-':>9} {'-':>9} {w.memory_budget_bytes / 2**20:>5.0f} MiB {'-':>8} {'-':>9}"
        else:
            measured = (f"{w.weight_bytes / 2**20:>5.0f} MiB {w.rss_bytes / 2**20:>5.0f} MiB "
                        f"{w.memory_budget_bytes / 2**20:>5.0f} MiB {w.sessions:>8} "
                        f"{w.kv_cache_bytes / 2**20:>5.1f} MiB")
        heartbeat = f"{'lost':>9}" if w.state == "lost" else f"{w.last_heartbeat_age_ms / 1000:>7.1f} s"
        lines.append(f"{w.address:<22} {w.state:<10} {layers:<10} {measured} {heartbeat}"
                     + (f"  {w.last_error}" if w.last_error else ""))
    lines.append(f"\n{'stage':<22} {'busy':>9} {'idle':>9} {'busy %':>7} {'queue':>6} {'in':>10} {'out':>10} "
                 f"{'tokens/s':>9}")
    for w in workers:
        if w.state == "lost":
            continue
        up = w.busy_ms + w.idle_ms
        lines.append(f"{w.address:<22} {w.busy_ms / 1000:>7.1f} s {w.idle_ms / 1000:>7.1f} s "
                     f"{100 * w.busy_ms / up if up else 0:>6.1f}% {w.queue_depth:>6} {w.bytes_in / 2**20:>6.1f} MiB "
                     f"{w.bytes_out / 2**20:>6.1f} MiB {w.tokens_per_second:>9.1f}")
    return lines + device_lines(workers)


def device_lines(workers: list[Any]) -> list[str]:
    """`status`'s device table: where each worker computes, in what dtype, and its device memory (a CPU
    worker's: the host's RAM); none when no worker said (older workers)."""
    shown = [w for w in workers if getattr(w, "device", "")]
    if not shown:
        return []
    lines = [f"\n{'worker':<22} {'device':<8} {'dtype':<9} {'engine':<9} {'free / total memory':>21}  name"]
    for w in shown:
        memory = (f"{w.device_memory_free_bytes / 2**30:>6.1f} / {w.device_memory_total_bytes / 2**30:>6.1f} GiB"
                  if w.device_memory_total_bytes else "-")
        lines.append(f"{w.address:<22} {w.device:<8} {w.dtype or '-':<9} {w.engine or 'torch':<9} {memory:>21}  "
                     f"{w.device_name}")
    return lines


def plan_lines(stages: Any, explained: bool) -> list[str]:
    """`coordinator plan`'s table: each stage's worker and layers; explained, why (measured and predicted)."""
    head = f"  {'worker':<22} {'layers':<10}"
    if explained:
        head += (f" {'s/layer':>9} {'threads':>7} {'compute':>9} {'hop':>9} {'stage':>9} {'RTT':>9} "
                 f"{'bandwidth':>12} {'weights':>11} {'offered':>11}")
    lines = [head] if stages else []
    for p in stages:
        line = f"  {p.worker:<22} {f'[{p.start_layer}, {p.end_layer})':<10}"
        if explained:
            measured = p.seconds_per_layer > 0
            spl = f"{p.seconds_per_layer * 1000:>6.2f} ms" if measured else f"{'-':>9}"
            bandwidth = f"{p.bandwidth_bytes_per_s / 2**20:>7.0f} MiB/s" if p.bandwidth_bytes_per_s else f"{'-':>12}"
            def ms(seconds: float, measured: bool = measured) -> str:
                return f"{seconds * 1000:>6.2f} ms" if measured else f"{'-':>9}"

            line += (f" {spl} {p.threads or '-':>7} {ms(p.compute_s)} {ms(p.hop_s)} "
                     f"{ms(p.compute_s + p.hop_s)} {ms(p.rtt_s)} {bandwidth} "
                     f"{p.weight_bytes / 2**20:>7.1f} MiB {p.memory_budget_bytes / 2**20:>7.0f} MiB")
        lines.append(line)
    return lines


def deployment_lines(status: Any, events: int = 5) -> list[str]:
    """`coordinator status`'s deployments section: each deployment (the default marked), its autoscaling
    bounds, its replicas (state, chain of workers, running/queued streams, requests served) and its last
    `events` scaling and loading events."""
    lines: list[str] = []
    for d in status.deployments:
        head = f"{d.name}@{d.version}{' (default)' if d.is_default else ''}: {d.state}"
        if d.source and d.source != d.name:
            head += f"; from {d.source}"
        if d.max_replicas:
            head += f"; autoscaling {d.min_replicas}..{d.max_replicas} replicas, target queue {d.target_queue:g}"
        lines += ["", head]
        if d.replicas:
            width = max(22, *(len(r.name) for r in d.replicas))
            lines.append(f"  {'replica':<{width}} {'state':<12} {'running':>7} {'queued':>6} {'requests':>8}  workers")
            for r in d.replicas:
                state = r.state + (" (draining)" if r.draining else "")
                chain = " -> ".join(r.workers) or "-"
                extra = (f"  {r.recoveries} recoveries" if r.recoveries else "") + (f"  {r.message}" if r.message
                                                                                     else "")
                lines.append(f"  {r.name:<{width}} {state:<12} {r.running:>7} {r.queued:>6} {r.requests:>8}  "
                             f"{chain}{extra}")
        else:
            lines.append("  no replicas")
        if d.events:
            lines.append("  events:")
            lines += [f"    {event}" for event in d.events[-events:]]
    return lines
