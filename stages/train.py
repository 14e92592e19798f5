"""Stage `train`: build the CNN from params, train it, save models/model.pt, track it in MLflow.

    python -m stages.train        (dvc repro runs it; settings come from params.yaml)

Outputs: models/model.pt (weights + architecture, the final model), models/checkpoint.pt
(after every epoch, for `train.resume`), reports/training_curves.csv (the per-epoch metrics
DVC plots) and reports/train_metrics.json (best epoch, time, throughput).
"""

from __future__ import annotations

import sys
import time

import mlflow
import torch
from torch import nn

from stages import tracking, validate
from stages.data import DataError, load_split, normalize, steps_per_epoch
from stages.device import configure, describe, resolve_device, resolve_precision
from stages.files import write_atomic, write_csv, write_json
from stages.loop import (
    TARGET_ACCURACY,
    TrainingDiverged,
    run_epochs,
    start_training,
    time_to_accuracy,
    training_forward,
)
from stages.model import count_parameters
from stages.params import Params, ParamsError, read_params_file
from stages.paths import CHECKPOINT_FILE, CURVES_FILE, MODEL_FILE, TRAIN_METRICS_FILE

METRIC_NAMES = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr",
                "epoch_seconds")


def recipe(params: Params) -> dict:
    """What a checkpoint must match to be resumed: everything but the resume switch itself."""
    snapshot = params.model_dump(mode="json")
    snapshot["train"].pop("resume")
    return snapshot


