"""The checks of `shard-worker serve --device/--dtype/--engine/--tp` (shard_worker/device.py, engine.py): what
they accept on this machine, and errors that name what is missing."""

from __future__ import annotations

import pytest
import torch

from shard_worker import device
from shard_worker.device import DeviceError, DeviceSettings, check_dtype, cpu_runs, describe, parse_device
from shard_worker.engine import EXTRA, check_engine, deepspeed_installed

CPU = torch.device("cpu")


@pytest.mark.parametrize("spec", ["cpu", " CPU "])
def test_cpu_is_always_there(spec):
    assert parse_device(spec) == CPU


@pytest.mark.parametrize("spec", ["tpu", "cuda:", "cuda:-1", "cuda0", "cuda:1:2", "mps", ""])
def test_a_spec_that_is_not_a_device_is_named(spec):
    with pytest.raises(DeviceError, match=r"is not cpu, cuda or cuda:N"):
        parse_device(spec)


def test_a_missing_cuda_device_says_how_many_torch_sees_and_its_build():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError) as err:
        parse_device(f"cuda:{count}")
    message = str(err.value)
    assert f"--device cuda:{count}: there is no such device" in message
    assert f"sees {count} CUDA device" in message and f"torch {torch.__version__}" in message
    assert ("built without CUDA" in message) == (torch.version.cuda is None)
    assert "--device cpu" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_cuda_without_a_device_is_refused_even_as_plain_cuda():
    with pytest.raises(DeviceError, match=r"cuda:0: there is no such device"):
        parse_device("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_this_cpu_torch_runs_every_compute_dtype(dtype):
    # a probe forward in the dtype (linear, norm, SiLU, causal attention, embedding) ran: nothing is refused
    assert cpu_runs(getattr(torch, dtype)) == ""
    check_dtype(CPU, dtype)


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp16"])
def test_a_dtype_that_is_not_a_compute_dtype_is_refused(dtype):
    with pytest.raises(DeviceError, match=rf"--dtype '{dtype}' is not a compute dtype \(float32, bfloat16"):
        check_dtype(CPU, dtype)


def test_the_workers_dtype_wins_and_unspecified_means_the_workers():
    assert DeviceSettings(dtype="bfloat16").compute_dtype("float32") == "bfloat16"
    assert DeviceSettings().compute_dtype("float16") == "float16"
    assert DeviceSettings().compute_dtype("") == "float32"


def test_the_torch_engine_runs_anywhere_without_tensor_parallelism():
    check_engine("torch", CPU)
    with pytest.raises(DeviceError, match=r"--tp 2: tensor parallelism needs --engine deepspeed"):
        check_engine("torch", CPU, 2)
    with pytest.raises(DeviceError, match=r"--tp must be at least 1"):
        check_engine("torch", CPU, 0)
    with pytest.raises(DeviceError, match=r"--engine 'tensorrt' is not one of torch, deepspeed"):
        check_engine("tensorrt", CPU)


@pytest.mark.skipif(deepspeed_installed(), reason="deepspeed is installed here")
def test_deepspeed_without_the_extra_names_it():
    with pytest.raises(DeviceError) as err:
        check_engine("deepspeed", CPU)
    assert "DeepSpeed is not installed" in str(err.value) and EXTRA in str(err.value)


@pytest.mark.skipif(not deepspeed_installed(), reason="needs deepspeed installed")
def test_deepspeed_on_cpu_says_it_needs_cuda():
    with pytest.raises(DeviceError, match=r"--engine deepspeed needs a CUDA device"):
        check_engine("deepspeed", CPU)


def test_a_cpu_describes_itself_with_the_hosts_memory():
    info = describe(CPU)
    assert info.device == "cpu" and info.name
    assert 0 < info.memory_free_bytes <= info.memory_total_bytes


def test_on_cpu_the_wire_copies_are_the_tensor_itself():
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert device.to_host(t) is t and device.to_device(t, CPU) is t


@pytest.mark.parametrize(("capability", "native"), [((7, 0), False), ((7, 5), False), ((8, 0), True),
                                                    ((8, 6), True), ((9, 0), True), ((6, 1), False)])
def test_bfloat16_on_a_gpu_needs_compute_capability_8_0(capability, native):
    # not torch.cuda.is_bf16_supported(): it asks the current device (cuda:0), and counts emulation (V100, T4)
    assert device.bf16_native(capability) is native


def test_a_thread_started_inside_another_threads_one_thread_window_gets_the_intended_count(monkeypatch):
    import concurrent.futures
    import threading

    from shard_worker.kv_cache import _one_thread

    before = torch.get_num_threads()
    monkeypatch.setattr(device, "_COMPUTE_THREADS", [2])
    inside, leave = threading.Event(), threading.Event()

    def attention() -> None:  # a decode step's window on a worker's compute thread
        with _one_thread(True):
            inside.set()
            leave.wait(10)

    try:
        holder = threading.Thread(target=attention)
        holder.start()
        assert inside.wait(10)
        assert torch.get_num_threads() == before  # the main thread's own count is untouched
        # another worker's compute thread, started now, as runtime.ComputeThread starts it
        with concurrent.futures.ThreadPoolExecutor(1, initializer=device.init_thread, initargs=(CPU,)) as pool:
            started_inside = pool.submit(torch.get_num_threads).result()
            leave.set()
            holder.join(10)
            assert pool.submit(torch.get_num_threads).result() == 2
        assert started_inside == 2
        assert torch.get_num_threads() == 2  # the window restored the intended count, not the one it saw
    finally:
        leave.set()
        torch.set_num_threads(before)


def test_a_worker_process_bound_leaves_its_shard_what_the_runtime_and_reserve_do_not_take():
    from shardline.limits import MemoryBoundTooSmall, process_bound, shard_budget, shard_share

    mib = 2**20
    assert shard_budget(1000 * mib, 360 * mib) == int(1000 * mib * 0.95) - 32 * mib - 360 * mib
    assert shard_share(300 * mib, 360 * mib) == 0
    with pytest.raises(MemoryBoundTooSmall, match="runtime alone .* takes 360 MiB: give at least 430"):
        shard_budget(300 * mib, 360 * mib)
    bound = process_bound(130 * mib, 360 * mib)
    assert bound % mib == 0 and 130 * mib <= shard_share(bound, 360 * mib) < 131 * mib
