"""The evaluate stage's reports: the parameter report with the sources' own test-suite checks,
the confusion matrix, and the figures.

The figures are drawn with matplotlib's Agg backend: files only, no display needed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mnistlab.config import Params  # noqa: E402
from mnistlab.files import write_atomic  # noqa: E402
from mnistlab.mnist import NUM_CLASSES  # noqa: E402
from mnistlab.model import count_parameters, layer_table  # noqa: E402

PARAM_LIMIT = 20_000  # the sources' assignment: fewer than 20k parameters


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