def load_resumable(params: Params) -> dict | None:
    """The last checkpoint, if resuming is on and it was written by this same recipe."""
    if not (params.train.resume and CHECKPOINT_FILE.exists()):
        return None
    try:
        state = torch.load(CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file: say so, start afresh
        print(f"train: {CHECKPOINT_FILE} is unreadable ({type(err).__name__}); starting afresh")
        return None
    if state.get("recipe") != recipe(params):
        print(f"train: {CHECKPOINT_FILE} is from another recipe; starting afresh")
        return None
    return state


def main() -> None:
    # Everything that can be wrong with the inputs is checked before any work starts.
    try:
        params, _ = validate.check(read_params_file())  # the validate stage's checks, again
        device = resolve_device(params.train.device)
        dtype = resolve_precision(params.train.precision, device)
        cfg = params.train
        verify = params.data.verify_md5
        train_data = load_split(train=True, limit=cfg.limit_train, device=device, verify_md5=verify)
        test_data = load_split(train=False, limit=cfg.limit_test, device=device, verify_md5=verify)
        experiment_id = tracking.connect()
    except (ParamsError, DataError, tracking.TrackingError) as err:
        sys.exit(f"train: error: {err}")

    configure(device, params.train.cudnn_benchmark)
    model, optimizer, scheduler, generator = start_training(
        params, device, steps_per_epoch(len(train_data), cfg.batch_size), params.base.seed)
    history: list[dict] = []

    device_name = describe(device)
    resumed = load_resumable(params)
    if resumed:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler_state"])
        torch.set_rng_state(resumed["torch_rng"])
        generator.set_state(resumed["generator_rng"])
        history = resumed["history"]
        run_id = resumed["mlflow_run_id"]
        if tracking.run_exists(run_id):
            print(f"train: resuming after epoch {len(history)} (MLflow run {run_id})")
        else:  # the store was deleted or replaced since: carry the epochs into a new run
            run_id = tracking.new_run(experiment_id, tracking.run_tags(
                device_name, {"preset": params.base.preset, "resumed_from": resumed["mlflow_run_id"]}))
            print(f"train: resuming after epoch {len(history)}; its MLflow run "
                  f"{resumed['mlflow_run_id']} is not in {tracking.redact(tracking.tracking_uri())}, "
                  f"so the finished epochs are logged again into a new run, {run_id}")
            tracking.log_new_run(run_id, params, history)
    else:
        run_id = tracking.new_run(experiment_id, tracking.run_tags(
            device_name, {"preset": params.base.preset}))

    print(f"train: {count_parameters(model):,} parameters on {device_name}, "
          f"{str(dtype).removeprefix('torch.')}, {len(train_data):,} training images, "
          f"MLflow run {run_id} at {tracking.redact(tracking.tracking_uri())}")

    with tracking.run_status(run_id):
        if not resumed:
            mlflow.log_params(tracking.flatten(params.model_dump(mode="json")))
        train_start = time.perf_counter()
        forward = training_forward(model, train_data, cfg, dtype)
        for metrics in run_epochs(model, forward, train_data, test_data, optimizer, scheduler,
                                  cfg, params.evaluate.batch_size, generator, dtype,
                                  first_epoch=len(history) + 1):
            # Saving an epoch is all or nothing: a stop signal waits for the end of the block.
            # The checkpoint comes first (resume trusts it), the log line last. MLflow gets
            # the metrics through its queue (a synchronous sqlite write would cost 4% of a
            # 0.3 s GPU epoch); tracking.run_status flushes it before the run ends, however
            # it ends.
            with tracking.signals_deferred():
                history.append(metrics)
                write_atomic(CHECKPOINT_FILE, lambda f: torch.save({
                    "recipe": recipe(params), "history": history, "mlflow_run_id": run_id,
                    "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                    "scheduler_state": scheduler.state_dict() if scheduler else None,
                    "torch_rng": torch.get_rng_state(), "generator_rng": generator.get_state(),
                }, f))
                # Every sink gets the same dict: MLflow, the DVC plots file, the log line.
                mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"},
                                   step=metrics["epoch"], synchronous=False)
                write_csv(CURVES_FILE, METRIC_NAMES, history)
                print("train: " + "  ".join(_format(k, v) for k, v in metrics.items()),
                      flush=True)
        train_seconds = time.perf_counter() - train_start

        save_model(model, params, run_id)
        best = max(history, key=lambda m: m["test_accuracy"])
        summary = {
            "final_test_accuracy": history[-1]["test_accuracy"],
            "best_test_accuracy": best["test_accuracy"],
            "best_epoch": best["epoch"],
            "epochs": cfg.epochs,
            "params": count_parameters(model),
            "train_seconds": round(train_seconds, 2),
            # Training images per second of epoch time, the test pass included.
            "images_per_second": round(sum(len(train_data) for _ in history) /
                                       sum(m["epoch_seconds"] for m in history)),
            **time_to_accuracy(history, TARGET_ACCURACY),
            "device": device_name,
        }
        write_json(TRAIN_METRICS_FILE, summary)
        mlflow.log_metrics({"best_test_accuracy": best["test_accuracy"],
                            "train_seconds": summary["train_seconds"],
                            **({"seconds_to_target": summary["seconds_to_target"]}
                               if summary["seconds_to_target"] is not None else {})})
        log_model(model, normalize(train_data.images[:2], cfg.normalize))
        print(f"train: final test accuracy {summary['final_test_accuracy']:.4f}, best "
              f"{best['test_accuracy']:.4f} (epoch {best['epoch']}), {train_seconds:.1f} s "
              f"on {device_name}")


def save_model(model: nn.Module, params: Params, run_id: str) -> None:
    """models/model.pt: plain tensors and the architecture's params, so
    `torch.load(..., weights_only=True)` reads it and `build_model` rebuilds it."""
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    write_atomic(MODEL_FILE, lambda f: torch.save({
        "model": params.model.model_dump(mode="json"),
        "state_dict": state,
        "params": params.model_dump(mode="json"),
        "mlflow_run_id": run_id,
    }, f))


def log_model(model: nn.Module, example: torch.Tensor) -> None:
    """Log the model in MLflow's format with a signature and an input example of 2 normalised
    images (a batch of 1 would freeze the exported batch size at 1)."""
    from mlflow.models import infer_signature

    model = model.to("cpu", memory_format=torch.contiguous_format).eval().float()
    example = example.detach().cpu().float().contiguous().numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(model, name="model", input_example=example,
                             signature=infer_signature(example, output),
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


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
                 f"{CHECKPOINT_FILE} (`train.resume: true` continues from the last one)")
    except TrainingDiverged as err:
        # The run is FAILED in MLflow (tracking.run_status), no model was saved, and the
        # checkpoint holds the last epoch that finished with a finite loss.
        sys.exit(f"train: error: {err}; the last good epoch is kept in {CHECKPOINT_FILE}")
