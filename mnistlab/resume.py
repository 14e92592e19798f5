"""Continue an interrupted training run, or open a new MLflow run for a fresh one.

`train.resume: true` continues from models/checkpoint.pt when it was written with the same
params, into the same MLflow run (logging any epoch the store missed). A checkpoint whose run
will not be continued has that run marked KILLED, so that no run stays RUNNING for ever.
"""

from __future__ import annotations

from mnistlab import runtime, tracking
from mnistlab.checkpoint import load_checkpoint, load_resumable
from mnistlab.loop import TrainingRun
from mnistlab.paths import CHECKPOINT_FILE


def resume_or_open(run: TrainingRun, experiment_id: str, setup: runtime.Runtime) -> str:
    """Restore `run` from the checkpoint if `train.resume` allows, else open a new MLflow run
    with the params, tagged with the device and why it trains in its precision; returns the
    MLflow run id."""
    params = run.params
    tags = tracking.run_tags(setup.name, {"preset": params.base.preset, "precision": setup.why})
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
        return run_id
    run.restore(resumed)
    run_id = resumed["mlflow_run_id"]
    if tracking.run_exists(run_id):
        missed = tracking.log_missing_epochs(run_id, run.history)
        print(f"train: resuming after epoch {len(run.history)} (MLflow run {run_id}"
              f"{'; epochs ' + ', '.join(map(str, missed)) + ' logged now' if missed else ''})")
        return run_id
    # The store was deleted or replaced since: carry the epochs into a new run.
    new_id = tracking.new_run(experiment_id, {**tags, "resumed_from": run_id})
    print(f"train: resuming after epoch {len(run.history)}; its MLflow run {run_id} is not in "
          f"{tracking.redact(tracking.tracking_uri())}, so the finished epochs are logged again "
          f"into a new run, {new_id}")
    tracking.log_new_run(new_id, params, run.history)
    return new_id
