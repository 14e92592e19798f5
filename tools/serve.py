"""Serve the champion on a local port.

    python -m tools.serve                          (`make serve`: models:/mnist-cnn@champion)
    python -m tools.serve --model runs:/RUN_ID/model --port 5002

The command checks first that the model URI names a model (a registered model, the alias set
on one of its versions), so that a missing champion is one line rather than a traceback from
the server's start-up; then `mlflow models serve --env-manager local` takes its place. What
the served model accepts is mnistlab/served_model.py's to say.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import mlflow

DEFAULT_MODEL = "models:/mnist-cnn@champion"


def check_model(uri: str) -> None:
    """Stop with one line unless `uri` names a model that the tracking store can give."""
    from mnistlab import tracking

    store = tracking.tracking_uri()
    database = store.removeprefix("sqlite:///")
    if store.startswith("sqlite:///") and not os.path.exists(database):  # not created for this
        sys.exit(f"serve: error: cannot serve {uri}: there is no tracking store {database} (train "
                 f"a model with `dvc repro`, then `make promote` registers it as the champion)")
    try:
        mlflow.models.get_model_info(uri)
    except Exception as err:  # noqa: BLE001 - MLflow's errors for a missing model or store
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.exit(tracking.redact(
            f"serve: error: cannot serve {uri} from {store}: {first} (train "
            f"a model with `dvc repro`, then `make promote` registers it as the champion)"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"MLflow model URI ({DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)

    from mnistlab import tracking

    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()  # also for the server
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    check_model(args.model)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model,
               "--env-manager", "local", "-h", args.host, "-p", str(args.port)]
    sys.stdout.flush()
    os.execv(sys.executable, command)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
