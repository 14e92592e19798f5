"""Where a pipeline run's time goes, for `make bench-experiment` (benchmarks/experiment_time.py).

With PIPELINE_TIMELINE naming a file, each stage appends one JSON line per phase of its
process: stage, phase, start and end (Unix seconds). Without it nothing is written and a
phase costs one clock read. A stage imports this module before anything heavy, so its
import time is when the stage's own imports began.
"""

from __future__ import annotations

import json
import os
import time

IMPORTED = time.time()
TIMELINE = "PIPELINE_TIMELINE"


class Laps:
    """Consecutive phases of one stage: each call ends the phase begun at the previous call
    (the first begins when this module was imported) and names it."""

    def __init__(self, stage: str) -> None:
        self.stage, self.mark = stage, IMPORTED

    def __call__(self, phase: str) -> None:
        now = time.time()
        path = os.environ.get(TIMELINE)
        if path:
            line = json.dumps({"stage": self.stage, "phase": phase, "start": self.mark, "end": now})
            with open(path, "a") as file:  # one short append per phase: lines never interleave
                file.write(line + "\n")
        self.mark = now
