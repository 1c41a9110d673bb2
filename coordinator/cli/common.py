"""What the `coordinator` CLI's commands share: the client options, the store option, and how a failed call
ends a command (one line on stderr, exit 1, never a traceback). The command modules import this module
(and startup.py, tables.py), never each other's; main.py, the command table, imports them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from coordinator.store.models import ModelStore, default_store

STORE_HELP = "model store directory"
STORE_DEFAULT = "$SHARDLINE_STORE, else the per-user cache"
API_KEY_OPTION: Any = typer.Option(None, "--api-key", envvar="SHARDLINE_API_KEY", help="the API key (or "
                                   "$SHARDLINE_API_KEY)", show_envvar=False)
CLIENT_CERTS_DIR: Any = typer.Option(None, "--certs-dir", help="TLS: trust this directory's ca.crt")
CLIENT_NAME: Any = typer.Option("", "--client-name", help="with --certs-dir: present client.NAME.crt/.key")


def _store(store: Path | None) -> ModelStore:
    return ModelStore(store or default_store())


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


CONNECT_WORDS = ("failed to connect", "Connection refused", "Socket closed", "andshake", "ssl", "SSL")


def explain(exc: Any, endpoint: str, certs_dir: Path | None = None) -> str:
    """One line for a failed call, saying what to do when the cause is the usual one: nothing listens, TLS on
    one side only, a certificate of another CA (shardline/diagnose.py tells them apart), ..."""
    message = str(exc.message)
    if message.startswith("the stream broke after"):  # the SDK waited for it to come back (client_calls.Resuming)
        return f"the cluster at {endpoint} stopped while answering and was not back in time: retry once it is back"
    if exc.code.name in ("UNAVAILABLE", "CANCELLED", "UNAUTHENTICATED") and any(w in message for w in CONNECT_WORDS):
        from shardline.diagnose import unreachable
        from shardline.tls import CA_CERT

        reason = unreachable(endpoint, certs_dir / CA_CERT if certs_dir is not None else None,
                             certs_dir is not None)
        if reason:
            return reason
    if exc.code.name == "UNAVAILABLE" and ("failed to connect" in message or "Connection refused" in message):
        return (f"no shardline cluster answers at {endpoint}: start one (`coordinator launch`), or give its "
                "address with --endpoint HOST:PORT")
    if exc.code.name == "UNAVAILABLE" and ("resolv" in message or "DNS" in message):
        return f"cannot resolve {endpoint}: give --endpoint HOST:PORT"
    if exc.code.name in ("UNAVAILABLE", "CANCELLED") and ("Cancelling all calls" in message or
                                                         "Socket closed" in message or "GOAWAY" in message):
        return f"the cluster at {endpoint} stopped while answering: retry once it is back"
    return f"{exc.code.name}: {message}"


def _client(endpoint: str, timeout: float, api_key: str | None, certs_dir: Path | None, client_name: str) -> Any:
    """The SDK's client for a CLI command; files that cannot be used end the command with their name."""
    from shardline.client import Client
    from shardline.limits import is_host_port
    from shardline.tls import TLSFilesError

    if not all(is_host_port(e.strip()) for e in endpoint.split(",")):
        _fail(f"--endpoint must be HOST:PORT (standby coordinators: HOST:PORT,HOST:PORT), got {endpoint!r}")
    try:
        return Client(endpoint, timeout=timeout, api_key=api_key, tls=certs_dir, client_name=client_name)
    except (TLSFilesError, ValueError) as exc:
        _fail(str(exc))


@contextmanager
def _connected(endpoint: str, timeout: float, api_key: str | None, certs_dir: Path | None,
               client_name: str) -> Iterator[Any]:
    """The SDK's client; an error of the call ends the command with one line (exit 1), never a traceback."""
    from shardline.errors import ShardlineError

    with _client(endpoint, timeout, api_key, certs_dir, client_name) as client:
        try:
            yield client
        except ShardlineError as exc:
            _fail(explain(exc, endpoint, certs_dir))
        except ValueError as exc:  # a field protobuf refuses (out of its range)
            _fail(str(exc))
