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
