"""Where and in what precision to train: one place that decides, and says what it chose."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.params import ParamsError


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


def configure(device: torch.device) -> None:
    """Process-wide speed settings for the chosen device (they do not change results
    beyond float rounding)."""
    if device.type == "cpu":
        # Denormal floats (below 1e-38) take a slow path in x86 FPUs; training MNIST from
        # scratch produces them and ran 4x slower here without flushing them to zero.
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); without them
    bf16 on the CPU is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: play safe
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 where the hardware runs it fast (`auto`), else fp32.
    Under autocast, BatchNorm and the loss stay in fp32; weights are always kept in fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def describe(device: torch.device) -> str:
    """A human name for the report: the GPU's model, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"cpu ({torch.get_num_threads()} threads)"
