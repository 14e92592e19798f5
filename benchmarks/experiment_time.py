"""A whole experiment, timed as a user waits for it: `dvc exp run` of a preset, end to end,
and where its time goes.

    python -m benchmarks.experiment_time [--preset I1] [--set KEY=VALUE ...] [--readme]
                                                                 (`make bench-experiment`)

It runs `dvc exp run --temp -f -n bench-<preset> -S preset=<preset> ...` with
PIPELINE_TIMELINE set, so that every stage writes down its phases (mnistlab/timing.py), and
reads them back: each stage's start-up and imports, params and data, the training loop,
reports and figures, MLflow logging and log_model. What is left of the wall clock is DVC's
own work: composing params.yaml, hashing, committing the experiment, and starting each
stage's Python. The fixed cost is everything but the training loop and the test pass.

The runs go to a throw-away MLflow store (warmed up first, so its one-time table creation
is not counted) and the benchmark's experiment is removed afterwards: the user's runs and
experiments are left as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mnistlab.executables import child_env
from mnistlab.timing import TIMELINE
from tools import doc_blocks

LOOP_PHASES = ("training loop (with each epoch's checkpoint and metrics)", "test pass")


def run_experiment(preset: str, overrides: list[str], store: str, timeline: Path) -> float:
    """Wall seconds of one `dvc exp run --temp` of `preset`; its stages write `timeline`."""
    name = f"bench-{preset}"
    # The stages' `python` (dvc.yaml) is this interpreter's, also outside `make`.
    env = child_env({TIMELINE: str(timeline), "MLFLOW_TRACKING_URI": store})
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-f", "-n", name,
               "-S", f"preset={preset}", *[arg for item in overrides for arg in ("-S", item)]]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", name], check=True,
                   capture_output=True, env=child_env())
    return seconds


def split(timeline: Path, wall: float) -> list[tuple[str, str, float]]:
    """(stage, phase, seconds) in the order they ran, then DVC's share of the rest."""
    records = [json.loads(line) for line in timeline.read_text().splitlines()]
    phases = [(r["stage"], r["phase"], r["end"] - r["start"]) for r in records]
    spans: dict[str, list[float]] = defaultdict(list)
    for r in records:
        spans[r["stage"]] += [r["start"], r["end"]]
    in_stages = sum(max(times) - min(times) for times in spans.values())
    return phases + [("dvc", "DVC's own work and each stage's Python start", wall - in_stages)]


def table(rows: list[tuple[str, str, float]], wall: float, heading: str) -> list[str]:
    loop = sum(seconds for _, phase, seconds in rows if phase in LOOP_PHASES)
    lines = [heading, "", "| stage | phase | seconds | share |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {stage} | {phase} | {seconds:.2f} | {seconds / wall:.0%} |"
              for stage, phase, seconds in rows]
    lines += ["", f"Whole `dvc exp run`: {wall:.1f} s; training loop and test pass {loop:.1f} s; "
                  f"fixed cost {wall - loop:.1f} s; whole / loop = {wall / loop:.1f}x."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="I1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a `dvc exp run -S` override, e.g. train.epochs=1")
    parser.add_argument("--readme", action="store_true",
                        help="write the table into docs/performance.md")
    args = parser.parse_args()
    from mnistlab.runtime import describe, resolve_device
    from mnistlab.config import compose, parse_params
    from mnistlab.tracking import connect

    params = parse_params(compose(args.preset, args.set))
    device = describe(resolve_device(params.train.device))
    with tempfile.TemporaryDirectory() as folder:
        store = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = store
        connect()  # the store's tables, made before the clock starts
        timeline = Path(folder) / "timeline.jsonl"
        wall = run_experiment(args.preset, args.set, store, timeline)
        rows = split(timeline, wall)
    overrides = "".join(f" --set {item}" for item in args.set)
    lines = table(rows, wall, f"Device: {device}; `python -m benchmarks.experiment_time "
                              f"--preset {args.preset}{overrides}`, one run.")
    print("\n".join(lines))
    if args.readme:
        doc_blocks.update({f"experiment-{resolve_device(params.train.device).type}": lines})


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
