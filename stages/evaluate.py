"""Stage `evaluate`: test models/model.pt, write metrics, plots and the parameter report.

    python -m stages.evaluate

Adds its metrics and reports to the MLflow run the train stage opened for this model.
"""

from __future__ import annotations

from stages import timing  # first: the stage's own imports are timed from here

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from torch import nn  # noqa: E402

from stages import tracking  # noqa: E402
from stages.data import DataError, load_split  # noqa: E402
from stages.device import configure, resolve_device, resolve_precision  # noqa: E402
from stages.files import all_or_nothing, write_atomic, write_csv, write_json, write_text  # noqa: E402
from stages.loop import predict_split  # noqa: E402
from stages.mnist import NUM_CLASSES  # noqa: E402
from stages.model import build_model, count_parameters, layer_table  # noqa: E402
from stages.params import Params, ParamsError, load_params, parse_params  # noqa: E402
from stages.paths import (  # noqa: E402
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

PARAM_LIMIT = 20_000  # the sources' assignment: fewer than 20k parameters


class ModelFileError(RuntimeError):
    """models/model.pt is missing, truncated or not a model this pipeline wrote."""


def load_model(path: Path = MODEL_FILE) -> tuple[nn.Module, Params, str]:
    """Rebuild the model from its checkpoint; returns (model, training params, MLflow run id)."""
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
        params = parse_params(checkpoint["params"])
        model = build_model(params.model)
        model.load_state_dict(checkpoint["state_dict"])
        return model, params, checkpoint["mlflow_run_id"]
    except FileNotFoundError:
        raise ModelFileError(f"{path} not found; run `dvc repro train`") from None
    except Exception as err:  # noqa: BLE001 - truncated, garbage, or foreign: one clear message
        detail = next((line.strip() for line in str(err).splitlines()
                       if line.strip() and "weights_only" not in line), "")
        raise ModelFileError(f"{path} is not a readable model checkpoint of this pipeline "
                             f"({type(err).__name__}{': ' + detail[:200] if detail else ''}); "
                             f"rerun `dvc repro train`") from None


def suite_checks(model: nn.Module) -> dict[str, bool]:
    """The assertions of the two sources' test suites that ship with code (README 000's
    tests/test_model.py, README 003's test_model.py), each as its suite writes it. They agree
    but for the dropout check: README 000 asserts an `nn.Dropout2d`, README 003 an `nn.Dropout`
    (neither class is the other's subclass). Neither suite checks epochs or accuracy."""
    modules = list(model.modules())
    return {
        f"fewer than {PARAM_LIMIT:,} parameters": count_parameters(model) < PARAM_LIMIT,
        "has nn.BatchNorm2d": any(isinstance(m, nn.BatchNorm2d) for m in modules),
        "has nn.Dropout (README 003's suite)": any(isinstance(m, nn.Dropout) for m in modules),
        "has nn.Dropout2d (README 000's suite)": any(isinstance(m, nn.Dropout2d) for m in modules),
        "has nn.AdaptiveAvgPool2d or nn.Linear": any(
            isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear)) for m in modules),
    }


def parameter_report(model: nn.Module, params: Params) -> dict:
    """The per-layer table plus the checks the sources' own test suites make."""
    return {
        "preset": params.base.preset,
        "head": params.model.head,
        "layers": layer_table(model),
        "total_params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "checks": suite_checks(model),
    }


