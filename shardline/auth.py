"""Who may call what: the cluster's identity on internal links, API keys with roles on the public API, and
`Guard`, the server interceptor every shardline server installs to enforce both.

- Internal RPCs (a worker's whole ShardWorker service: LoadShard, UnloadShard, Forward, EndSession,
  GetStatus, SetPeers; the parameter service; the coordinator's WorkerRegistry) accept only the cluster:
  with TLS, a caller whose certificate the cluster CA signed for a node (common name "node"); without TLS, a
  caller that sends the shared cluster token. A server given neither serves them to anyone on its
  (loopback) address, as a development default.
- The public API (Generate, Infer, ListModels: role `client`; status and every operation that changes the
  cluster: role `admin`) takes `authorization: Bearer <key>` when the coordinator has an API keys file.
- Health and reflection stay open: probes and `grpcurl list` need no secret.

A refusal is UNAUTHENTICATED (no credentials, or wrong ones) or PERMISSION_DENIED (a known caller without
the right role), with a message saying what to give; keys, tokens and key material are never in a
message or a log line.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import inspect
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shardline.malformed import WrappedHandlers, handler_kind
from shardline.tls import NODE_NAME, NodeFiles, file_signature, node_channel_credentials, server_credentials

log = logging.getLogger(__name__)

TOKEN_HEADER = "shardline-cluster-token"
MAX_CREDENTIAL_BYTES = 512  # an authorization header or cluster token longer than this is refused unread
MAX_METADATA_BYTES = 8 * 1024  # a guarded call's metadata, all of it: more is refused before any check


class Access(enum.Enum):
    OPEN = "open"        # health, reflection
    CLUSTER = "cluster"  # the cluster's own processes
    CLIENT = "client"    # role client or admin
    ADMIN = "admin"      # role admin


ROLES = ("client", "admin")


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _unauthenticated(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


def _denied(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.PERMISSION_DENIED, message)


def read_token(path: Path) -> str:
    """A cluster token file: one line of printable ASCII, at least 16 characters."""
    try:
        token = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cluster token file {path} cannot be read as ASCII text: "
                         f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    if len(token) < 16 or len(token) > MAX_CREDENTIAL_BYTES or not token.isprintable() or " " in token:
        raise ValueError(f"cluster token file {path} must hold one token of 16 to {MAX_CREDENTIAL_BYTES} "
                         "printable characters without spaces")
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ClusterIdentity:
    """How the processes of one cluster recognize each other: certificates from the cluster CA (TLS on
    every link) or, without TLS, a shared token. Neither: internal RPCs are open (loopback development)."""

    certs_dir: Path | None = None
    token: str = field(default="", repr=False)

    @classmethod
    def from_files(cls, certs_dir: Path | None, token_file: Path | None) -> ClusterIdentity:
        """--certs-dir or --cluster-token-file, checked as they are read (ValueError naming the file)."""
        if certs_dir is not None and token_file is not None:
            raise ValueError("give --certs-dir (TLS) or --cluster-token-file (plaintext), not both")
        if certs_dir is not None:
            NodeFiles.read(certs_dir)
            return cls(certs_dir=certs_dir)
        return cls(token=read_token(token_file)) if token_file is not None else cls()

    @property
    def tls(self) -> bool:
        return self.certs_dir is not None

    @property
    def configured(self) -> bool:
        return self.certs_dir is not None or bool(self.token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every internal call sends (the token without TLS; nothing with it: the certificate speaks)."""
        return ((TOKEN_HEADER, self.token),) if self.token and not self.tls else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return node_channel_credentials(self.certs_dir) if self.certs_dir is not None else None

    def server_credentials(self, require_client_cert: bool = True) -> grpc.ServerCredentials | None:
        return server_credentials(self.certs_dir, require_client_cert) if self.certs_dir is not None else None

    def check(self, metadata: Mapping[str, str], auth: Mapping[str, list[bytes]]) -> None:
        """Raise AuthError unless the caller is one of the cluster's processes."""
        if self.tls:
            names = auth.get("x509_common_name") or []
            if not names:
                raise _unauthenticated("this RPC is for the cluster's own processes: connect with the node "
                                       "certificate of the cluster (the coordinator's --certs-dir)")
            if names != [NODE_NAME.encode()]:
                raise _denied("this RPC is for the cluster's own processes; the certificate presented is a "
                              "client's, not a node's")
            return
        if not self.token:
            return
        given = metadata.get(TOKEN_HEADER)
        if given is None:
            raise _unauthenticated("this RPC is for the cluster's own processes: send the cluster token "
                                   "(--cluster-token-file)")
        if len(given) > MAX_CREDENTIAL_BYTES or not hmac.compare_digest(given.encode("utf-8", "replace"),
                                                                        self.token.encode()):
            raise _unauthenticated("the cluster token is wrong: use the file the cluster was started with "
                                   "(--cluster-token-file)")


