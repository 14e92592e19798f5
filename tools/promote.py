"""Register a run's model and make it the champion only when it is better.

    python -m tools.promote                 (`make promote`: the run of models/model.pt)
    python -m tools.promote --run RUN_ID

The model is registered as a new version of `mnist-cnn` in MLflow's model registry. The alias
`champion` moves to it only when its final test accuracy beats the current champion's; a tie
keeps the champion (the incumbent needs no second look). Either way one line says why.
`models:/mnist-cnn@champion` then names the model to load or serve (`make serve`).
"""

from __future__ import annotations

import argparse
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
    return torch.load(path, map_location="cpu", weights_only=True)["mlflow_run_id"]


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

    version = mlflow.register_model(f"runs:/{run_id}/model", REGISTERED_MODEL).version
    if champion is None:
        client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
        return {"promoted": True, "version": version,
                "reason": f"first {ALIAS}: test accuracy {accuracy:.2%}"}
    best = client.get_run(champion.run_id).data.metrics.get(METRIC, float("-inf"))
    if accuracy > best:
        client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
        return {"promoted": True, "version": version,
                "reason": f"test accuracy {accuracy:.2%} beats the {ALIAS}'s {best:.2%} "
                          f"(version {champion.version})"}
    return {"promoted": False, "version": version,
            "reason": f"test accuracy {accuracy:.2%} does not beat the {ALIAS}'s {best:.2%} "
                      f"(version {champion.version} stays {ALIAS})"}


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
