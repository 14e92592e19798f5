"""Stage `validate`: check every parameter before any stage that owns outputs runs.

    python -m stages.validate        (dvc repro runs it first)

DVC deletes a stage's outputs just before it runs the stage's command. A bad value found by
the train stage itself would therefore already have cost the last trained model, its curves
and its metrics. This stage runs first (train depends on its output) and refuses, in one
line each, an unknown key or bad value, a preset that is not in conf/preset/, a device this
machine lacks, or a model too large for the device's memory; then nothing else runs.

Its output, reports/plan.json, says what the next training will be: recipe, random seed,
device, parameters and the memory estimate.
"""

from __future__ import annotations

import sys

from stages.files import write_json
from stages.paths import PLAN_FILE
from stages.params import (
    Params,
    ParamsError,
    check_preset,
    parse_params,
    read_params_file,
    training_memory_bytes,
)




def check(raw: object) -> tuple[Params, dict]:
    """Every check a run needs before it starts; returns the params and the plan."""
    params = parse_params(raw)
    check_preset(raw, params)
    from stages.device import check_fits, resolve_device  # imports torch: about 1 s

    device = resolve_device(params.train.device)
    check_fits(params, device)
    return params, {
        "preset": params.base.preset,
        "seed": params.base.seed,
        "device": device.type,
        "parameters": params.model.parameter_count(),
        "epochs": params.train.epochs,
        "memory_estimate_mib": round(training_memory_bytes(params) / 2**20),
    }


def main() -> None:
    try:
        _, plan = check(read_params_file())
    except ParamsError as err:
        sys.exit(f"validate: error: {err}")
    write_json(PLAN_FILE, plan)
    print(f"validate: params.yaml is valid: {plan['preset']}, {plan['parameters']:,} parameters, "
          f"{plan['epochs']} epochs on {plan['device']}")


if __name__ == "__main__":
    main()
