"""A LoadShard that fails inside a library says which library, which version and which call, not only
"internal error"; the worker logs its traceback and loads the next shard as usual."""

from __future__ import annotations

import json

import grpc
import pytest
import transformers

from coordinator.store.importer import import_random, random_config
from coordinator.store.models import ModelStore
from coordinator.store.parameters.server import start_parameter_server
from tests.helpers import load


@pytest.fixture()
def broken_store(tmp_path):
    """tiny-llama twice: as made, and with a config whose activation transformers does not know (the
    worker builds the layers; transformers raises KeyError while looking the activation up)."""
    store = ModelStore(tmp_path / "store")
    config = random_config("llama", hidden=64, layers=4, heads=4, kv_heads=2, vocab=128, intermediate=128)
    import_random(store, "good", config, seed=1)
    import_random(store, "broken", config, seed=1)
    path = store.path("broken") / "config.json"
    fields = json.loads(path.read_text())
    fields["hidden_act"] = "no_such_activation"
    path.write_text(json.dumps(fields))
    return store


def test_a_load_failing_inside_transformers_names_it_and_the_worker_loads_the_next(loop, workers, broken_store,
                                                                                     caplog):
    parameters = loop.run(start_parameter_server(broken_store))
    try:
        (worker,) = workers(1)
        with pytest.raises(grpc.RpcError) as failed:
            load(worker.address, "broken", 0, 4, parameters.address)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        message = failed.value.details()
        assert f"transformers {transformers.__version__}" in message, message
        assert "loading broken layers [0, 4) failed inside" in message
        assert "KeyError" in message and "no_such_activation" in message
        assert "activations.py" in message  # where it broke, with the call
        assert "failed inside a library" in caplog.text  # and the traceback is logged
        progress = load(worker.address, "good", 0, 4, parameters.address)  # the worker is fine
        assert progress[-1].phase != 0
    finally:
        loop.run(parameters.stop(0))
