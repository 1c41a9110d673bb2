"""`coordinator certs ...`, `coordinator api-keys ...` and `coordinator health`: the CLI of shardline's
security (certificates, API keys) and a health probe that speaks TLS (Kubernetes' own gRPC probe cannot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from coordinator.cli.certs import (
    DEFAULT_CA_DAYS,
    DEFAULT_DAYS,
    CertError,
    create_ca,
    create_client,
    create_node,
    create_server,
)
from shardline.auth import ROLES, hash_key, new_api_key, parse_keys
from shardline.cli_options import examples, typer_app
from shardline.tls import CA_CERT, NODE_CERT, NODE_KEY, write_private

certs = typer_app("the cluster's CA, node and client certificates (TLS on every link)",
                  epilog=examples("coordinator certs create-ca --certs-dir ./certs",
                                  "coordinator certs create-node --certs-dir ./certs node1 localhost 127.0.0.1",
                                  "coordinator certs create-client --certs-dir ./certs alice"))
api_keys = typer_app("API keys for the public API, stored hashed, each with a role (client or admin)",
                     epilog=examples("coordinator api-keys create my-app --role client --file keys.json",
                                     "coordinator api-keys list --file keys.json",
                                     "coordinator api-keys revoke my-app --file keys.json"))

CERTS_DIR = typer.Option(..., "--certs-dir", help="the certificates directory")
CA_KEY = typer.Option(None, "--ca-key", help="the CA's key, if kept outside the certificates directory")
LEAF_DAYS = typer.Option(None, "--days", help="valid for this many days",
                         show_default=f"{DEFAULT_DAYS}, or until the CA expires if sooner")
OVERWRITE = typer.Option(False, "--overwrite", help="replace files that exist")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


@certs.command("create-ca", epilog=examples("coordinator certs create-ca --certs-dir ./certs"))
def create_ca_cmd(certs_dir: Path = CERTS_DIR,
                  days: float = typer.Option(DEFAULT_CA_DAYS, help="valid for this many days"),
                  ca_key: Path | None = CA_KEY, overwrite: bool = OVERWRITE) -> None:
    """A new CA: ca.crt (give it to every node and client) and ca.key (keep it off the nodes)."""
    try:
        issued = create_ca(certs_dir, days, ca_key, overwrite)
    except CertError as exc:
        _fail(str(exc))
        return
    print(f"CA certificate {issued.cert} (until {issued.not_after:%Y-%m-%d}), key {issued.key} (mode 0600)")


@certs.command("create-node", epilog=examples("coordinator certs create-node node1.example.com 10.0.0.5 "
                                               "--certs-dir ./certs"))
def create_node_cmd(hosts: list[str] = typer.Argument(..., help="every host name and IP address the node is "
                                                      "reached on (*.domain allowed)"),
                    certs_dir: Path = CERTS_DIR, days: float | None = LEAF_DAYS,
                    ca_key: Path | None = CA_KEY, overwrite: bool = OVERWRITE) -> None:
    """A node certificate (node.crt, node.key): every coordinator, parameter service and worker uses one, to
    serve TLS and to prove on internal links that it belongs to the cluster."""
    try:
        issued = create_node(certs_dir, hosts, days, ca_key, overwrite)
    except CertError as exc:
        _fail(str(exc))
        return
    print(f"node certificate {issued.cert} for {', '.join(hosts)} (until {issued.not_after:%Y-%m-%d}), "
          f"key {issued.key} (mode 0600)")


@certs.command("create-server", epilog=examples("coordinator certs create-server api.example.com --certs-dir ./certs"))
def create_server_cmd(hosts: list[str] = typer.Argument(..., help="every host name and IP address HTTPS clients "
                                                        "reach the gateway on"),
                      certs_dir: Path = CERTS_DIR, days: float | None = LEAF_DAYS,
                      ca_key: Path | None = CA_KEY, overwrite: bool = OVERWRITE) -> None:
    """The HTTPS gateway's own certificate (server.crt, server.key): with it in --certs-dir, the gateway serves
    HTTPS with this key instead of the node key (which internal links trust)."""
    try:
        issued = create_server(certs_dir, hosts, days, ca_key, overwrite)
    except CertError as exc:
        _fail(str(exc))
        return
    print(f"server certificate {issued.cert} for {', '.join(hosts)} (until {issued.not_after:%Y-%m-%d}), "
          f"key {issued.key} (mode 0600)")


@certs.command("create-client", epilog=examples("coordinator certs create-client alice --certs-dir ./certs"))
def create_client_cmd(name: str = typer.Argument(..., help="the client's name (its certificate's common name)"),
                      certs_dir: Path = CERTS_DIR, days: float | None = LEAF_DAYS,
                      ca_key: Path | None = CA_KEY, overwrite: bool = OVERWRITE) -> None:
    """A client certificate (client.NAME.crt/.key) for the public API, when it requires one
    (--client-certs required)."""
    try:
        issued = create_client(certs_dir, name, days, ca_key, overwrite)
    except CertError as exc:
        _fail(str(exc))
        return
    print(f"client certificate {issued.cert} (until {issued.not_after:%Y-%m-%d}), key {issued.key} (mode 0600)")


KEYS_FILE = typer.Option(..., "--file", help="the API keys file (JSON; created if missing)")


def _read_keys(path: Path) -> dict[str, Any]:
    """The keys file's whole document (its role quotas and every key's own fields are kept as they are)."""
    if not path.exists():
        return {"keys": []}
    try:
        text = path.read_text()
        parse_keys(text, str(path))
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    return dict(json.loads(text)) if text.strip() else {"keys": []}


def _write_keys(path: Path, document: dict[str, Any]) -> None:
    write_private(path, (json.dumps(document, indent=2) + "\n").encode())


@api_keys.command("create", epilog=examples("coordinator api-keys create alice --file keys.json",
                                            "coordinator api-keys create ops --role admin --file keys.json",
                                            "coordinator api-keys create bob --certificate bob --file keys.json"))
def create_key(name: str = typer.Argument(..., help="who the key is for (shown in logs and errors)"),
               file: Path = KEYS_FILE,
               role: str = typer.Option("client", help=f"one of {', '.join(ROLES)}"),
               certificate: str | None = typer.Option(None, help="no key: admit the client certificate of this "
                                                      "common name with the role")) -> None:
    """A new key: printed once (only its SHA-256 is stored); or, with --certificate, a client certificate's
    role. A running coordinator reads the file again within a second."""
    if role not in ROLES:
        _fail(f"role {role!r} is not one of {', '.join(ROLES)}")
    document = _read_keys(file)
    entries = document["keys"]
    if any(e["name"] == name for e in entries):
        _fail(f"a key named {name!r} exists in {file}: revoke it first, or choose another name")
    key = new_api_key() if certificate is None else ""
    entry = {"name": name, "role": role, **({"sha256": hash_key(key)} if key else {"certificate": certificate})}
    try:
        parse_keys(json.dumps({**document, "keys": [*entries, entry]}), str(file))
    except ValueError as exc:
        _fail(str(exc))
    document["keys"] = [*entries, entry]
    _write_keys(file, document)
    if certificate is not None:
        print(f"client certificate {certificate!r} has role {role} as {name!r} (in {file})")
        return
    print(key)
    print(f"(key {name!r}, role {role}, stored hashed in {file}; this is the only time it is shown)", file=sys.stderr)


@api_keys.command("list", epilog=examples("coordinator api-keys list --file keys.json"))
def list_keys(file: Path = KEYS_FILE) -> None:
    """The keys' names and roles (the keys themselves are not stored)."""
    if not file.exists():
        _fail(f"no API keys file at {file} (`coordinator api-keys create NAME --file {file}` makes one)")
    for e in _read_keys(file)["keys"]:
        what = f"  certificate {e['certificate']}" if "certificate" in e else ""
        print(f"{e['name']:<24} {e['role']}{what}")


