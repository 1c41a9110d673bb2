from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `coordinator launch` / `serve` run by the e2e tests (their environment is this one) serve their HTTP API on a
# free port, not on 8000, which another run or program on this machine may hold
os.environ.setdefault("SHARDLINE_HTTP_PORT", "0")

from tests.helpers import LoopThread  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A store with small random models; the built-in SmolLM2 is added by `smollm2_store` when asked for."""
    from coordinator.store.importer import import_random, random_config
    from coordinator.store.models import ModelStore

    store = ModelStore(tmp_path_factory.mktemp("store"))
    import_random(store, "tiny-llama", random_config("llama", hidden=64, layers=6, heads=4, kv_heads=2,
                                                     vocab=128, intermediate=128), seed=1)
    import_random(store, "tiny-gpt2", random_config("gpt2", hidden=64, layers=6, heads=4, vocab=128,
                                                    positions=256), seed=2)
    return store


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server (tests/postgres.py), one per session; `jobs_db` gives each test a database."""
    from tests.postgres import local_postgres

    with local_postgres(tmp_path_factory.mktemp("postgres")) as pg:
        yield pg


@pytest.fixture
def jobs_db(postgres) -> str:
    """A new, empty PostgreSQL database: its URL."""
    return postgres.database()


@pytest.fixture(scope="session")
def smollm2_store(store):
    from coordinator.store.importer import builtin_gguf, import_gguf

    if not store.has("smollm2"):
        import_gguf(store, builtin_gguf(), "smollm2")
    return store


@pytest.fixture(scope="session")
def minilm_store(store):
    from coordinator.store.importer import builtin_encoder_dir, import_hf_dir

    if not store.has("minilm"):
        import_hf_dir(store, builtin_encoder_dir(), "minilm")
    return store


NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The Node example client (clients/node/generate.js), its packages installed once."""
    import shutil
    import subprocess

    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True,
                       timeout=300)
    return NODE_DIR / "generate.js"


class _IllegalMoves:
    """Collects the ERROR lines coordinator/transitions.py writes for a move a state table does not allow."""

    def __init__(self) -> None:
        import logging

        self.lines: list[str] = []
        self.checked = 0
        handler = logging.Handler(logging.ERROR)
        handler.emit = lambda record: self.lines.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("coordinator.transitions").addHandler(handler)

    def unchecked(self) -> list[str]:
        new, self.checked = self.lines[self.checked:], len(self.lines)
        return new


_ILLEGAL = _IllegalMoves()


@pytest.fixture(autouse=True)
def no_illegal_state_moves() -> Iterator[None]:
    """Every test fails on a worker, replica or stream state move that its table does not allow, made in this
    process since the last test ended (its own, or its fixtures' set-up; the coordinator logs such moves as
    ERROR in production and carries on)."""
    yield
    moves = _ILLEGAL.unchecked()
    assert not moves, f"state moves outside their tables: {moves}"
