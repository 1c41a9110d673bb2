"""Name the library an unexpected error came from, so that an operator reads "transformers 5.25.0 failed in
LlamaAttention.forward: cache.update(...)" instead of "internal error": the cause of a failed load is
most often a library release that changed under us, and the first thing to know is which one."""

from __future__ import annotations

import sys
import traceback
from importlib import metadata
from pathlib import Path

# the libraries a stage runs inside (import name -> distribution name)
LIBRARIES = {"transformers": "transformers", "torch": "torch", "safetensors": "safetensors",
             "accelerate": "accelerate", "tokenizers": "tokenizers", "gguf": "gguf", "numpy": "numpy"}


def _library_of(filename: str) -> str | None:
    parts = Path(filename).parts
    for name in LIBRARIES:
        if name in parts:
            index = parts.index(name)
            if index > 0 and parts[index - 1] in ("site-packages", "dist-packages"):
                return name
    return None


def _version(library: str) -> str:
    try:
        return metadata.version(LIBRARIES[library])
    except metadata.PackageNotFoundError:
        return getattr(sys.modules.get(library), "__version__", "?")


def _where(library: str, frame: traceback.FrameSummary) -> str:
    relative = frame.filename.split(f"{library}/", 1)[-1]
    return f"{library} {_version(library)}, in {frame.name} ({relative}:{frame.lineno})"


def describe_library_failure(exc: BaseException) -> str | None:
    """For an error raised inside one of LIBRARIES, a line naming the library, its version, where it failed
    and the call: "transformers 5.25.0, in forward (models/llama/modeling_llama.py:252): `key_states, ... =
    cache.update(...)` raised TypeError: ...". Where that library was called by another of LIBRARIES (torch
    from transformers), the caller is named too. None when the error was raised in code of ours."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    innermost = frames[-1]
    library = _library_of(innermost.filename)
    if library is None:
        return None
    call = (innermost.line or "").strip()
    if len(call) > 160:
        call = call[:157] + "..."
    text = f"{_where(library, innermost)}: `{call}` raised {type(exc).__name__}: {exc}"
    for frame in reversed(frames[:-1]):
        caller = _library_of(frame.filename)
        if caller is None:
            break  # called from our code
        if caller != library:
            return f"{text}; called from {_where(caller, frame)}"
    return text
