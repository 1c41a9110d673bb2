"""A transformers outside the tested range is named at a worker's start; an error raised inside a library
is described by library, version and call."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from shard_worker import transformers_adapter
from shard_worker.library_failure import describe_library_failure


def test_the_installed_release_is_inside_the_tested_range():
    assert transformers_adapter.outside_tested_range() == ""


def test_a_release_outside_the_range_is_one_warning_naming_both(monkeypatch, caplog):
    monkeypatch.setattr(transformers_adapter, "VERSION", "5.26.0")
    with caplog.at_level(logging.WARNING):
        transformers_adapter.check_version()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "transformers 5.26.0 is installed" in warnings[0].getMessage()
    assert str(transformers_adapter.TESTED) in warnings[0].getMessage()


def test_an_error_inside_transformers_names_it_its_version_and_the_call():
    from transformers.activations import ACT2FN

    with pytest.raises(KeyError) as raised:
        ACT2FN["no_such_activation"]
    text = describe_library_failure(raised.value)
    assert text is not None
    assert text.startswith(f"transformers {transformers.__version__}, in __getitem__ (activations.py:")
    assert "raised KeyError: 'no_such_activation'" in text


def test_a_torch_op_failing_in_a_transformers_layer_names_the_layers_call():
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(RuntimeError) as raised:
        Conv1D(4, 3)(torch.zeros(2, 5))  # 5 inputs into a layer of 3
    text = describe_library_failure(raised.value)
    assert text is not None
    assert f"transformers {transformers.__version__}, in forward (pytorch_utils.py:" in text, text


def test_an_error_of_our_own_is_not_blamed_on_a_library():
    def ours() -> None:
        raise ValueError("ours")

    with pytest.raises(ValueError) as raised:
        ours()
    assert describe_library_failure(raised.value) is None
