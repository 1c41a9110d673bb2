"""The `coordinator` command: its subcommands, the local cluster `launch` starts, and the cluster's certificates.

gRPC's C core reads GRPC_VERBOSITY once, when grpc is first imported, and then writes lines of its own to
stderr (a failed TLS handshake, a closed link) beside the one line each command says about the same thing:
off for the commands, here, before anything imports grpc, unless asked for (GRPC_VERBOSITY set, or
--log-level DEBUG)."""

import os as _os
import sys as _sys

if not any(_arg.upper() == "DEBUG" for _arg in _sys.argv):
    _os.environ.setdefault("GRPC_VERBOSITY", "NONE")
