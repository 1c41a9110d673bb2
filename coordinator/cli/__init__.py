"""The `coordinator` command: its subcommands, the local cluster `launch` starts, and the cluster's certificates."""