def describe(identity: ClusterIdentity) -> str:
    """How a server's internal RPCs are protected, for its start-up line (never the secret itself)."""
    if identity.tls:
        return f"mutual TLS with the certificates in {identity.certs_dir}"
    if identity.token:
        return "plaintext; internal RPCs need the cluster token"
    return "plaintext; internal RPCs open to any caller that can reach this address"


# ---- API keys ------------------------------------------------------------------------------------------

KEY_PREFIX = "sl_"


def hash_key(key: str) -> str:
    """Keys are random (32 bytes), so one SHA-256 is as good as a slow hash and keeps each call cheap."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyEntry:
    """One caller of the keys file: an API key (its SHA-256) or a client certificate (its common name)."""

    name: str
    role: str
    sha256: str                  # an API key's hash; empty for a certificate's entry
    max_streams: int = 0         # calls open at once (0: no limit) (coordinator/api/quotas.py)
    requests_per_s: float = 0.0  # calls started per second (0: no limit)
    tokens_per_min: float = 0.0  # prompt and generated tokens per minute (0: no limit)
    certificate: str = ""        # a client certificate's common name; empty for an API key's entry

    @property
    def id(self) -> str:
        """Whose jobs, caches and quota: never the name, which a new key may take after a revoke. A key's id
        comes from its hash (a new key is a new id); a certificate's is its common name (a renewed certificate
        keeps its jobs; to cut a name off, remove its entry)."""
        if self.certificate:
            return f"cert:{self.certificate}"
        return f"key:{self.sha256[:24]}" if self.sha256 else KEYLESS


KEYLESS = "keyless"  # the entry (and id) of callers without a key, where the keys file gives them a role


QUOTA_FIELDS = {"max_streams": (int, 1_000_000), "requests_per_s": (float, 1_000_000.0),
                "tokens_per_min": (float, 1e12)}


def _quotas(found: object, where: str) -> dict[str, float]:
    """A quota object's fields, checked: known names, whole numbers for max_streams, 0 .. a sane bound."""
    if not isinstance(found, dict):
        raise ValueError(f"{where}: quotas must be an object of {', '.join(QUOTA_FIELDS)}")
    out: dict[str, float] = {}
    for name, value in found.items():
        kind_bound = QUOTA_FIELDS.get(name)
        if kind_bound is None:
            raise ValueError(f"{where}: {name!r} is not a quota (quotas: {', '.join(QUOTA_FIELDS)})")
        kind, bound = kind_bound
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)) \
                or not 0 <= value <= bound:
            raise ValueError(f"{where}: {name} must be {'a whole number' if kind is int else 'a number'} from 0 "
                             f"(no limit) to {bound:g}, got {value!r}")
        out[name] = value
    return out


