"""What the pipeline costs besides training: per-epoch bookkeeping, and a `dvc repro` with
nothing to do.

    python -m benchmarks.overheads [--device auto] [--epochs 20] [--repeats 3] [--readme]

Per epoch the train stage writes a checkpoint, logs the epoch's metrics to MLflow and
rewrites the curves CSV (stages/train.py). This times those same calls, against a fresh
sqlite store of the same kind the pipeline uses (in a temporary folder, so the project's
store is untouched), and divides each by an epoch of params.yaml's recipe (train + test)
measured in the same process on `--device`: the second of two epochs of the train stage's
own run, so that the first one's warm-up (and on CUDA the graph capture) is left out.

The no-op `dvc repro` is timed only when `dvc status` says the pipeline is up to date:
otherwise `dvc repro` would train, and that is not what is measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

import mlflow
import torch

from benchmarks.common import header, sync
from mnistlab import runtime, tracking
from mnistlab.config import ParamsError, load_params
from mnistlab.data import DataError, Split, load_split
from mnistlab.executables import bin_dir, child_env
from mnistlab.files import write_atomic, write_csv
from mnistlab.loop import TrainingRun
from mnistlab.model import build_model
from mnistlab.runtime import cpu_model
from stages.train import METRIC_NAMES
from tools import doc_blocks

SYNC = "MLflow log_metrics (synchronous, as the stage logs)"
# The alternative: MLflow's queue, which returns at once but is joined when the run ends.
QUEUED = "(MLflow log_metrics, synchronous=False)"
QUEUE_END = "(the queue's end of run, once per run)"


def time_bookkeeping(epochs: int) -> dict[str, list[float]]:
    """Seconds per epoch of each per-epoch write the train stage does, for `epochs` epochs."""
    params = load_params()
    model = build_model(params.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seconds: dict[str, list[float]] = {SYNC: [], "checkpoint": [], "curves CSV": [],
                                       QUEUED: [], QUEUE_END: []}
    history: list[dict] = []

    @contextlib.contextmanager
    def timed(name: str):
        started = time.perf_counter()
        yield
        seconds[name].append(time.perf_counter() - started)

    previous_uri = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {
            # A throw-away store and artifact folder: the project's store is not touched.
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "DVC_ROOT": tmp}):
        try:
            run_id = tracking.new_run(tracking.connect(), {"purpose": "overhead benchmark"})
            with tracking.run_status(run_id):
                for epoch in range(1, epochs + 1):
                    metrics = {"epoch": epoch, "train_loss": 0.1 / epoch,
                               "train_accuracy": 0.99, "test_loss": 0.05 / epoch,
                               "test_accuracy": 0.995, "lr": 0.01, "epoch_seconds": 1.0}
                    history.append(metrics)
                    logged = {k: v for k, v in metrics.items() if k != "epoch"}
                    with timed("checkpoint"):
                        write_atomic(Path(tmp) / "checkpoint.pt", lambda f: torch.save({
                            "history": history, "model_state": model.state_dict(),
                            "optimizer_state": optimizer.state_dict()}, f))
                    with timed(SYNC):
                        mlflow.log_metrics(logged, step=epoch, synchronous=True)
                    with timed(QUEUED):
                        mlflow.log_metrics({f"queued_{k}": v for k, v in logged.items()},
                                           step=epoch, synchronous=False)
                    with timed("curves CSV"):
                        write_csv(Path(tmp) / "curves.csv", METRIC_NAMES, history)
                # Ending a run that used the queue joins its worker thread (a poll of 1 s).
                with timed(QUEUE_END):
                    mlflow.flush_async_logging()
                    mlflow.end_run()
                mlflow.start_run(run_id=run_id)  # for run_status to end
        finally:
            mlflow.set_tracking_uri(previous_uri)  # this process's MLflow client too
    return seconds


def time_noop_repro(repeats: int) -> list[float] | str:
    """Wall seconds of `dvc repro` when nothing changed, or why it was not timed."""
    dvc = shutil.which("dvc", path=str(bin_dir())) or shutil.which("dvc")
    if dvc is None:
        return "not timed: no `dvc` executable found"
    env = child_env()  # a stage's `python` (dvc.yaml) is this interpreter's, also outside `make`
    status = subprocess.run([dvc, "status", "--json"], capture_output=True, text=True, env=env)
    if status.returncode != 0 or json.loads(status.stdout or "{}"):
        return "not timed: `dvc status` reports changes; run `dvc repro` first"
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([dvc, "repro"], check=True, capture_output=True, env=env)
        walls.append(time.perf_counter() - started)
    return walls


def time_epoch(params, train: Split, test: Split, dtype: torch.dtype) -> float:
    """Seconds of one steady epoch (train + test) of `params`' recipe as the train stage runs
    it, on the device the data lives on: the second epoch of a fresh run."""
    run = TrainingRun.start(params, train, test, dtype)
    run.capture()
    epochs = run.epochs()
    next(epochs)  # the first epoch warms up the kernels and the allocator
    sync(train.images.device)
    return next(epochs)["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where the epoch the writes are compared with trains")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of bookkeeping to time")
    parser.add_argument("--repeats", type=int, default=3, help="no-op `dvc repro` runs")
    parser.add_argument("--readme", action="store_true",
                        help="also write the figures into their block of docs/performance.md")
    args = parser.parse_args()
    if args.epochs < 1 or args.repeats < 1:
        parser.error(f"--epochs ({args.epochs}) and --repeats ({args.repeats}) must be >= 1")

    params = load_params()
    if params.train.epochs < 2:
        parser.error(f"train.epochs = {params.train.epochs} in params.yaml: the steady epoch "
                     "is a run's second, so the recipe needs at least 2 epochs")
    try:  # a missing device or MNIST is refused before anything is timed
        setup = runtime.setup(params, device=args.device)
        train = load_split(train=True, limit=params.train.limit_train, device=setup.device)
        test = load_split(train=False, limit=params.train.limit_test, device=setup.device)
    except (ParamsError, DataError, OSError) as err:
        parser.error(str(err))

    repro = time_noop_repro(args.repeats)  # first: the bookkeeping below must not dirty it
    bookkeeping = time_bookkeeping(args.epochs)
    epoch_s = time_epoch(params, train, test, setup.dtype)

    where = ("" if setup.device.type == "cpu"
             else f"; the writes run on the host CPU, {cpu_model()}")
    lines = [header(setup.device,
                    f"python -m benchmarks.overheads --device {args.device} --epochs "
                    f"{args.epochs} --repeats {args.repeats}",
                    f"the train stage's per-epoch writes, {args.epochs} epochs, sqlite "
                    f"MLflow store{where}; the epoch: preset {params.base.preset}'s second "
                    f"epoch (train + test), {epoch_s:.2f} s"),
             "",
             "| write | median ms | max ms | % of the epoch |",
             "| --- | ---: | ---: | ---: |"]
    for name, values in bookkeeping.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1e3:.1f} | {max(values) * 1e3:.1f} | "
                     f"{median / epoch_s:.3%} |")
    lines.append("")
    if isinstance(repro, str):
        lines.append(f"No-op `dvc repro`: {repro}.")
    else:
        lines.append(f"No-op `dvc repro` (pipeline up to date): median "
                     f"{statistics.median(repro):.2f} s, max {max(repro):.2f} s of "
                     f"{len(repro)} runs (target: under 3 s).")
    print("\n".join(lines))
    if args.readme:
        doc_blocks.update({"bench-overheads": lines})


if __name__ == "__main__":
    main()
