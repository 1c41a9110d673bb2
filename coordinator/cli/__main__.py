"""`python -m coordinator.cli`: the `coordinator` command."""

from coordinator.cli.main import main

main()
