"""The first start imports a built-in model: one progress display, in launch's own lines (issue 34.7), no
library progress bars beside it, and the time it took said (the "ready in" line that follows does not
count it)."""

from __future__ import annotations

import asyncio
import re

from coordinator.cli.startup import ensure_model
from coordinator.store.models import ModelStore


def test_the_first_import_of_a_built_in_says_its_progress_in_one_display(tmp_path, capfd):
    store = ModelStore(tmp_path / "store")
    asyncio.run(ensure_model(store, "minilm"))
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith(f"importing the built-in all-MiniLM-L6-v2 into {store.root} (once)"), out
    shown = [int(m.group(1)) for line in lines if (m := re.fullmatch(r"  writing its weights: +(\d+)% of \d+ MiB",
                                                                     line))]
    assert shown and shown[-1] == 100 and shown == sorted(shown) and len(shown) <= 5, out
    assert re.fullmatch(r"  imported in \d+\.\d s", lines[-1]), out
    assert "it/s]" not in err and "B/s]" not in err, err  # no tqdm bar beside it
    assert store.has("minilm")
    asyncio.run(ensure_model(store, "minilm"))  # once: the second start says nothing
    assert capfd.readouterr().out == ""


def test_the_gguf_readers_own_bar_is_off_while_the_import_shows_its_lines(capfd):
    """transformers' GGUF reader draws a tqdm bar that its progress switch does not turn off."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from coordinator.store.importer import quiet

    before = gguf_utils.tqdm
    with quiet(True):
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert capfd.readouterr().err == ""
    assert gguf_utils.tqdm is before  # as it was
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "Converting" in capfd.readouterr().err  # the check above could fail: the bar draws otherwise