@api_keys.command("revoke", epilog=examples("coordinator api-keys revoke alice --file keys.json"))
def revoke_key(name: str = typer.Argument(..., help="the key's name"), file: Path = KEYS_FILE) -> None:
    """Remove a key (or a certificate's entry): a running coordinator refuses it within a second, open streams
    included."""
    document = _read_keys(file)
    kept = [e for e in document["keys"] if e["name"] != name]
    if len(kept) == len(document["keys"]):
        _fail(f"no key named {name!r} in {file}")
    document["keys"] = kept
    _write_keys(file, document)
    print(f"revoked {name!r}")


def health(endpoint: str = typer.Option("127.0.0.1:50051", help="HOST:PORT of any shardline server"),
           service: str = typer.Option("", help="the service to ask about ('' = the server as a whole)"),
           certs_dir: Path | None = typer.Option(None, help="TLS: trust its ca.crt, and present its node.crt "
                                                 "when it has one (a node's own probe)"),
           timeout: float = typer.Option(5, help="seconds")) -> None:
    """Exit 0 if the server reports SERVING for the service (a probe for Kubernetes' exec probes, which
    unlike its gRPC probe can speak TLS)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if certs_dir is None:
        channel = grpc.insecure_channel(endpoint)
    else:
        try:
            ca = (certs_dir / CA_CERT).read_bytes()
            cert, key = ((certs_dir / NODE_CERT).read_bytes(), (certs_dir / NODE_KEY).read_bytes()) \
                if (certs_dir / NODE_CERT).exists() else (None, None)
        except OSError as exc:
            _fail(f"{certs_dir}: {exc.strerror}")
            return
        channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(ca, key, cert))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as err:  # one line saying why: nothing listens, TLS on one side only, another CA
            from coordinator.cli.common import explain
            from shardline.errors import from_rpc_error

            _fail(f"{endpoint}: {explain(from_rpc_error(err), endpoint, certs_dir)}")
            return
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{endpoint} {service or '(server)'}: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)
