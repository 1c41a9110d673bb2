"""Why a cluster does not answer, in one line a person can act on: nothing listens at the address, the
server speaks TLS and the caller does not (or the other way round), or the server's certificate is not signed
by the CA the caller trusts. gRPC reports all of these alike ("failed to connect", "Socket closed", or a
deadline), so the CLI and the SDK ask here: one TCP connection and at most two TLS handshakes, each bounded.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

TIMEOUT_S = 2.0


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> bool:
    """Whether a TLS handshake with host:port succeeds under `context`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def unreachable(target: str, ca_file: Path | None, uses_tls: bool, timeout_s: float = TIMEOUT_S) -> str:
    """The reason, or "" when none of the usual ones is it (then gRPC's own message stands)."""
    host, _, port_text = target.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        return (f"no shardline cluster answers at {target}, nothing listens there: start one (`coordinator "
                "launch`), or give its address with --endpoint HOST:PORT")
    except (OSError, ValueError):
        return ""
    anyone = ssl.create_default_context()
    anyone.check_hostname, anyone.verify_mode = False, ssl.CERT_NONE
    anyone.set_alpn_protocols(["h2"])
    speaks_tls = _handshake(host, port, anyone, timeout_s)
    if speaks_tls and not uses_tls:
        return (f"the cluster at {target} speaks TLS and this call does not: give its certificates directory "
                "(--certs-dir DIR, or the SDK's tls=DIR), the one with its ca.crt")
    if not speaks_tls and uses_tls:
        return f"the server at {target} speaks plaintext, not TLS: call it without --certs-dir (the SDK: tls=None)"
    if speaks_tls and ca_file is not None:
        trusting = ssl.create_default_context(cafile=str(ca_file))
        trusting.check_hostname = False  # the name is gRPC's to check; here, only who signed the certificate
        trusting.set_alpn_protocols(["h2"])
        if not _handshake(host, port, trusting, timeout_s):
            return (f"the cluster at {target} presents a certificate that {ca_file} did not sign: give the "
                    "certificates directory of that cluster")
    return ""
