"""Where and in what precision to train: one place that decides, and says what it chose.

Every caller that trains or scores (the train and evaluate stages, the search, the
benchmarks) starts with `setup`, which resolves the device, sets the process-wide settings
for it and picks the autocast precision, once, in that order. `train.precision: auto` on a
CPU is measured (mnistlab/precision.py); everywhere else it is a fixed rule.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mnistlab import precision
from mnistlab.host import host_memory_bytes
from mnistlab.config import Params, ParamsError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; weights are always kept in fp32
    name: str           # the device as reports and MLflow name it: `describe(device)`
    why: str            # why this dtype, for the log and the MLflow run's `precision` tag


def setup(params: Params, device: str | None = None, keep_memory: bool = True) -> Runtime:
    """Resolve `device` (default: params' train.device: auto, cpu, cuda, mps), configure the
    process for it, and resolve train.precision on it for params' model. A device this
    machine lacks is a ParamsError naming the ones it has."""
    resolved = resolve_device(device or params.train.device)
    configure(resolved, params.train.cudnn_benchmark, keep_memory)
    name = describe(resolved)
    dtype, why = resolve_precision(params, resolved, name)
    return Runtime(resolved, dtype, name, why)


def available_devices() -> list[str]:
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str) -> torch.device:
    """`auto` takes the first of cuda, mps, cpu; a named device must exist here."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[0])
    if name not in available:
        raise ParamsError(f"train.device = {name!r}: not available on this machine "
                          f"(available here: auto, {', '.join(available)})")
    return torch.device(name)


def memory_bytes(device: torch.device) -> int | None:
    """The device's memory: a GPU's own, else the machine's RAM (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory_bytes()


def configure(device: torch.device, cudnn_benchmark: bool = False,
              keep_memory: bool = True) -> None:
    """Process-wide speed settings for the chosen device (they do not change results
    beyond float rounding). `cudnn_benchmark` is `train.cudnn_benchmark`; `keep_memory=False`
    leaves glibc's allocator at its defaults (the benchmark's `--malloc default`, to measure
    what keeping memory is worth)."""
    if device.type == "cpu":
        # Denormal floats (below 1e-38) take a slow path in x86 FPUs; training MNIST from
        # scratch produces them and ran 4x slower here without flushing them to zero.
        torch.set_flush_denormal(True)
        if keep_memory:
            keep_freed_memory()
    if device.type == "cuda":
        # cuDNN's kernel search times every algorithm for each new conv shape: seconds per
        # model, for kernels that run for microseconds here. Off unless asked for.
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# glibc's mallopt() parameter numbers (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc keep freed activation memory for the next training step (Linux only).

    Every CPU step allocates and frees tens of MB of activations. By default glibc maps
    blocks this large fresh from the kernel and hands freed memory back, so each step
    page-faults on newly zeroed pages again: 1.2 million faults and 3.0 s of system time in
    185 I1 steps on a 2-core Xeon. Raising both thresholds (the mmap one to glibc's 32 MiB
    ceiling) cut that to 0.2 million and 0.85 s. Raising only the trim threshold is worse
    than the default (it freezes the mmap threshold at 128 KiB), so both or neither.
    PyTorch's performance tuning guide gets the same effect by preloading jemalloc or
    tcmalloc; this needs no extra library. Process-wide, results unchanged; returns whether
    it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # not glibc (musl, ...): keep its defaults
        return False


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: play safe
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags")
            for flag in line.partition(":")[2].split()}


def resolve_precision(params: Params, device: torch.device,
                      device_name: str) -> tuple[torch.dtype, str]:
    """The autocast dtype for train.precision, and why: bf16 or fp32 as set, or for `auto`
    bf16 where it trains params' model faster. Under autocast, BatchNorm and the loss stay in
    fp32; weights are always kept in fp32."""
    name = params.train.precision
    if name != "auto":
        return precision.DTYPES[name], f"{name}: set by train.precision"
    if device.type == "cpu" and cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        measurement = precision.auto_on_cpu(params, device_name)
        return measurement.dtype, measurement.reason
    # A CPU with neither flag emulates bf16, far slower: not worth timing. On CUDA these CNNs'
    # kernels are too small for bf16's arithmetic to matter, and its casts are extra kernels:
    # on an H100, I1 trained faster in fp32 (TF32), the benchmark's `project, bf16 autocast` row.
    return torch.float32, f"auto chose fp32: the rule for {device.type}" + (
        " without bf16 instructions" if device.type == "cpu" else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), e.g. "AMD EPYC"; "unknown" elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line.partition(":")[2].strip() for line in text.splitlines()
                 if line.startswith("model name")), "unknown")


def describe(device: torch.device) -> str:
    """A human name for reports and figures: the GPU's model, or the CPU's model, the vector
    instructions torch's kernels use on it, and the number of threads torch uses, e.g.
    "cpu: AMD EPYC, AVX512 (2 threads)". Virtual machines often name only the vendor's line
    ("AMD EPYC"), and generations of one line differ in speed mostly by their vector width."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    threads = torch.get_num_threads()
    isa = torch.backends.cpu.get_cpu_capability()  # AVX512, AVX2, SVE256, DEFAULT, ...
    vector = f", {isa}" if isa != "DEFAULT" else ""
    return f"cpu: {cpu_model()}{vector} ({threads} thread{'s' if threads != 1 else ''})"
