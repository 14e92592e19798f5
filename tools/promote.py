"""Register a run's model and make it the champion only when it is better.

    python -m tools.promote                 (`make promote`: the run of models/model.pt)
    python -m tools.promote --run RUN_ID

The model is registered as a version of `mnist-cnn` in MLflow's model registry, once per run:
promoting a run again (from this clone or another) reuses its version. The alias `champion`
moves to it only when its final test accuracy beats the current champion's; a tie keeps the
champion (the incumbent needs no second look). Either way one line says why, and the version
keeps that line as its tag `promotion`; the champion's own version is left as it is.

Each version says what it is: a description (preset, test accuracy, parameters, device, and
its model card) and tags `preset`, `seed`, `test_accuracy`, `parameters`, `params_digest` (of
the run's logged params), `data_digest` (of the MNIST files it trained on), `git_commit` and
`model_card` (`runs:/<run id>/reports/model_report.md`, the evaluate stage's parameter report).
`models:/mnist-cnn@champion` then names the model to load or serve (`make serve`).

An accuracy is a finite number in [0, 1]: a run with anything else (NaN, inf, a percentage)
is refused, and a champion with anything else (or none) gives way to any valid challenger.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow.exceptions import MlflowException

from mnistlab import tracking
from mnistlab.paths import MODEL_FILE, REPORT_JSON, REPORT_MD

REGISTERED_MODEL = "mnist-cnn"
ALIAS = "champion"
METRIC = "final_test_accuracy"  # logged by the evaluate stage
# The evaluate stage logs its parameter report under the run's artifacts as reports/<name>:
# the markdown is the model card a version links to, the JSON holds the parameter count.
MODEL_CARD = f"reports/{REPORT_MD.name}"
MODEL_REPORT = f"reports/{REPORT_JSON.name}"
DECISION_TAG = "promotion"


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
    """Register the run's model (or reuse its version); move the champion alias to it when it
    is better, and record the decision on the version."""
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
        return {"promoted": False, "version": str(champion.version), "registered": False,
                "reason": f"run {run_id} is already the {ALIAS} (version {champion.version})"}

    description, tags = version_card(client, run)
    version = first_version(client, run_id)
    registered = version is None
    if registered:
        version = register(client, run_id, tags)
    else:  # registered by an earlier promote (perhaps before versions carried these tags)
        for key, value in tags.items():
            client.set_model_version_tag(REGISTERED_MODEL, version, key, value)
    client.update_model_version(REGISTERED_MODEL, version, description=description)
    result = {"registered": registered, **decide(client, champion, version, accuracy)}
    verb = "promoted" if result["promoted"] else "not promoted"
    client.set_model_version_tag(REGISTERED_MODEL, version, DECISION_TAG,
                                 f"{verb}: {result['reason']}")
    return result


def decide(client, champion, version: str, accuracy: float) -> dict:
    """Move the champion alias to `version` when it is better; what was decided, and why."""
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


def versions_of(client, run_id: str) -> list:
    """The versions of the registered model made from `run_id`, oldest first."""
    found = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")
    return sorted(found, key=lambda version: int(version.version))


def first_version(client, run_id: str) -> str | None:
    """The run's version, if it has one: the oldest, where an earlier promote made several.
    A string, as MLflow's REST API gives it (a sqlite store gives numbers)."""
    versions = versions_of(client, run_id)
    return str(versions[0].version) if versions else None


def register(client, run_id: str, tags: Mapping[str, str]) -> str:
    """A new version of the run's model. Two promotes of one run at the same moment (two
    clones) could both find no version and both register one: the later one then deletes its
    own and takes the first, so the run still ends with one version."""
    import mlflow

    try:
        version = str(mlflow.register_model(f"runs:/{run_id}/model", REGISTERED_MODEL,
                                            tags=dict(tags)).version)
    except MlflowException as err:
        raise PromoteError(f"run {run_id}'s model cannot be registered: "
                           f"{first_line(err)}") from None
    first = first_version(client, run_id)
    if first is not None and first != version:
        client.delete_model_version(REGISTERED_MODEL, version)
        return first
    return version


def version_card(client, run) -> tuple[str, dict[str, str]]:
    """What a version of `run` says about itself: its description and tags. A value the run
    does not have (an older run, a run made by hand) is left out rather than made up."""
    run_id, params, run_tags = run.info.run_id, run.data.params, run.data.tags
    accuracy = run.data.metrics[METRIC]
    card = model_card(client, run_id)
    parameters = parameter_count(run_id) if card else None
    tags = {
        "preset": params.get("base.preset") or run_tags.get("preset"),
        "seed": params.get("base.seed"),
        "test_accuracy": repr(accuracy),
        "parameters": None if parameters is None else str(parameters),
        "params_digest": params_digest(params) if params else None,
        "data_digest": data_digest(run),
        # MLflow sets the first when it can tell the source's commit; the stages tag the second.
        "git_commit": run_tags.get("mlflow.source.git.commit") or run_tags.get("git_commit"),
        "model_card": card,
    }
    tags = {key: value for key, value in tags.items() if value}
    what = ", ".join(filter(None, [
        f"Preset {tags['preset']}" if "preset" in tags else "Unknown preset",
        f"seed {tags['seed']}" if "seed" in tags else None]))
    description = (f"{what}: test accuracy {accuracy:.2%}, "
                   f"{f'{parameters:,}' if parameters is not None else 'an unknown number of'} "
                   f"parameters, trained on {run_tags.get('device', 'an unknown device')}. "
                   + (f"Model card: {card}" if card else
                      f"No model card: the run has no {MODEL_CARD} among its artifacts."))
    return description, tags


def model_card(client, run_id: str) -> str | None:
    """`runs:/<run id>/reports/model_report.md` when the run's artifacts hold that file."""
    try:
        files = client.list_artifacts(run_id, MODEL_CARD.rpartition("/")[0])
    except (MlflowException, OSError):
        return None
    return f"runs:/{run_id}/{MODEL_CARD}" if any(f.path == MODEL_CARD for f in files) else None


def parameter_count(run_id: str) -> int | None:
    """The model's parameters as the evaluate stage's report counts them (the stages log the
    count in no metric or param of the run)."""
    import mlflow

    try:
        total = mlflow.artifacts.load_dict(f"runs:/{run_id}/{MODEL_REPORT}").get("total_params")
    except (MlflowException, OSError, ValueError, AttributeError):
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def params_digest(params: Mapping[str, str]) -> str:
    """A digest of the run's logged params (flattened names, values as MLflow stores them):
    two versions with the same digest were trained with the same params, seed included."""
    logged = json.dumps(dict(sorted(params.items())), separators=(",", ":"))
    return hashlib.sha256(logged.encode()).hexdigest()[:16]


def data_digest(run) -> str | None:
    """The digest of the MNIST dataset the train stage logged as the run's input."""
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return next((i.dataset.digest for i in inputs if i.dataset.name == "mnist"), None)


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
    except MlflowException as err:  # the registry stopped answering part-way
        sys.exit(tracking.redact(f"promote: error: the model registry at "
                                 f"{tracking.tracking_uri()} failed ({first_line(err)}); "
                                 f"promoting the run again reuses its version and finishes it"))
    verb = "promoted" if result["promoted"] else "not promoted"
    known = "" if result["registered"] else " (the run's existing version)"
    print(f"promote: {REGISTERED_MODEL} version {result['version']}{known} {verb}: "
          f"{result['reason']}")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