def report_markdown(report: dict) -> str:
    lines = [f"# Model report: {report['preset']} ({report['head']} head)", "",
             "| layer | type | output shape | parameters | receptive field |",
             "| --- | --- | --- | ---: | ---: |"]
    for row in report["layers"]:
        shape = "x".join(str(d) for d in row["output_shape"])
        lines.append(f"| {row['name']} | {row['type']} | {shape} | {row['params']:,} | "
                     f"{row['receptive_field']} |")
    lines += ["", f"Total parameters: **{report['total_params']:,}** "
              f"(trainable: {report['trainable_params']:,})", "", "| check | result |",
              "| --- | --- |"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """[true class, predicted class] -> count."""
    return torch.bincount(labels * NUM_CLASSES + predictions,
                          minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)


def plot_confusion(matrix: torch.Tensor, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(matrix.log1p(), cmap="Blues")
    classes = torch.arange(NUM_CLASSES)
    for (true, pred), count in zip(torch.cartesian_prod(classes, classes).tolist(),
                                   matrix.flatten().tolist()):
        if count:
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=7,
                    color="white" if true == pred else "black")
    ax.set(xlabel="predicted", ylabel="true", xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES),
           title="Confusion matrix (test set)")
    _save_figure(fig, path)


def plot_curves(curves: Path, path: Path) -> None:
    with curves.open() as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    holdout = "val" if rows and rows[0].get("val_loss") else "test"  # train.validation on or off
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", holdout):
        loss_ax.plot(epochs, [float(r[f"{split}_loss"]) for r in rows], marker="o", label=split)
        acc_ax.plot(epochs, [float(r[f"{split}_accuracy"]) for r in rows], marker="o", label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    _save_figure(fig, path)


def _save_figure(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


OUTPUTS = (METRICS_FILE, PER_CLASS_FILE, PREDICTIONS_FILE, REPORT_JSON, REPORT_MD,
           FIGURES / "confusion_matrix.png", FIGURES / "training_curves.png")


def main() -> None:
    lap = timing.Laps("evaluate")
    lap("start-up and imports")
    try:
        stage_params = load_params()
        model, params, run_id = load_model()
        device = resolve_device(stage_params.train.device)
        dtype = resolve_precision(params.train.precision, device)
        test_data = load_split(train=False, limit=params.train.limit_test, device=device,
                               verify_md5=stage_params.data.verify_md5)
        tracking.connect()
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        sys.exit(f"evaluate: error: MLflow run {run_id} of {MODEL_FILE} is not in "
                 f"{tracking.redact(tracking.tracking_uri())}; rerun `dvc repro train`")
    except (ParamsError, DataError, ModelFileError, tracking.TrackingError) as err:
        sys.exit(f"evaluate: error: {err}")

    configure(device)
    model = model.to(device)
    lap("params, model, test data and MLflow store")
    try:
        with tracking.added_to_finished_run(run_id):
            result = predict_split(model, test_data, stage_params.evaluate.batch_size, params.train, dtype)
            lap("test pass")
            labels = test_data.labels.cpu()
            matrix = confusion_matrix(labels, result.predictions)
            per_class = matrix.diag() / matrix.sum(dim=1).clamp(min=1)
            metrics = {"test_accuracy": result.accuracy, "test_loss": result.loss,
                       "test_errors": int((result.predictions != labels).sum())}
            report = parameter_report(model.cpu(), params)

            # Every report is new, or (on any error) every report is as it was.
            with all_or_nothing(OUTPUTS) as staged:
                write_json(staged(METRICS_FILE), metrics)
                write_csv(staged(PER_CLASS_FILE), ("digit", "accuracy", "images"),
                          [{"digit": d, "accuracy": round(per_class[d].item(), 5),
                            "images": int(matrix[d].sum())} for d in range(NUM_CLASSES)])
                write_csv(staged(PREDICTIONS_FILE), ("actual", "predicted"),
                          [{"actual": a, "predicted": p}
                           for a, p in zip(labels.tolist(), result.predictions.tolist())])
                write_json(staged(REPORT_JSON), report)
                write_text(staged(REPORT_MD), report_markdown(report))
                plot_confusion(matrix, staged(FIGURES / "confusion_matrix.png"))
                plot_curves(CURVES_FILE, staged(FIGURES / "training_curves.png"))
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
          f"loss {result.loss:.4f}; {report['total_params']:,} parameters; "
          f"reports in {REPORTS}/")


if __name__ == "__main__":
    main()
