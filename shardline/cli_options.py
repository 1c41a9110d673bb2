"""What every command line of shardline shares (`coordinator ...`, `shard-worker ...`): plain help that fits
100 columns without cutting a flag's name, defaults shown one way (`[default: X]`), `--version`, `--log-level`,
the memory a worker offers, and an examples section for each command's help."""

from __future__ import annotations

import logging
from typing import Any

import typer

import shardline

HELP_WIDTH = 100
# plain click help (Rich's tables cut long flag names at the terminal's width), at most HELP_WIDTH wide
CONTEXT: dict[str, Any] = {"max_content_width": HELP_WIDTH, "help_option_names": ["-h", "--help"]}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
MEMORY_HELP = "memory each worker process may use in all, in MiB (runtime included; README: Memory)"
MEMORY_DEFAULT = "80% of available"
ENDPOINT_HELP = "the coordinator's HOST:PORT (or $SHARDLINE_ENDPOINT)"
DEFAULT_ENDPOINT = "127.0.0.1:50051"


def typer_app(help: str, **kwargs: Any) -> typer.Typer:
    """A Typer (or sub-Typer) with shardline's help settings."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(add_completion=False, rich_markup_mode=None, context_settings=CONTEXT, help=help, **kwargs)


def examples(*lines: str) -> str:
    """A command's epilog: its examples, one a line, kept as written (click rewraps other paragraphs)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"shardline {shardline.__version__}")
        raise typer.Exit()


def version_option() -> Any:
    return typer.Option(False, "--version", callback=_show_version, is_eager=True, show_default=False,
                        help="print the version and exit")


def log_level_option(default: str = "INFO") -> Any:
    return typer.Option(default, "--log-level", help=f"logging level: {', '.join(LOG_LEVELS)} (DEBUG shows "
                        "tracebacks of expected failures)", case_sensitive=False)


def configure_logging(level: str) -> None:
    """The process's logging at `level`; an unknown level ends the command with one line."""
    name = level.upper()
    if name not in LOG_LEVELS:
        typer.echo(f"error: --log-level {level!r}: give one of {', '.join(LOG_LEVELS)}", err=True)
        raise typer.Exit(1)
    logging.basicConfig(level=name, format=LOG_FORMAT)
    if name != "DEBUG":  # gRPC's C core writes its own lines (a busy port, a closed link): DEBUG shows them
        import os

        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def memory_option() -> Any:
    """--worker-memory-mb, the same on `launch` and `shard-worker serve`: 0 means the default."""
    return typer.Option(0, "--worker-memory-mb", min=0, help=MEMORY_HELP, show_default=MEMORY_DEFAULT)


def hidden_alias(name: str, default: Any = None) -> Any:
    """An old name of a renamed flag, still accepted (deploy manifests and scripts use it), not in help."""
    return typer.Option(default, name, hidden=True)


def endpoint_option(help: str = ENDPOINT_HELP) -> Any:
    """--endpoint, or $SHARDLINE_ENDPOINT (a cluster on another port: set it once, as SHARDLINE_API_KEY)."""
    return typer.Option(DEFAULT_ENDPOINT, "--endpoint", help=help, envvar="SHARDLINE_ENDPOINT", show_envvar=False)
