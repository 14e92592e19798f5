"""Stage `train`: build the CNN from params, train it, save models/model.pt, track it in MLflow.

    python -m stages.train        (dvc repro runs it; settings come from params.yaml)

Outputs: models/model.pt (weights + architecture, the final model), models/checkpoint.pt
(after every epoch, for `train.resume`), reports/training_curves.csv (the per-epoch metrics
DVC plots) and reports/train_metrics.json (best epoch, time, throughput).
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # Python's cyclic garbage collector walks every live object at each full collection. The
    # imports below (torch, MLflow) and the setup (torch's compiler, imported when the
    # optimiser is made; MLflow's SQL store) make some 400,000 objects that live to the end,
    # and the collections they set off cost seconds a run. So the collector is off until the
    # training loop, where what exists is frozen (main).
    gc.disable()

from mnistlab import timing  # first: the stage's own imports are timed from here

import sys
import time

import mlflow

from mnistlab import lineage, plan, precision, runtime, tracking
from mnistlab.checkpoint import save_checkpoint, save_model
from mnistlab.config import ParamsError, read_params_file
from mnistlab.data import DataError, load_training_data
from mnistlab.export import log_model
from mnistlab.files import write_csv, write_json
from mnistlab.loop import TARGET_ACCURACY, TrainingDiverged, TrainingRun, time_to_accuracy
from mnistlab.mnist import RAW_DIR
from mnistlab.model import count_parameters
from mnistlab.paths import CHECKPOINT_FILE, CURVES_FILE, TRAIN_METRICS_FILE
from mnistlab.resume import resume_or_open
from mnistlab.signals import exit_finished, signals_deferred

# The columns of reports/training_curves.csv. An epoch is scored on the test set or, with
# `train.validation`, on the validation split; the other split's two columns stay empty, so
# that the file (and DVC's plots of it) has the same fields either way.
METRIC_NAMES = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "val_loss", "val_accuracy", "lr", "epoch_seconds")

# What an interrupted run's last line tells the user to do.
RESUME_HINT = ("rerun the same command with `-S train.resume=true` added (or set train.resume: "
               "true for `dvc repro`) to continue the same MLflow run")


def main() -> None:
    lap = timing.Laps("train")
    lap("start-up and imports")
    params, setup, data, experiment_id = prepare()
    lap("params, data and MLflow store")
    run = TrainingRun.start(params, data.train, data.holdout, setup.dtype,
                            holdout_name=data.holdout_name)
    run_id = resume_or_open(run, experiment_id, setup)
    print(f"train: {count_parameters(run.model):,} parameters on {setup.name}, "
          f"{str(run.dtype).removeprefix('torch.')}, {len(run.train):,} training images, "
          f"{len(run.holdout):,} {run.holdout_name} images scored per epoch, "
          f"MLflow run {run_id} at {tracking.redact(tracking.tracking_uri())}")
    print(f"train: precision {setup.why}")
    with tracking.run_status(run_id):
        lineage.log_dataset(RAW_DIR, verified=params.data.verify_md5)
        lap("model, MLflow run and dataset")
        gc.freeze()  # what exists now (modules, model, data) is walked by no later collection
        gc.enable()  # for the loop, which may run for hours
        started = time.perf_counter()
        run.capture()
        for metrics in run.epochs():
            save_epoch(run, run_id, metrics)
        lap("training loop (with each epoch's checkpoint and metrics)")
        finish(run, run_id, time.perf_counter() - started, setup.name, lap)
    lap("MLflow run end")


def prepare() -> tuple:
    """Everything that can be wrong with the inputs, checked before any work starts; one
    line and exit on the first problem. Returns params, runtime setup, data, experiment id."""
    try:
        params, _ = plan.check(read_params_file())  # the validate stage's checks, again
        tracking.caller_tags()  # a malformed PIPELINE_RUN_TAGS, before any work
        setup = runtime.setup(params)
        data = load_training_data(params.train, setup.device, verify_md5=params.data.verify_md5)
        return params, setup, data, tracking.connect()
    except (ParamsError, DataError, tracking.TrackingError) as err:
        sys.exit(f"train: error: {err}")


def save_epoch(run: TrainingRun, run_id: str, metrics: dict) -> None:
    """After an epoch: the checkpoint, then the metrics to every sink (MLflow, the DVC plots
    file, the log line). All or nothing: a stop signal waits for the end of the block. The
    checkpoint comes first (resume trusts it). The metrics are written at once, also to a
    local store: a synchronous sqlite write costs about 10 ms an epoch, and MLflow's
    asynchronous queue, though it returns in 0.5 ms, costs a whole second when the run
    ends (its worker thread is joined on a one-second poll), more than 15 GPU epochs of
    synchronous writes. A server that stopped answering stops the training at this epoch."""
    with signals_deferred():
        save_checkpoint(run.params, run_id, run.state())
        try:
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"},
                               step=metrics["epoch"], synchronous=True)
        except Exception as err:  # noqa: BLE001 - whatever the client raised: the store is gone
            raise tracking.TrackingError(tracking.redact(
                f"MLflow tracking store {tracking.tracking_uri()} stopped answering after "
                f"epoch {metrics['epoch']} ({type(err).__name__})")) from None
        write_csv(CURVES_FILE, METRIC_NAMES, run.history)
        print("train: " + "  ".join(_format(k, v) for k, v in metrics.items()), flush=True)


def finish(run: TrainingRun, run_id: str, train_seconds: float, device_name: str,
           lap: timing.Laps) -> None:
    """The final model, the summary metrics and the MLflow model."""
    history, score = run.history, run.score_key
    save_model(run.model, run.params, run_id)
    best = max(history, key=lambda m: m[score])
    # The final model's test accuracy is the evaluate stage's (reports/metrics.json): it is
    # not repeated here, so `dvc exp show` has one test accuracy column, not three.
    summary = {
        f"best_{score}": best[score],
        "best_epoch": best["epoch"],
        "epochs": run.params.train.epochs,
        "params": count_parameters(run.model),
        "train_seconds": round(train_seconds, 2),
        # Training images per second of whole epochs: the test pass after each is included.
        "epoch_images_per_second": round(len(run.train) * len(history) /
                                         sum(m["epoch_seconds"] for m in history)),
        **time_to_accuracy(history, TARGET_ACCURACY, score),
        "device": device_name,
        "precision": precision.NAMES[run.dtype],  # fp32 or bf16, as train.precision names them
    }
    write_json(TRAIN_METRICS_FILE, summary)
    mlflow.log_metrics({f"best_{score}": best[score],
                        "train_seconds": summary["train_seconds"],
                        **({"seconds_to_target": summary["seconds_to_target"]}
                           if summary["seconds_to_target"] is not None else {})})
    lap("model file and summary metrics")
    log_model(run.model, run.params, run.train.images[:2])
    lap("MLflow log_model")
    name = "test" if run.holdout_name == "test" else "validation"
    print(f"train: final {name} accuracy {history[-1][score]:.4f}, best "
          f"{best[score]:.4f} (epoch {best['epoch']}), {train_seconds:.1f} s "
          f"on {device_name}")


def _format(key: str, value: float) -> str:
    if key == "epoch":
        return f"epoch {value}"
    if key == "lr":
        return f"lr {value:.4g}"
    if key == "epoch_seconds":
        return f"{value:.1f}s"
    return f"{key} {value:.4f}"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as err:
        # Ctrl-C or SIGTERM: tracking.run_status has marked the MLflow run KILLED, and every
        # finished epoch is in the checkpoint. One line instead of a traceback. (Ctrl-C's
        # KeyboardInterrupt has no message; SIGTERM's names the signal.)
        sys.exit(f"train: {str(err) or 'interrupted by Ctrl-C'}; finished epochs are kept in "
                 f"{CHECKPOINT_FILE}: {RESUME_HINT}")
    except tracking.TrackingError as err:
        sys.exit(f"train: error: {err}; finished epochs are kept in {CHECKPOINT_FILE}: start "
                 f"the server again, then {RESUME_HINT}")
    except TrainingDiverged as err:
        # The run is FAILED in MLflow (tracking.run_status), no model was saved, and the
        # checkpoint holds the last epoch that finished with a finite loss.
        sys.exit(f"train: error: {err}; the last good epoch is kept in {CHECKPOINT_FILE}")
    exit_finished()  # everything is written: skip Python's teardown of torch and MLflow
