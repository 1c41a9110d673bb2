"""Message size limits, in one place for the SDK and every server (no heavy imports: the SDK uses it).

- Internal links (worker to worker, the registry's clients, the parameter service) carry packed hidden
  states and weight chunks: MAX_MESSAGE_BYTES each way.
- The coordinator's public port receives at most `CoordinatorConfig.max_request_bytes` (4 MiB by default;
  gRPC answers a larger message with RESOURCE_EXHAUSTED before any handler runs) and sends at most
  MAX_RESPONSE_BYTES, which the SDK's channels accept.
"""

from __future__ import annotations

import ipaddress
import re

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# the largest response the coordinator sends: an Infer of 1024 inputs (the default max_infer_batch) of
# embeddings up to 16384 floats wide; an Infer whose result would be larger is refused before it runs
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024

MAX_ADDRESS_CHARS = 300  # host:port, the longest DNS name and a port
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def is_host_port(address: str) -> bool:
    """host:port with a host name, an IPv4 address or an IPv6 one (bracketed or not), and a port 1-65535."""
    host, _, port = address.rpartition(":")
    if len(address) > MAX_ADDRESS_CHARS or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None


def is_loopback(host: str) -> bool:
    """An address only this machine reaches: 'localhost' or a loopback IP (never a name that merely starts
    like one: '127.attacker.example' is not)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def default_memory_budget() -> int:
    """What a worker offers by default: 80% of the memory available now (a server role's default; psutil
    comes with the `server` extra, so it is imported here, not by the SDK)."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


# --worker-memory-mb bounds a CPU worker's whole process (issue 27.5): its runtime (Python, torch, gRPC), measured
# as the RSS once it listens, and a reserve for what no plan counts (connection buffers, allocator slack: 5% and
# 32 MiB) come off it; the rest is the shard's (weights, the measured step headroom, the KV cache:
# shard_worker/capacity.py)
MEMORY_RESERVE_FRACTION = 0.05
MEMORY_RESERVE_BYTES = 32 * 2**20  # and this much more: what grows with the process, not with the bound
RUNTIME_ESTIMATE_BYTES = 400 * 2**20  # a CPU worker's RSS once it listens (measured 360 MiB), for plans made
#                                       before any worker runs (`launch`'s preflight)
MIN_SHARD_BYTES = 16 * 2**20


def shard_share(limit_bytes: int, runtime_bytes: int = RUNTIME_ESTIMATE_BYTES) -> int:
    """The part of a worker process's bound its shard may use (0 when the runtime takes it all)."""
    return max(0, int(limit_bytes * (1 - MEMORY_RESERVE_FRACTION)) - MEMORY_RESERVE_BYTES - runtime_bytes)


def process_bound(shard_bytes: int, runtime_bytes: int = RUNTIME_ESTIMATE_BYTES) -> int:
    """The --worker-memory-mb, in bytes, under which a worker's shard gets `shard_bytes` (shard_share's inverse,
    rounded up to whole MiB)."""
    needed = (shard_bytes + MEMORY_RESERVE_BYTES + runtime_bytes) / (1 - MEMORY_RESERVE_FRACTION)
    return -(-int(needed + 1) // 2**20) * 2**20


class MemoryBoundTooSmall(ValueError):
    """--worker-memory-mb leaves the shard nothing once the runtime is counted."""


def shard_budget(limit_bytes: int, runtime_bytes: int) -> int:
    """What a worker whose process may use `limit_bytes`, of which its runtime takes `runtime_bytes`, offers
    its shard; ValueError, saying what to give, when that is less than MIN_SHARD_BYTES."""
    shard = shard_share(limit_bytes, runtime_bytes)
    if shard < MIN_SHARD_BYTES:
        least = process_bound(MIN_SHARD_BYTES, runtime_bytes) // 2**20
        raise MemoryBoundTooSmall(f"--worker-memory-mb {limit_bytes // 2**20} bounds the whole worker process, and its "
                         f"runtime alone (Python, torch, gRPC) takes {runtime_bytes / 2**20:.0f} MiB: give at "
                         f"least {least:.0f}, plus what its shard needs (weights and KV cache)")
    return shard