def parse_keys(text: str, source: str) -> dict[str, KeyEntry]:
    """An API keys file: {"keys": [{"name": ..., "role": "client"|"admin", and "sha256": hex (an API key) or
    "certificate": NAME (a client certificate's common name), and optionally "max_streams", "requests_per_s",
    "tokens_per_min"}, ...], "quotas": {"client": {...}, "admin": {...}}} (the quotas of each role, which a key's
    own fields override; coordinator/api/quotas.py). Keyed by "sha256:HEX" or "cert:NAME"."""
    try:
        data = json.loads(text) if text.strip() else {"keys": []}
    except json.JSONDecodeError as exc:
        raise ValueError(f"API keys file {source} is not JSON: {exc.msg} at line {exc.lineno}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'API keys file {source} must be {{"keys": [...]}}')
    role_quotas = data.get("quotas", {}) if isinstance(data, dict) else {}
    if not isinstance(role_quotas, dict) or any(r not in ROLES for r in role_quotas):
        raise ValueError(f"API keys file {source}: quotas must be an object keyed by role ({', '.join(ROLES)})")
    defaults = {role: _quotas(q, f"API keys file {source}: quotas.{role}") for role, q in role_quotas.items()}
    out: dict[str, KeyEntry] = {}
    keyless = data.get("keyless")
    if keyless is not None:
        if keyless not in ROLES:
            raise ValueError(f"API keys file {source}: keyless (the role of callers without a key) must be one of "
                             f"{', '.join(ROLES)}, got {keyless!r}; leave it out to refuse them")
        quota = defaults.get(keyless, {})
        out[KEYLESS] = KeyEntry(KEYLESS, keyless, "", int(quota.get("max_streams", 0)),
                                float(quota.get("requests_per_s", 0.0)), float(quota.get("tokens_per_min", 0.0)))
    names: set[str] = set()
    for i, e in enumerate(entries):
        where = f"API keys file {source}: entry {i}"
        if not isinstance(e, dict) or not {"name", "role"} <= set(e) or ("sha256" in e) == ("certificate" in e):
            raise ValueError(f"{where} needs name, role, and either sha256 (an API key) or certificate (a client "
                             "certificate's common name)")
        name, role = str(e["name"]), str(e["role"])
        if not name:
            raise ValueError(f"{where} has an empty name")
        if role not in ROLES:
            raise ValueError(f"{where}: key {name!r} has role {role!r}; roles are {', '.join(ROLES)}")
        if name == KEYLESS:
            raise ValueError(f"{where}: the name {KEYLESS!r} means callers without a key; choose another")
        if name in names:  # jobs and caches belong to a caller: two entries of one name would be confused
            raise ValueError(f"{where} reuses the name {name!r}; every key needs a name of its own")
        names.add(name)
        digest, certificate = str(e.get("sha256", "")).lower(), str(e.get("certificate", ""))
        if "sha256" in e and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise ValueError(f"{where}: key {name!r}: sha256 must be 64 hex digits")
        if "certificate" in e and not CERT_NAME.fullmatch(certificate):
            raise ValueError(f"{where}: key {name!r}: certificate must be a client certificate's common name "
                             "(letters, digits, '.', '_', '-'; as given to `coordinator certs create-client`)")
        if certificate == NODE_NAME:
            raise ValueError(f"{where}: key {name!r}: {NODE_NAME!r} is the cluster's own certificate, not a "
                             "client's")
        slot = f"sha256:{digest}" if digest else f"cert:{certificate}"
        if slot in out:
            raise ValueError(f"{where} ({name!r}) has the same {'key' if digest else 'certificate'} as "
                             f"{out[slot].name!r}")
        own = _quotas({k: v for k, v in e.items() if k in QUOTA_FIELDS}, f"API keys file {source}: key {name!r}")
        quota = {**defaults.get(role, {}), **own}
        out[slot] = KeyEntry(name, role, digest, int(quota.get("max_streams", 0)),
                             float(quota.get("requests_per_s", 0.0)), float(quota.get("tokens_per_min", 0.0)),
                             certificate)
    return out


CERT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ApiKeys:
    """The keys of an API keys file, read again (at most once a second) when the file changes: a key added
    or revoked takes effect without a restart. A file that becomes unreadable keeps the last good keys."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.keys = parse_keys(path.read_text(), str(path))
        self.seen = self._signature()
        self.checked = time.monotonic()

    def _signature(self) -> tuple[int, ...]:
        return file_signature(self.path)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self.checked < 1.0:
            return
        with self.lock:
            self.checked = now
            sig = self._signature()
            if sig == self.seen:
                return
            try:
                self.keys = parse_keys(self.path.read_text(), str(self.path))
                log.info("reloaded %d API keys from %s", len(self.keys), self.path)
            except (OSError, ValueError) as exc:
                log.error("API keys file changed but cannot be used (%s); keeping the previous keys", exc)
            self.seen = sig

    def role_of(self, key: str) -> KeyEntry | None:
        self._refresh()
        return self.keys.get(f"sha256:{hash_key(key)}")

    def of_certificate(self, auth: Mapping[str, list[bytes]]) -> KeyEntry | None:
        """The entry of the client certificate a TLS peer presented (its common name); None if none is named."""
        names = auth.get("x509_common_name") or []
        if len(names) != 1:
            return None
        self._refresh()
        return self.keys.get(f"cert:{names[0].decode('utf-8', 'replace')}")

    def keyless(self) -> KeyEntry | None:
        """The entry of callers without a key (the file's "keyless" role); None where they have no access."""
        self._refresh()
        return self.keys.get(KEYLESS)

    def caller(self, metadata: Mapping[str, str], auth: Mapping[str, list[bytes]]) -> KeyEntry | None:
        """Who calls: the API key it sends, else the client certificate it presented (a certificate the file
        does not name has no access, the node's included), else a keyless caller (the file's "keyless" role);
        None if it has no access (AuthError for a malformed authorization header). Keyless callers share one
        identity: their jobs, caches and quota are one tenant's, as every caller's are without a keys file."""
        if "authorization" in metadata:
            return self.role_of(bearer(metadata))
        if auth.get("x509_common_name"):  # a certificate speaks for its caller: its entry, or no access
            return self.of_certificate(auth)
        return self.keyless()


def bearer(metadata: Mapping[str, str]) -> str:
    """The key of an `authorization: Bearer <key>` header; AuthError if absent or malformed."""
    value = metadata.get("authorization")
    if value is None:
        raise _unauthenticated("this API needs a key: send the metadata 'authorization: Bearer <key>' "
                               "(the SDK's api_key=, the CLI's --api-key)")
    if len(value) > MAX_CREDENTIAL_BYTES:
        raise _unauthenticated(f"the authorization metadata is {len(value)} bytes; an API key is far shorter")
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthenticated("the authorization metadata must be 'Bearer <key>'")
    return key.strip()


# ---- the interceptor -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rules:
    """Which access each method needs: by full method ('/pkg.Service/Method') first, then by service;
    anything not named (health, reflection) is open."""

    services: Mapping[str, Access]
    methods: Mapping[str, Access] = field(default_factory=dict)

    def access(self, method: str) -> Access:
        found = self.methods.get(method)
        if found is not None:
            return found
        return self.services.get(method.split("/")[1] if method.count("/") >= 2 else "", Access.OPEN)


def _metadata(items: Any) -> dict[str, str]:
    """A call's text metadata (first value of each key); AuthError if it is oversized."""
    out: dict[str, str] = {}
    size = 0
    for key, value in items or ():
        size += len(key) + len(value)
        if isinstance(value, str):
            out.setdefault(key.lower(), value)
    if size > MAX_METADATA_BYTES:
        raise _unauthenticated(f"the call's metadata is {size} bytes; this server reads at most "
                               f"{MAX_METADATA_BYTES} on an authenticated RPC")
    return out


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[misc,type-arg]
    """Checks every call against `rules`. What the metadata decides (a token, an API key, oversized
    metadata) is decided before the handler is chosen: a refused call's request is never parsed, nor (for a
    unary request) waited for. What needs the peer's certificate is checked as the handler starts."""

    def __init__(self, rules: Rules, cluster: ClusterIdentity, api_keys: ApiKeys | None = None,
                 hint: Callable[[str], str] | None = None) -> None:
        self.rules, self.cluster, self.api_keys = rules, cluster, api_keys
        self.hint = hint or (lambda method: "")
        self._wrapped = WrappedHandlers(lambda method, handler: self._wrap(method, handler, self.check_peer))
        self._by_certificate = WrappedHandlers(lambda method, handler: self._wrap(method, handler,
                                                                                 self.check_certificate))
        self._last_log: dict[tuple[str, str], float] = {}

    def check_metadata(self, method: str, access: Access, items: Any) -> bool:
        """Raise AuthError for what the metadata decides; True when the caller's client certificate decides
        (no key sent, a keys file, TLS): checked as the handler starts, once the peer is known."""
        metadata = _metadata(items)
        if access is Access.CLUSTER:
            if not self.cluster.tls:
                self._cluster_check(method, metadata, {})
            return False
        if self.api_keys is None:
            return False
        if "authorization" in metadata:
            entry = self.api_keys.role_of(bearer(metadata))
        elif self.cluster.tls:
            return True
        else:
            entry = self.api_keys.keyless()
            if entry is None:
                bearer(metadata)  # raises: "this API needs a key ..."
        self._check_role(method, access, entry)
        return False

    @staticmethod
    def _check_role(method: str, access: Access, entry: KeyEntry | None) -> None:
        if entry is None:
            raise _unauthenticated("the API key is not known to this coordinator (revoked, or from another "
                                   "cluster)")
        if access is Access.ADMIN and entry.role != "admin":
            call = method.rsplit("/", 1)[-1]
            if entry.id == KEYLESS:
                raise _unauthenticated(f"{call} needs an API key with role admin: send 'authorization: Bearer "
                                       "<key>' (the CLI's --api-key or $SHARDLINE_API_KEY; `coordinator launch` "
                                       "prints the file that holds its admin key)")
            raise _denied(f"{call} needs an API key with role admin; key {entry.name!r} has role {entry.role}")

    def check_certificate(self, method: str, context: Any) -> None:
        """A keyless caller over TLS: its client certificate's entry in the keys file gives its role; a
        certificate the file does not name (or none) has no access."""
        keys = self.api_keys
        entry = keys.caller({}, context.auth_context()) if keys is not None else None
        if entry is None:
            raise _unauthenticated("this API needs a key (send 'authorization: Bearer <key>') or a client "
                                   "certificate the API keys file names (an entry with \"certificate\": its "
                                   "common name)")
        self._check_role(method, self.rules.access(method), entry)

    def _cluster_check(self, method: str, metadata: Mapping[str, str], auth: Mapping[str, list[bytes]]) -> None:
        try:
            self.cluster.check(metadata, auth)
        except AuthError as exc:
            hint = self.hint(method)
            raise AuthError(exc.code, exc.message + (f" ({hint})" if hint else "")) from None

    async def _refuse(self, method: str, exc: AuthError, context: Any) -> None:
        key = (method, str(exc.code))
        now = time.monotonic()
        if now - self._last_log.get(key, float("-inf")) >= 1.0:  # one line a second per method and code
            self._last_log[key] = now
            log.warning("%s from %s refused: %s", method, context.peer(), exc.message)
        await context.abort(exc.code, exc.message)

    def _refusing(self, method: str, exc: AuthError) -> Any:
        """A handler that answers `exc` at once; as a streaming request it reads nothing of the request."""
        async def refuse(requests: Any, context: Any) -> AsyncIterator[Any]:
            await self._refuse(method, exc, context)
            yield  # pragma: no cover - abort raised

        return grpc.stream_stream_rpc_method_handler(refuse)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        method = str(details.method)
        access = self.rules.access(method)
        if access is Access.OPEN:
            return await continuation(details)
        try:
            by_certificate = self.check_metadata(method, access, details.invocation_metadata)
        except AuthError as exc:
            return self._refusing(method, exc)
        handler = await continuation(details)
        if handler is None:
            return handler
        if by_certificate:
            return self._by_certificate.get(method, handler)
        if access is not Access.CLUSTER or not self.cluster.tls:
            return handler
        return self._wrapped.get(method, handler)

    def check_peer(self, method: str, context: Any) -> None:
        self._cluster_check(method, {}, context.auth_context())

    def _wrap(self, method: str, handler: Any, check: Callable[[str, Any], None]) -> Any:
        """The handler, first checking the peer's certificate (TLS: known only once the call runs)."""
        kind = handler_kind(handler)
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            raise TypeError(f"{method}: a sync handler cannot be guarded")

        if inspect.isasyncgenfunction(behavior):
            async def stream_out(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    check(method, context)
                except AuthError as exc:
                    await self._refuse(method, exc, context)
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            wrapped: Any = stream_out
        else:
            async def unary_out(request: Any, context: Any) -> Any:
                try:
                    check(method, context)
                except AuthError as exc:
                    await self._refuse(method, exc, context)
                return await behavior(request, context)
            wrapped = unary_out
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(wrapped, request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
