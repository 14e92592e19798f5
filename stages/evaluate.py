"""Stage `evaluate`: test models/model.pt, write metrics, plots and the parameter report.

    python -m stages.evaluate

Adds its metrics and reports to the MLflow run the train stage opened for this model.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # As in the train stage: the collector stays off through the imports (torch, MLflow,
    # matplotlib) and the setup, whose objects are never garbage; what exists before the test
    # pass is frozen, so that no later collection walks it.
    gc.disable()

from mnistlab import timing  # first: the stage's own imports are timed from here

import sys

import mlflow
from mlflow.exceptions import MlflowException

from mnistlab import report, runtime, tracking
from mnistlab.checkpoint import ModelFileError, load_model
from mnistlab.config import ParamsError, load_params
from mnistlab.data import DataError, load_split
from mnistlab.files import all_or_nothing, write_csv, write_json, write_text
from mnistlab.loop import predict_split
from mnistlab.mnist import NUM_CLASSES
from mnistlab.paths import (
    CURVES_FILE,
    FIGURES,
    METRICS_FILE,
    MODEL_FILE,
    PER_CLASS_FILE,
    PREDICTIONS_FILE,
    REPORT_JSON,
    REPORT_MD,
    REPORTS,
)
from mnistlab.signals import exit_finished

OUTPUTS = (METRICS_FILE, PER_CLASS_FILE, PREDICTIONS_FILE, REPORT_JSON, REPORT_MD,
           FIGURES / "confusion_matrix.png", FIGURES / "training_curves.png")


def main() -> None:
    lap = timing.Laps("evaluate")
    lap("start-up and imports")
    try:
        stage_params = load_params()
        model, params, run_id = load_model()
        # The device is this run's choice; the precision is the one the model was trained in
        # (for `auto`, read back from the cache the train stage's measurement wrote).
        setup = runtime.setup(params, device=stage_params.train.device)
        test_data = load_split(train=False, limit=params.train.limit_test, device=setup.device,
                               verify_md5=stage_params.data.verify_md5)
        tracking.connect()
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        sys.exit(f"evaluate: error: MLflow run {run_id} of {MODEL_FILE} is not in "
                 f"{tracking.redact(tracking.tracking_uri())}; rerun `dvc repro train`")
    except (ParamsError, DataError, ModelFileError, tracking.TrackingError) as err:
        sys.exit(f"evaluate: error: {err}")

    model = model.to(setup.device)
    lap("params, model, test data and MLflow store")
    gc.freeze()  # what exists now (modules, model, data) is walked by no later collection
    gc.enable()
    try:
        with tracking.added_to_finished_run(run_id):
            result = predict_split(model, test_data, stage_params.evaluate.batch_size, params.train,
                                   setup.dtype)
            lap("test pass")
            labels = test_data.labels.cpu()
            matrix = report.confusion_matrix(labels, result.predictions)
            per_class = matrix.diag() / matrix.sum(dim=1).clamp(min=1)
            metrics = {"test_accuracy": result.accuracy, "test_loss": result.loss,
                       "test_errors": int((result.predictions != labels).sum())}
            parameters = report.parameter_report(model.cpu(), params)

            # Every report is new, or (on any error) every report is as it was.
            with all_or_nothing(OUTPUTS) as staged:
                write_json(staged(METRICS_FILE), metrics)
                write_csv(staged(PER_CLASS_FILE), ("digit", "accuracy", "images"),
                          [{"digit": d, "accuracy": round(per_class[d].item(), 5),
                            "images": int(matrix[d].sum())} for d in range(NUM_CLASSES)])
                write_csv(staged(PREDICTIONS_FILE), ("actual", "predicted"),
                          [{"actual": a, "predicted": p}
                           for a, p in zip(labels.tolist(), result.predictions.tolist())])
                write_json(staged(REPORT_JSON), parameters)
                write_text(staged(REPORT_MD), report.report_markdown(parameters))
                report.plot_confusion(matrix, staged(FIGURES / "confusion_matrix.png"))
                report.plot_curves(CURVES_FILE, staged(FIGURES / "training_curves.png"))
            lap("reports and figures")

            # Per-epoch curves own the plain names; the evaluated model's figures are "final_".
            mlflow.log_metrics({f"final_{name}": value for name, value in metrics.items()})
            mlflow.log_metrics({f"test_accuracy_digit_{d}": per_class[d].item()
                                for d in range(NUM_CLASSES)})
            for path in (METRICS_FILE, REPORT_JSON, REPORT_MD, PER_CLASS_FILE):
                mlflow.log_artifact(str(path), artifact_path="reports")
            mlflow.log_artifacts(str(FIGURES), artifact_path="figures")
        lap("MLflow metrics and artifacts")
    except OSError as err:
        sys.exit(f"evaluate: error: could not write the reports ({err}); the reports in "
                 f"{REPORTS}/ are all as they were, and MLflow run {run_id} keeps its status")
    print(f"evaluate: test accuracy {result.accuracy:.4f} ({metrics['test_errors']} errors), "
          f"loss {result.loss:.4f}; {parameters['total_params']:,} parameters; "
          f"reports in {REPORTS}/")


if __name__ == "__main__":
    main()
    exit_finished()  # everything is written: skip Python's teardown of torch and MLflow
