"""TLS for every shardline link: the files of a certificates directory, server credentials that reload when
those files change, and channel credentials for nodes and for clients.

A certificates directory (made by `coordinator certs ...`, laid out as CockroachDB lays out its own):

    ca.crt                the cluster's CA certificate: every node and client trusts it
    ca.key                the CA's key: only on the machine that creates certificates, never on a node
    node.crt, node.key    a node's certificate (common name "node", the host names it serves as SANs):
                          it serves TLS with it, and presents it as a client on the cluster's internal links
    client.NAME.crt/.key  a client certificate (common name NAME) for the public API

The files are checked with the standard library's `ssl` (a certificate that does not parse, or a key that is
not the certificate's, is refused with the file's name), so a client never needs more than grpcio.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
# the HTTPS gateway's own certificate (server authentication only: it can never pass for a node), apart from
# the node key, so that the public edge holds no key that internal links trust (`coordinator certs create-server`)
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
SERVER_NAME = "https"
NODE_NAME = "node"  # the common name of every node certificate: what internal RPCs require


def client_files(name: str) -> tuple[str, str]:
    return f"client.{name}.crt", f"client.{name}.key"


class TLSFilesError(ValueError):
    """A certificates directory that cannot be used: missing files, PEM that does not parse, a key that
    does not match its certificate. The message names the file; it never contains key material."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSFilesError(f"{path} does not exist (create it with `coordinator certs ...`)") from None
    except OSError as exc:
        raise TLSFilesError(f"{path} cannot be read: {exc.strerror}") from None


def check_ca(path: Path) -> bytes:
    data = _read(path)
    try:
        ssl.create_default_context(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TLSFilesError(f"{path} is not a PEM certificate ({exc.__class__.__name__})") from None
    return data


def check_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """The certificate chain and its key, checked to parse and to belong together. `ssl` checks files by
    path, so the bytes returned are those read before and after the check, unchanged (a rotation that
    lands meanwhile is read again)."""
    for _ in range(5):
        cert_bytes, key_bytes = _read(cert), _read(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            reason = "the key is not this certificate's" if "KEY_VALUES_MISMATCH" in str(exc) else \
                "a certificate chain or key that does not parse"
            raise TLSFilesError(f"{cert} / {key}: {reason}") from None
        except OSError as exc:
            raise TLSFilesError(f"{cert} / {key} cannot be read: {exc.strerror}") from None
        if (_read(cert), _read(key)) == (cert_bytes, key_bytes):
            return cert_bytes, key_bytes
    raise TLSFilesError(f"{cert} / {key} kept changing while they were read")


@dataclass(frozen=True)
class NodeFiles:
    """A node's three files, read and checked together."""

    ca: bytes
    cert: bytes
    key: bytes = field(repr=False)

    @classmethod
    def read(cls, certs_dir: Path) -> NodeFiles:
        ca = check_ca(certs_dir / CA_CERT)
        cert, key = check_pair(certs_dir / NODE_CERT, certs_dir / NODE_KEY)
        return cls(ca, cert, key)


def file_signature(path: Path) -> tuple[int, ...]:
    """What changes when a file is written or replaced (a rename gives a new inode and ctime)."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1,)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


def _signature(certs_dir: Path, names: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(file_signature(certs_dir / name) for name in names)


NODE_FILES = (CA_CERT, NODE_CERT, NODE_KEY)


class _Reloading:
    """A node's files, read again when one changes (checked on each use). Every user (each server's
    fetcher, each new channel) compares the generation it last used with the current one, so a rotation
    reaches all of them, not only the first to notice."""

    def __init__(self, certs_dir: Path) -> None:
        self.certs_dir = certs_dir
        self.lock = threading.Lock()
        self.files = NodeFiles.read(certs_dir)
        self.generation = 0
        self.seen = _signature(certs_dir, NODE_FILES)
        self.refused: tuple[tuple[int, ...], ...] | None = None  # files that changed but cannot be used

    def current(self) -> tuple[int, NodeFiles]:
        """The generation and files in use: new ones when the files changed and are usable; else the old
        ones (a rotation caught half-written is read again on the next use)."""
        with self.lock:
            now = _signature(self.certs_dir, NODE_FILES)
            if now != self.seen:
                try:
                    self.files = NodeFiles.read(self.certs_dir)
                except TLSFilesError as exc:
                    if now != self.refused:  # one line per state of the files
                        self.refused = now
                        log.error("the certificates in %s changed but cannot be used (%s); keeping the "
                                  "previous ones", self.certs_dir, exc)
                else:
                    self.seen, self.generation = now, self.generation + 1
                    log.info("reloaded the node certificate from %s", self.certs_dir)
            return self.generation, self.files


_RELOADING: dict[Path, _Reloading] = {}
_RELOADING_LOCK = threading.Lock()


def _reloading(certs_dir: Path) -> _Reloading:
    key = certs_dir.resolve()
    with _RELOADING_LOCK:
        found = _RELOADING.get(key)
        if found is None:
            found = _RELOADING[key] = _Reloading(key)
        return found


def node_files(certs_dir: Path) -> NodeFiles:
    """The node's files as they are now (read again when they changed)."""
    return _reloading(certs_dir).current()[1]


def server_credentials(certs_dir: Path, require_client_cert: bool) -> grpc.ServerCredentials:
    """TLS with the node certificate; with `require_client_cert`, only callers whose certificate the
    cluster CA signed complete the handshake. The files are read again on the first handshake after they
    change, so a rotated certificate serves new connections without a restart."""
    r = _reloading(certs_dir)
    given, files = r.current()
    served = [given]  # the generation this server's gRPC core holds

    def configuration(files: NodeFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(files.key, files.cert)], root_certificates=files.ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            generation, files = r.current()
            if generation == served[0]:
                return None
            new = configuration(files)
            served[0] = generation
            return new
        except Exception:  # noqa: BLE001 - called by gRPC's core for each handshake: never raise there
            log.exception("checking %s for new certificates failed", certs_dir)
            return None

    return grpc.dynamic_ssl_server_credentials(configuration(files), fetch,  # type: ignore[arg-type]
                                               require_client_authentication=require_client_cert)


def node_channel_credentials(certs_dir: Path) -> grpc.ChannelCredentials:
    """A node's credentials as a client of another node: the cluster CA, and its node certificate. Read as
    they are now: channels opened after a rotation present the new certificate."""
    files = node_files(certs_dir)
    return grpc.ssl_channel_credentials(files.ca, files.key, files.cert)


@dataclass(frozen=True)
class ClientTLS:
    """TLS for a client of the public API: the CA to trust (None = the system's roots), and optionally a
    client certificate and its key (files)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""  # the host name to expect in the server's certificate (default: the target's)

    @classmethod
    def from_certs_dir(cls, certs_dir: str | Path, client_name: str = "") -> ClientTLS:
        d = Path(certs_dir)
        cert, key = client_files(client_name) if client_name else (None, None)
        return cls(d / CA_CERT, d / cert if cert else None, d / key if key else None)

    def credentials(self) -> grpc.ChannelCredentials:
        ca = check_ca(self.ca_file) if self.ca_file else None
        if (self.cert_file is None) != (self.key_file is None):
            raise TLSFilesError("a client certificate needs its key, and a key its certificate")
        cert = key = None
        if self.cert_file is not None and self.key_file is not None:
            cert, key = check_pair(self.cert_file, self.key_file)
        return grpc.ssl_channel_credentials(ca, key, cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def write_private(path: Path, data: bytes) -> None:
    """Write a file that only its owner may read (0600 from the start, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
