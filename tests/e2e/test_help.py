"""Every command's --help as a user reads it: at most 100 columns, no flag name cut, defaults shown one way
(`[default: X]`), an examples section; `--version` on both programs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer

pytestmark = pytest.mark.e2e
WIDTH = 100
RANGE = re.compile(r"^-?[\d.]+<=x<=-?[\d.]+$|^x[<>]=?-?[\d.]+$")  # click's [x>=0], [1<=x<=65535]


def commands() -> list[tuple[str, list[str], typer.Typer, object]]:
    """(program, path, app, click command) for every command of both programs, groups included."""
    from coordinator.cli.main import app as coordinator
    from shard_worker.cli import app as worker

    found = []
    for program, app in (("coordinator", coordinator), ("shard-worker", worker)):
        def walk(command: object, path: list[str], program: str = program, app: typer.Typer = app) -> None:
            found.append((program, path, app, command))
            if hasattr(command, "commands"):  # a group (typer's own click: duck-typed)
                for name, sub in command.commands.items():
                    walk(sub, [*path, name])
        walk(typer.main.get_command(app), [])
    return found


def render(command: object, path: list[str]) -> str:
    """The help a terminal WIDTH columns wide shows (the real programs are checked against it below)."""
    ctx = command.context_class(command, info_name=" ".join(path) or "x", terminal_width=WIDTH,  # type: ignore
                                max_content_width=WIDTH)
    return command.get_help(ctx)  # type: ignore[attr-defined]


def check_help(text: str, command: object, where: str) -> None:
    long = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not long, f"{where}: lines over {WIDTH} columns: {long}"
    assert "…" not in text, f"{where}: something is cut:\n{text}"
    for param in getattr(command, "params", []):
        if getattr(param, "hidden", False):
            continue
        for name in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if name.startswith("-"):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}($|[\s,=/])", text, re.M), \
                    f"{where}: {name} is not shown whole:\n{text}"
    flat = " ".join(" ".join(line for line in text.splitlines() if not line.startswith("Usage:")).split())
    assert "(default" not in flat.lower() and not re.search(r"[^\[]default:", flat), \
        f"{where}: a default outside [default: ...]:\n{text}"
    for group in re.findall(r"\[([^\]]*)\]", re.sub(r"<[\w\[\] ]*>", "", flat)):  # not a metavar's <list[str]>
        parts = [p.strip() for p in group.split(";")]
        ok = all(p.startswith(("default: ", "required")) or RANGE.match(p) for p in parts)
        # what is not a default may use brackets too: OPTIONS, ARGS..., a list like [0, 1) in an example
        assert ok or group in ("OPTIONS", "ARGS") or group.isupper() or "," in group, \
            f"{where}: [{group}] is not a default in the one format:\n{text}"


def test_every_help_fits_100_columns_with_whole_flags_one_default_format_and_examples():
    seen = 0
    for program, path, _, command in commands():
        where = " ".join([program, *path])
        text = render(command, path)
        check_help(text, command, where)
        assert "Examples:" in text, f"{where} has no examples:\n{text}"  # groups too (issue 34.11)
        seen += 1
    assert seen >= 25


def test_the_real_programs_render_the_same_and_say_their_version():
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    for program in ("coordinator", "shard_worker"):
        version = subprocess.run([sys.executable, "-m", f"{program}.cli", "--version"], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and re.fullmatch(r"shardline \d+\.\d+\.\d+\n", version.stdout), version
    launch = subprocess.run([sys.executable, "-m", "coordinator.cli", "launch", "--help"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert launch.returncode == 0
    assert "--worker-memory-mb" in launch.stdout and "--log-level" in launch.stdout
    assert max(len(line) for line in launch.stdout.splitlines()) <= WIDTH
    worker = subprocess.run([sys.executable, "-m", "shard_worker.cli", "serve", "--help"], env=env,
                            capture_output=True, text=True, timeout=60)
    # the same setting has the same name on both programs; its old name is accepted, not shown
    assert "--worker-memory-mb" in worker.stdout and "--memory-budget-mb" not in worker.stdout
    assert "[default: (80% of available); x>=0]" in launch.stdout.replace("\n", " ").replace("  ", " ") or \
        "80% of available" in launch.stdout


def test_a_bad_flag_is_a_short_usage_error_not_a_panel():
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "launch", "--worker-memory", "5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "No such option: --worker-memory" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4 and "╭" not in result.stderr
