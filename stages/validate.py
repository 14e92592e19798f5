"""Stage `validate`: check every parameter before any stage that owns outputs runs.

    python -m stages.validate        (dvc repro runs it first)

DVC deletes a stage's outputs just before it runs the stage's command, so a bad value found
by the train stage itself would already have cost the last trained model, its curves and
its metrics. This stage runs first (train depends on its output) and refuses a bad value in
one line (mnistlab/plan.py); then nothing else runs.

Its output, reports/plan.json, says what the next training will be: preset, random seed,
device, parameters and the memory estimate. It is written (atomically) only after every check
has passed; DVC keeps the last one in place while the stage runs (`persist` in dvc.yaml), so a
refused value leaves the plan, and the working tree, as they were.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # As in the train stage: no cyclic collection through the imports, whose objects are
    # never garbage, nor at exit. A short stage: the collector stays off to the end.
    gc.disable()

from mnistlab import timing  # first: the stage's own imports are timed from here

import sys

from mnistlab import plan
from mnistlab.config import ParamsError, read_params_file
from mnistlab.files import write_json
from mnistlab.paths import PLAN_FILE


def main() -> None:
    lap = timing.Laps("validate")
    lap("start-up and imports")
    try:
        _, checked = plan.check(read_params_file())
    except ParamsError as err:
        sys.exit(f"validate: error: {err}")
    write_json(PLAN_FILE, checked)  # only now: a refusal leaves the last plan as it was
    lap("checks")
    print(f"validate: params.yaml is valid: {checked['preset']}, {checked['parameters']:,} "
          f"parameters, {checked['epochs']} epochs on {checked['device']}")


if __name__ == "__main__":
    main()
    gc.freeze()  # the exit's collection then has nothing to walk: the process ends now
