"""The checks every run passes before it starts, and the plan they produce.

The validate stage runs them before any stage that owns outputs (DVC deletes a stage's
outputs just before it runs it), and the train stage runs them again for `python -m
stages.train` on its own: an unknown key or bad value, a preset that is not in conf/preset/,
a device this machine lacks, or a model too large for the device's memory, each refused in
one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnistlab.config import Params, ParamsError, check_preset, parse_params
from mnistlab.geometry import batch_images, parameter_count, training_memory_bytes
from mnistlab.host import host_memory_bytes


def check(raw: object) -> tuple[Params, dict]:
    """Every check a run needs before it starts; returns the params and the plan: preset,
    random seed, device, parameters, epochs and the memory estimate."""
    params = parse_params(raw)
    check_preset(raw, params)
    if cpu_only(params.train.device):  # saves importing torch (seconds) in the validate stage
        device_type, available, where = "cpu", host_memory_bytes(), "this machine's memory"
    else:
        from mnistlab.runtime import describe, memory_bytes, resolve_device

        device = resolve_device(params.train.device)
        device_type, available, where = device.type, memory_bytes(device), describe(device)
    check_fits(params, available, where)
    return params, {
        "preset": params.base.preset,
        "seed": params.base.seed,
        "device": device_type,
        "parameters": parameter_count(params.model),
        "epochs": params.train.epochs,
        "memory_estimate_mib": round(training_memory_bytes(params) / 2**20),
    }


def cpu_only(device: str) -> bool:
    """True when `device` can only mean the CPU here: `cpu`, or `auto` on a Linux machine
    without an NVIDIA driver (CUDA needs one; MPS is macOS only)."""
    return device == "cpu" or (device == "auto" and sys.platform.startswith("linux")
                               and not Path("/proc/driver/nvidia").exists())


def check_fits(params: Params, available: int | None, where: str) -> None:
    """Refuse, before any work, a model whose training cannot fit in the device's memory."""
    needed = training_memory_bytes(params)
    if available is None or needed <= 0.9 * available:
        return
    train_batch, score_batch = batch_images(params)
    smaller = "train.batch_size" + (" or evaluate.batch_size" if score_batch > train_batch else "")
    # What a batch adds, image by image: how many images fit beside the weights and data.
    fixed = training_memory_bytes(params, batch=0)
    fitting = int((0.9 * available - fixed) // (training_memory_bytes(params, batch=1) - fixed))
    raise ParamsError(
        f"model.layers: training this model needs about {needed / 2**30:,.1f} GiB "
        f"({parameter_count(params.model):,} parameters, batches of "
        f"{max(train_batch, score_batch):,} images), more than the {available / 2**30:,.1f} GiB "
        f"of {where}; use fewer or narrower layers, less padding, or a smaller {smaller}"
        + (f" (batches of at most {fitting:,} images fit)" if fitting >= 1 else ""))
