"""Register a run's model and make it the champion only when it is better.

    python -m tools.promote                 (`make promote`: the run of models/model.pt)
    python -m tools.promote --run RUN_ID

The model is registered as a new version of `mnist-cnn` in MLflow's model registry. The alias
`champion` moves to it only when its final test accuracy beats the current champion's; a tie
keeps the champion (the incumbent needs no second look). Either way one line says why.
`models:/mnist-cnn@champion` then names the model to load or serve (`make serve`).

An accuracy is a finite number in [0, 1]: a run with anything else (NaN, inf, a percentage)
is refused, and a champion with anything else (or none) gives way to any valid challenger.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow.exceptions import MlflowException

from stages import tracking
from stages.paths import MODEL_FILE

REGISTERED_MODEL = "mnist-cnn"
ALIAS = "champion"
METRIC = "final_test_accuracy"  # logged by the evaluate stage


class PromoteError(RuntimeError):
    """The run cannot be registered: no such run, no model, no test accuracy."""


def run_of_model_file(path: Path = MODEL_FILE) -> str:
    """The MLflow run that trained models/model.pt."""
    import torch

    if not path.is_file():
        raise PromoteError(f"{path} does not exist: run `dvc repro` first, or pass --run RUN_ID")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, or one holding more than tensors
        raise PromoteError(f"{path} is not a model file written by the train stage (torch.load: "
                           f"{type(err).__name__}): run `dvc repro`, or pass --run RUN_ID") from None
    run_id = state.get("mlflow_run_id") if isinstance(state, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise PromoteError(f"{path} names no MLflow run (no \"mlflow_run_id\"): it was not "
                           f"written by the train stage; run `dvc repro`, or pass --run RUN_ID")
    return run_id


def first_line(err: BaseException) -> str:
    """The exception's type and the first line of its message, short."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def is_accuracy(value: object) -> bool:
    """A finite number in [0, 1]: NaN compares false with everything, so it must not reach a
    comparison, and a champion of NaN would never be beaten."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= 1)


def promote(client, run_id: str) -> dict:
    """Register the run's model; move the champion alias to it when it is better."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PromoteError(f"run {run_id!r} is not in the tracking store "
                           f"{tracking.redact(tracking.tracking_uri())}") from None
    accuracy = run.data.metrics.get(METRIC)
    if accuracy is None:
        raise PromoteError(f"run {run_id} has no {METRIC}: the evaluate stage did not finish "
                           f"for it, so there is nothing to compare")
    if not is_accuracy(accuracy):
        raise PromoteError(f"run {run_id} has {METRIC} {accuracy!r}: an accuracy must be a "
                           f"finite number in [0, 1]")
    if run.info.status != "FINISHED":
        raise PromoteError(f"run {run_id} is {run.info.status}, not FINISHED")
    try:
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, ALIAS)
    except MlflowException:
        champion = None
    if champion is not None and champion.run_id == run_id:
        return {"promoted": False, "version": champion.version,
                "reason": f"run {run_id} is already the {ALIAS} (version {champion.version})"}

    import mlflow

    try:
        version = mlflow.register_model(f"runs:/{run_id}/model", REGISTERED_MODEL).version
    except MlflowException as err:
        raise PromoteError(f"run {run_id}'s model cannot be registered: "
                           f"{first_line(err)}") from None
    if champion is None:
        client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
        return {"promoted": True, "version": version,
                "reason": f"first {ALIAS}: test accuracy {accuracy:.2%}"}
    best = champion_accuracy(client, champion.run_id)
    if not is_accuracy(best):
        client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
        return {"promoted": True, "version": version,
                "reason": f"test accuracy {accuracy:.2%} replaces the {ALIAS} (version "
                          f"{champion.version}), whose {METRIC} is not a number in [0, 1] "
                          f"({'none' if best is None else repr(best)})"}
    if accuracy > best:
        client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
        return {"promoted": True, "version": version,
                "reason": f"test accuracy {accuracy:.2%} beats the {ALIAS}'s {best:.2%} "
                          f"(version {champion.version})"}
    return {"promoted": False, "version": version,
            "reason": f"test accuracy {accuracy:.2%} does not beat the {ALIAS}'s {best:.2%} "
                      f"(version {champion.version} stays {ALIAS})"}


def champion_accuracy(client, run_id: str) -> float | None:
    """The champion's test accuracy as its run has it; None when the run or the metric is gone."""
    try:
        return client.get_run(run_id).data.metrics.get(METRIC)
    except MlflowException:
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.promote", description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="MLflow run id (default: the run of models/model.pt)")
    args = parser.parse_args(argv)
    try:
        tracking.connect()
        run_id = args.run or run_of_model_file()
        result = promote(tracking.client(), run_id)
    except (PromoteError, tracking.TrackingError) as err:
        sys.exit(f"promote: error: {err}")
    verb = "promoted" if result["promoted"] else "not promoted"
    print(f"promote: {REGISTERED_MODEL} version {result['version']} {verb}: {result['reason']}")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
