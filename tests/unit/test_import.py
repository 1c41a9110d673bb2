"""Import: random models load as real HF directories; corrupt, truncated or unsupported input is refused
with a message naming the file, and nothing half-written is left in the store."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.store.importer import ImportFailed, import_gguf, import_hf_dir, import_random, random_config
from coordinator.store.models import ModelStore


@pytest.fixture()
def store(tmp_path):
    return ModelStore(tmp_path / "store")


def leftovers(store):
    return sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


def test_random_import_is_a_loadable_hf_directory_with_a_full_manifest(store):
    manifest = import_random(store, "r", random_config("llama", hidden=32, layers=3, heads=2, vocab=64), seed=3)
    model = AutoModelForCausalLM.from_pretrained(store.path("r"))
    state = model.state_dict()
    assert {t.name for t in manifest.tensors} == set(state)
    assert {t.layer for t in manifest.tensors if t.part == "layer"} == {0, 1, 2}
    for t in manifest.tensors:
        assert t.size_bytes == state[t.name].nbytes and len(t.sha256) == 64
    again = import_random(ModelStore(store.root.parent / "other"), "r", random_config(
        "llama", hidden=32, layers=3, heads=2, vocab=64), seed=3)
    assert [t.sha256 for t in again.tensors] == [t.sha256 for t in manifest.tensors]


def test_hf_directory_round_trip_and_tied_gpt2(store, tmp_path):
    import_random(store, "g", random_config("gpt2", hidden=32, layers=2, heads=2, vocab=64, positions=64), seed=1)
    manifest = import_hf_dir(store, store.path("g"), "g2")
    assert "lm_head.weight" not in {t.name for t in manifest.tensors}
    assert manifest.head_shares == ["transformer.wte.weight"]
    assert {t.name: t.sha256 for t in manifest.tensors} == {t.name: t.sha256 for t in store.manifest("g").tensors}


def make_hf_dir(store, tmp_path):
    import_random(store, "src", random_config("llama", hidden=32, layers=2, heads=2, vocab=64), seed=1)
    source = tmp_path / "hf"
    shutil.copytree(store.path("src"), source)
    return source, next(source.glob("*.safetensors"))


def test_truncated_safetensors_is_refused_naming_the_file(store, tmp_path):
    source, file = make_hf_dir(store, tmp_path)
    file.write_bytes(file.read_bytes()[:-100])
    before = leftovers(store)
    with pytest.raises(ImportFailed, match=f"{file.name}: truncated"):
        import_hf_dir(store, source, "bad")
    assert leftovers(store) == before


def test_corrupt_header_is_refused(store, tmp_path):
    source, file = make_hf_dir(store, tmp_path)
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff" * 8
    file.write_bytes(bytes(data))
    before = leftovers(store)
    with pytest.raises(ImportFailed, match=f"{file.name}: corrupt"):
        import_hf_dir(store, source, "bad")
    assert leftovers(store) == before


def test_unsupported_family_and_missing_config(store, tmp_path):
    source, _ = make_hf_dir(store, tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ImportFailed, match="config.json: unsupported model type 't5'"):
        import_hf_dir(store, source, "bad")
    (source / "config.json").unlink()
    with pytest.raises(ImportFailed, match="config.json: missing"):
        import_hf_dir(store, source, "bad")


def test_bad_gguf_is_refused(store, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ImportFailed, match="model.gguf: not a GGUF file"):
        import_gguf(store, fake, "bad")
    truncated = tmp_path / "short.gguf"
    truncated.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 10)
    with pytest.raises(ImportFailed, match="short.gguf: cannot read GGUF"):
        import_gguf(store, truncated, "bad")
    assert not store.has("bad")


def test_failure_midway_leaves_no_partial_model(store, monkeypatch):
    import coordinator.store.importer as importer

    monkeypatch.setattr(importer, "SHARD_BYTES", 1)  # one file per tensor: the failure comes after writes
    calls = {"n": 0}
    real = torch.randn

    def failing_randn(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(importer.torch, "randn", failing_randn)
    with pytest.raises(OSError, match="disk full"):
        import_random(store, "half", random_config("llama", hidden=32, layers=2, heads=2, vocab=64))
    assert leftovers(store) == []


def test_replacing_a_model_that_a_coordinator_holds_is_refused_until_it_lets_go(tmp_path):
    """coordinator/store/served.py: the importer's commit meets the coordinator's shared lock (the race the
    CLI's early check cannot close), and the store keeps the served files."""
    from coordinator.store.importer import import_random, random_config
    from coordinator.store.models import ModelStore
    from coordinator.store.served import ModelInUse, Served

    store = ModelStore(tmp_path)
    config = random_config("llama", hidden=64, layers=2, vocab=256)
    first = import_random(store, "m", config).digest
    served = Served(tmp_path)
    served.hold({"m"})
    with pytest.raises(ModelInUse, match="'m' is served by a running coordinator"):
        import_random(store, "m", config, seed=3)
    assert store.manifest("m").digest == first and not list(tmp_path.glob(".importing-*"))
    served.hold(set())
    assert import_random(store, "m", config, seed=3).digest != first
