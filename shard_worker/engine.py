"""The stage engine of `--engine`: "torch" runs the stage's modules as built; "deepspeed" hands the stage's
decoder layers to `deepspeed.init_inference`. DeepSpeed is an optional extra (`pip install
'shardline[deepspeed]'`), imported only when asked for, and needs a CUDA device here.

Not yet run on a GPU (this was written on a machine without one). What it does: init_inference over the
stage's layers with kernel injection off. DeepSpeed's injected transformer kernels keep a KV cache of their
own and take other arguments than the Hugging Face layers, so they cannot read a stage's per-session paged
cache (kv_cache.py); with injection off the layers keep their forward and their cache. At tp_size 1 that
is DeepSpeed's dtype conversion and move to the device around the same layers: no speed-up is expected
until tensor parallelism (AutoTP) is used, and none is measured yet. A stage over several GPUs (`--tp N`
> 1) needs one process per GPU (torch.distributed, each step's inputs sent to every rank), which is not
built: --tp above 1 is refused at start, with a message saying so.
"""

from __future__ import annotations

import importlib.util

import torch

from shard_worker.device import DeviceError

ENGINES = ("torch", "deepspeed")
EXTRA = "pip install 'shardline[deepspeed]'"


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def check_engine(engine: str, device: torch.device, tp: int = 1) -> None:
    """Refuse, at start, an engine this worker cannot run: an unknown one, deepspeed without the extra or on
    CPU, a tensor-parallel degree the engine or the node cannot give."""
    if engine not in ENGINES:
        raise DeviceError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")
    if tp < 1:
        raise DeviceError(f"--tp must be at least 1, got {tp}")
    if engine == "torch":
        if tp != 1:
            raise DeviceError(f"--tp {tp}: tensor parallelism needs --engine deepspeed")
        return
    if not deepspeed_installed():
        raise DeviceError(f"--engine deepspeed: DeepSpeed is not installed; install the extra with {EXTRA} "
                          "(it runs on a CUDA device)")
    if device.type != "cuda":
        raise DeviceError(f"--engine deepspeed needs a CUDA device (--device cuda:N), not {device}: DeepSpeed "
                          "inference runs on CUDA here; on CPU use --engine torch")
    try:  # at start, not at the first load: a DeepSpeed that cannot import (its CUDA build, its ops) says so now
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - whatever it raises, one line naming it
        raise DeviceError(f"--engine deepspeed: DeepSpeed is installed but does not import ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); reinstall {EXTRA}") from None
    if tp > 1:
        first = device.index or 0
        count = torch.cuda.device_count()
        if first + tp > count:
            raise DeviceError(f"--tp {tp} from {device}: needs GPUs cuda:{first} to cuda:{first + tp - 1}, torch "
                              f"sees {count}")
        raise DeviceError(f"--tp {tp}: a stage over several GPUs is not supported yet (it needs one process per "
                          "GPU); run one worker per GPU with --tp 1, the pipeline splits the model over them")


def apply_engine(engine: str, layers: torch.nn.ModuleDict, dtype: torch.dtype,
                 device: torch.device) -> torch.nn.ModuleDict:
    """The stage's layers as the engine runs them (checked by check_engine at start)."""
    if engine == "torch":
        return layers
    import deepspeed  # the optional extra: imported only for --engine deepspeed

    torch.cuda.set_device(device)  # DeepSpeed moves the module to the current device
    # tp_size 1: no process group is created (DeepSpeed only makes one for tp_size > 1)
    wrapped = deepspeed.init_inference(layers, dtype=dtype, tensor_parallel={"tp_size": 1},
                                       replace_with_kernel_inject=False)
    module = wrapped.module
    if not isinstance(module, torch.nn.ModuleDict):  # pragma: no cover - DeepSpeed keeps the module's type
        raise RuntimeError(f"deepspeed.init_inference returned a {type(module).__name__}, not the stage's layers")
    return module
