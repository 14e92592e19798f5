"""Stage `validate`: check every parameter before any stage that owns outputs runs.

    python -m stages.validate        (dvc repro runs it first)

DVC deletes a stage's outputs just before it runs the stage's command. A bad value found by
the train stage itself would therefore already have cost the last trained model, its curves
and its metrics. This stage runs first (train depends on its output) and refuses, in one
line each, an unknown key or bad value, a preset that is not in conf/preset/, a device this
machine lacks, or a model too large for the device's memory; then nothing else runs.

Its output, reports/plan.json, says what the next training will be: preset, random seed,
device, parameters and the memory estimate. It is written (atomically) only after every check
has passed; DVC keeps the last one in place while the stage runs (`persist` in dvc.yaml), so a
refused value leaves the plan, and the working tree, as they were.
"""

from __future__ import annotations

from stages import timing  # first: the stage's own imports are timed from here

import sys
from pathlib import Path

from stages.files import write_json
from stages.host import host_memory_bytes
from stages.params import (
    Params,
    ParamsError,
    batch_images,
    check_preset,
    parse_params,
    read_params_file,
    training_memory_bytes,
)
from stages.paths import PLAN_FILE


def check(raw: object) -> tuple[Params, dict]:
    """Every check a run needs before it starts; returns the params and the plan."""
    params = parse_params(raw)
    check_preset(raw, params)
    if cpu_only(params.train.device):  # saves importing torch (seconds) in this stage
        device_type, available, where = "cpu", host_memory_bytes(), "this machine's memory"
    else:
        from stages.device import describe, memory_bytes, resolve_device

        device = resolve_device(params.train.device)
        device_type, available, where = device.type, memory_bytes(device), describe(device)
    check_fits(params, available, where)
    return params, {
        "preset": params.base.preset,
        "seed": params.base.seed,
        "device": device_type,
        "parameters": params.model.parameter_count(),
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
        f"({params.model.parameter_count():,} parameters, batches of "
        f"{max(train_batch, score_batch):,} images), more than the {available / 2**30:,.1f} GiB "
        f"of {where}; use fewer or narrower layers, less padding, or a smaller {smaller}"
        + (f" (batches of at most {fitting:,} images fit)" if fitting >= 1 else ""))


def main() -> None:
    lap = timing.Laps("validate")
    lap("start-up and imports")
    try:
        _, plan = check(read_params_file())
    except ParamsError as err:
        sys.exit(f"validate: error: {err}")
    write_json(PLAN_FILE, plan)  # only now: a refusal leaves the last plan as it was
    lap("checks")
    print(f"validate: params.yaml is valid: {plan['preset']}, {plan['parameters']:,} parameters, "
          f"{plan['epochs']} epochs on {plan['device']}")


if __name__ == "__main__":
    main()
