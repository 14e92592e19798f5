"""Stage `train`: build the CNN from params, train it, save models/model.pt, track it in MLflow.

    python -m stages.train        (dvc repro runs it; settings come from params.yaml)

Outputs: models/model.pt (weights + architecture, the final model), models/checkpoint.pt
(after every epoch, for `train.resume`), reports/training_curves.csv (the per-epoch metrics
DVC plots) and reports/train_metrics.json (best epoch, time, throughput).
"""

from __future__ import annotations

from stages import timing  # first: the stage's own imports are timed from here

import sys
import time

import mlflow
import torch
from torch import nn

from stages import tracking, validate
from stages.data import DataError, load_training_data
from stages.device import configure, describe, resolve_device, resolve_precision
from stages.files import write_atomic, write_csv, write_json
from stages.loop import TARGET_ACCURACY, TrainingDiverged, TrainingRun, time_to_accuracy
from stages.mnist import RAW_DIR
from stages.model import PixelClassifier, count_parameters
from stages.params import Params, ParamsError, read_params_file
from stages.paths import CHECKPOINT_FILE, CURVES_FILE, MODEL_FILE, TRAIN_METRICS_FILE


# The columns of reports/training_curves.csv. An epoch is scored on the test set or, with
# `train.validation`, on the validation split; the other split's two columns stay empty, so
# that the file (and DVC's plots of it) has the same fields either way.
METRIC_NAMES = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "val_loss", "val_accuracy", "lr", "epoch_seconds")


# What an interrupted run's last line tells the user to do.
RESUME_HINT = ("rerun the same command with `-S train.resume=true` added (or set train.resume: "
               "true for `dvc repro`) to continue the same MLflow run")


# The checkpoint's key for its params snapshot. The name is older than this project's one
# meaning of "recipe" (a preset's training settings) and stays: older checkpoints still resume.
SNAPSHOT_KEY = "recipe"


def params_snapshot(params: Params) -> dict:
    """What a checkpoint must match to be resumed: every param but the resume switch itself."""
    snapshot = params.model_dump(mode="json")
    snapshot["train"].pop("resume")
    return snapshot


