"""tools/promote.py on a real MLflow registry (sqlite): the champion alias moves only to a
model with a better final test accuracy, and `models:/mnist-cnn@champion` loads it."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

from stages.model import PixelClassifier
from tools.promote import ALIAS, REGISTERED_MODEL, PromoteError, promote


@pytest.fixture
def experiment(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.create_experiment("mnist-cnn", artifact_location=(tmp_path / "mlruns").as_uri())


def logged_run(experiment: str, accuracy: float | None, bias: float) -> str:
    """A finished run with a tiny model whose every output favours class `bias` (so the
    loaded champion can be told apart) and, unless None, a final test accuracy."""
    network = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with torch.no_grad():
        network[1].weight.zero_()
        network[1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(int(bias)), 10).float())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.pytorch.log_model(PixelClassifier(network, 0.1307, 0.3081), name="model",
                                 input_example=np.zeros((2, 28, 28), dtype=np.float32),
                                 pip_requirements=["torch"])
        if accuracy is not None:
            mlflow.log_metric("final_test_accuracy", accuracy)
    return run.info.run_id


def champion_class() -> int:
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{ALIAS}")
    return int(np.argmax(model.predict(np.zeros((1, 28, 28), dtype=np.float32))[0]))


def test_the_champion_moves_only_to_a_better_model(experiment):
    client = mlflow.MlflowClient()
    first = promote(client, logged_run(experiment, 0.9900, bias=1))
    assert first["promoted"] and "first champion" in first["reason"]
    assert champion_class() == 1

    worse = promote(client, logged_run(experiment, 0.9800, bias=2))
    assert not worse["promoted"]
    assert "98.00% does not beat the champion's 99.00%" in worse["reason"]
    tie = promote(client, logged_run(experiment, 0.9900, bias=3))
    assert not tie["promoted"]
    assert champion_class() == 1

    better_run = logged_run(experiment, 0.9950, bias=4)
    better = promote(client, better_run)
    assert better["promoted"] and "99.50% beats the champion's 99.00%" in better["reason"]
    assert champion_class() == 4
    again = promote(client, better_run)
    assert not again["promoted"] and "already the champion" in again["reason"]
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert len(versions) == 4  # every candidate registered once, the champion never twice


@pytest.mark.bad_input
def test_a_run_without_test_accuracy_or_unknown_is_refused(experiment):
    client = mlflow.MlflowClient()
    with pytest.raises(PromoteError, match="has no final_test_accuracy"):
        promote(client, logged_run(experiment, None, bias=0))
    with pytest.raises(PromoteError, match="'nope' is not in the tracking store"):
        promote(client, "nope")
    assert client.search_model_versions(f"name = '{REGISTERED_MODEL}'") == []


@pytest.mark.bad_input
@pytest.mark.parametrize("accuracy", [float("nan"), float("inf"), -0.01, 1.5, 99.5],
                         ids=["NaN", "inf", "negative", "above 1", "a percentage"])
def test_a_run_whose_accuracy_is_not_in_0_1_is_refused(experiment, accuracy):
    client = mlflow.MlflowClient()
    with mlflow.start_run(experiment_id=experiment) as run:  # refused before its model is looked at
        mlflow.log_metric("final_test_accuracy", accuracy)
    with pytest.raises(PromoteError) as refused:
        promote(client, run.info.run_id)
    message = str(refused.value)
    assert message.startswith(f"run {run.info.run_id} has final_test_accuracy "), message
    assert message.endswith("an accuracy must be a finite number in [0, 1]"), message
    assert "\n" not in message
    assert client.search_model_versions(f"name = '{REGISTERED_MODEL}'") == []


@pytest.mark.parametrize("incumbent", [float("nan"), None], ids=["NaN", "missing"])
def test_a_champion_whose_accuracy_is_not_a_number_gives_way(experiment, incumbent):
    """A champion made before runs with such accuracies were refused must not block every
    later model (NaN compares false with everything)."""
    client = mlflow.MlflowClient()
    old = mlflow.register_model(f"runs:/{logged_run(experiment, incumbent, bias=1)}/model",
                                REGISTERED_MODEL).version
    client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, old)
    result = promote(client, logged_run(experiment, 0.9700, bias=2))
    assert result["promoted"], result
    assert (f"test accuracy 97.00% replaces the champion (version {old}), whose "
            f"final_test_accuracy is not a number in [0, 1] "
            f"({'nan' if incumbent is not None else 'none'})") == result["reason"]
    assert champion_class() == 2


# --- `make promote` (python -m tools.promote) on a models/model.pt it did not write ----------


@pytest.mark.bad_input
@pytest.mark.parametrize("content", ["text", "no run id"])
def test_promote_on_a_foreign_model_file_is_one_line(tmp_path, content):
    (tmp_path / "models").mkdir()
    model_file = tmp_path / "models" / "model.pt"
    if content == "text":
        model_file.write_text("not a model\n")
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, model_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(REPO),
               MLFLOW_DISABLE_TELEMETRY="true")
    mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()  # the store
    result = subprocess.run([sys.executable, "-m", "tools.promote"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("promote: error: models/model.pt "), lines
    assert ("is not a model file written by the train stage" if content == "text"
            else 'names no MLflow run (no "mlflow_run_id")') in lines[0], lines