def load_checkpoint(quiet: bool) -> dict | None:
    """models/checkpoint.pt as the last finished epoch left it; None when there is none or it
    cannot be read (said in one line unless `quiet`)."""
    if not CHECKPOINT_FILE.exists():
        return None
    try:
        return torch.load(CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file: say so, start afresh
        if not quiet:
            print(f"train: {CHECKPOINT_FILE} is unreadable ({type(err).__name__}); starting afresh")
        return None


def load_resumable(params: Params, checkpoint: dict | None) -> dict | None:
    """The checkpoint, if resuming is on and it was written with these same params."""
    if not (params.train.resume and checkpoint is not None):
        return None
    if checkpoint.get(SNAPSHOT_KEY) != params_snapshot(params):
        print(f"train: {CHECKPOINT_FILE} was written with other params; starting afresh")
        return None
    return checkpoint


def main() -> None:
    lap = timing.Laps("train")
    lap("start-up and imports")
    params, device, data, experiment_id = prepare()
    lap("params, data and MLflow store")
    configure(device, params.train.cudnn_benchmark)
    run = TrainingRun.start(params, data.train, data.holdout,
                            resolve_precision(params.train.precision, device),
                            holdout_name=data.holdout_name)
    device_name = describe(device)
    run_id = resume_or_open(run, experiment_id, device_name)
    with tracking.run_status(run_id):
        tracking.log_dataset(RAW_DIR, verified=params.data.verify_md5)
        lap("model, MLflow run and dataset")
        started = time.perf_counter()
        run.capture()
        for metrics in run.epochs():
            save_epoch(run, run_id, metrics)
        lap("training loop (with each epoch's checkpoint and metrics)")
        finish(run, run_id, time.perf_counter() - started, device_name, lap)
    lap("MLflow run end")


def prepare() -> tuple:
    """Everything that can be wrong with the inputs, checked before any work starts; one
    line and exit on the first problem. Returns params, device, the data, experiment id."""
    try:
        params, _ = validate.check(read_params_file())  # the validate stage's checks, again
        device = resolve_device(params.train.device)
        data = load_training_data(params.train, device, verify_md5=params.data.verify_md5)
        return params, device, data, tracking.connect()
    except (ParamsError, DataError, tracking.TrackingError) as err:
        sys.exit(f"train: error: {err}")


def resume_or_open(run: TrainingRun, experiment_id: str, device_name: str) -> str:
    """Continue the last checkpoint's run if `train.resume` allows, else open a new MLflow run
    with the params; returns the MLflow run id."""
    params = run.params
    tags = tracking.run_tags(device_name, {"preset": params.base.preset})
    checkpoint = load_checkpoint(quiet=not params.train.resume)
    resumed = load_resumable(params, checkpoint)
    if resumed is None:
        if checkpoint is not None:  # its run will not be continued: it must not stay RUNNING
            abandoned = tracking.end_if_running(checkpoint.get("mlflow_run_id"))
            if abandoned:
                print(f"train: MLflow run {abandoned} of {CHECKPOINT_FILE} was left RUNNING by "
                      f"an interrupted run and is not resumed; marked KILLED")
        run_id = tracking.new_run(experiment_id, tags)
        tracking.log_params(run_id, params)
    else:
        run.restore(resumed)
        run_id = resumed["mlflow_run_id"]
        if tracking.run_exists(run_id):
            missed = tracking.log_missing_epochs(run_id, run.history)
            print(f"train: resuming after epoch {len(run.history)} (MLflow run {run_id}"
                  f"{'; epochs ' + ', '.join(map(str, missed)) + ' logged now' if missed else ''})")
        else:  # the store was deleted or replaced since: carry the epochs into a new run
            run_id = tracking.new_run(experiment_id, {**tags, "resumed_from": run_id})
            print(f"train: resuming after epoch {len(run.history)}; its MLflow run "
                  f"{resumed['mlflow_run_id']} is not in {tracking.redact(tracking.tracking_uri())}, "
                  f"so the finished epochs are logged again into a new run, {run_id}")
            tracking.log_new_run(run_id, params, run.history)
    print(f"train: {count_parameters(run.model):,} parameters on {device_name}, "
          f"{str(run.dtype).removeprefix('torch.')}, {len(run.train):,} training images, "
          f"{len(run.holdout):,} {run.holdout_name} images scored per epoch, "
          f"MLflow run {run_id} at {tracking.redact(tracking.tracking_uri())}")
    return run_id


def save_epoch(run: TrainingRun, run_id: str, metrics: dict) -> None:
    """After an epoch: the checkpoint, then the metrics to every sink (MLflow, the DVC plots
    file, the log line). All or nothing: a stop signal waits for the end of the block. The
    checkpoint comes first (resume trusts it). The metrics are written at once, also to a
    local store: a synchronous sqlite write costs about 10 ms an epoch, and MLflow's
    asynchronous queue, though it returns in 0.5 ms, costs a whole second when the run
    ends (its worker thread is joined on a one-second poll), more than 15 GPU epochs of
    synchronous writes. A server that stopped answering stops the training at this epoch."""
    with tracking.signals_deferred():
        write_atomic(CHECKPOINT_FILE, lambda f: torch.save(
            {SNAPSHOT_KEY: params_snapshot(run.params), "mlflow_run_id": run_id, **run.state()}, f))
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


def save_model(model: nn.Module, params: Params, run_id: str) -> None:
    """models/model.pt: plain tensors and the architecture's params, so
    `torch.load(..., weights_only=True)` reads it and `build_model` rebuilds it."""
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    write_atomic(MODEL_FILE, lambda f: torch.save({
        "state_dict": state,
        "params": params.model_dump(mode="json"),
        "mlflow_run_id": run_id,
    }, f))


def log_model(network: nn.Module, params: Params, images: torch.Tensor) -> None:
    """Log the model users call: raw 0-255 pixels in, class probabilities out, with a signature
    and an input example of two training digits as pixels, N x 28 x 28 float32 (a batch of 1
    would freeze the exported batch size at 1). The network is `PixelClassifier`, exported as
    a graph; the model around it (stages/served_model.py, logged as code) refuses what is not a
    pixel with a message and reads images scaled to 0..1, which a graph cannot do."""
    import tempfile
    from pathlib import Path

    from mlflow.models import infer_signature

    from stages import served_model

    network = network.to("cpu", memory_format=torch.contiguous_format).eval().float()
    model = PixelClassifier(network, params.train.normalize.mean, params.train.normalize.std)
    example = (images.detach().cpu().float().squeeze(1) * 255).round().contiguous().numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    with tempfile.TemporaryDirectory() as folder:
        graph = Path(folder) / served_model.NETWORK
        mlflow.pytorch.save_model(model, graph, input_example=example, signature=signature,
                                  pip_requirements=requirements)
        mlflow.pyfunc.log_model(name="model", python_model=served_model.__file__,
                                artifacts={served_model.NETWORK: str(graph)},
                                input_example=example,
                                signature=signature, pip_requirements=requirements)


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
