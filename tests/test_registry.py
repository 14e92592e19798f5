"""tools/promote.py on a real MLflow registry (sqlite): the champion alias moves only to a
model with a better final test accuracy, and `models:/mnist-cnn@champion` loads it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import REPO
from torch import nn

from mnistlab.model import PixelClassifier
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


# --- one version per run, and what each version says about itself ---------------------------


def versions_of_run(run_id: str) -> list:
    return mlflow.MlflowClient().search_model_versions(
        f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")


def test_a_run_promoted_again_keeps_its_one_version(experiment):
    """`make promote` run twice (from two clones) registered one run as several versions."""
    client = mlflow.MlflowClient()
    champion, loser = logged_run(experiment, 0.9900, bias=1), logged_run(experiment, 0.9800, bias=2)
    assert str(promote(client, champion)["version"]) == "1"
    first, again = promote(client, loser), promote(client, loser)
    assert (str(first["version"]), str(again["version"])) == ("2", "2")
    assert first["registered"] and not again["registered"] and not again["promoted"]

    better = promote(client, logged_run(experiment, 0.9950, bias=3))  # another run in between
    assert better["promoted"] and str(better["version"]) == "3"
    third = promote(client, loser)
    assert str(third["version"]) == "2" and not third["registered"]
    assert "does not beat the champion's 99.50% (version 3 stays champion)" in third["reason"]
    dethroned = promote(client, champion)  # no longer the champion: its version 1 is reused
    assert str(dethroned["version"]) == "1" and not dethroned["registered"]
    for run_id in (champion, loser):
        assert len(versions_of_run(run_id)) == 1
    assert len(client.search_model_versions(f"name='{REGISTERED_MODEL}'")) == 3
    assert champion_class() == 3


def test_a_run_with_several_versions_reuses_the_first(experiment):
    """Versions an earlier promote left (1, 4 and 5 of one run) get no sixth; the first is
    the run's version."""
    client = mlflow.MlflowClient()
    run_id = logged_run(experiment, 0.9700, bias=1)
    for _ in range(2):
        mlflow.register_model(f"runs:/{run_id}/model", REGISTERED_MODEL)
    result = promote(client, run_id)
    assert str(result["version"]) == "1" and not result["registered"] and result["promoted"]
    assert len(versions_of_run(run_id)) == 2


def test_two_promotes_of_one_run_at_once_leave_one_version(experiment, monkeypatch):
    """Both find no version and both register: the later one gives its version up."""
    client = mlflow.MlflowClient()
    run_id = logged_run(experiment, 0.9700, bias=1)
    register = mlflow.register_model

    def other_clone_first(*args, **kwargs):
        register(f"runs:/{run_id}/model", REGISTERED_MODEL)  # the other clone's promote
        return register(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", other_clone_first)
    result = promote(client, run_id)
    assert str(result["version"]) == "1" and result["promoted"]
    assert [str(v.version) for v in versions_of_run(run_id)] == ["1"]
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, ALIAS).version) == "1"


def evaluated_run(tmp_path, experiment: str, accuracy: float, bias: float,
                  mlflow_commit: str | None = None) -> str:
    """A run as the train and evaluate stages leave it: the params, the tags, MNIST as the
    dataset input, the test accuracy and the parameter report among the artifacts."""
    from mnistlab import lineage, tracking
    from mnistlab.report import parameter_report, report_markdown
    from mnistlab.model import build_model
    from mnistlab.config import compose, parse_params

    run_id = logged_run(experiment, accuracy, bias)
    params = parse_params(compose("default"))
    tracking.log_params(run_id, params)
    lock = tmp_path / "dvc.lock"
    lock.write_text("stages:\n  download:\n    outs:\n    - path: data/MNIST/raw\n"
                    "      md5: 0123456789abcdef0123456789abcdef.dir\n")
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    report = parameter_report(build_model(params.model), params)
    (reports / "model_report.json").write_text(json.dumps(report))
    (reports / "model_report.md").write_text(report_markdown(report))
    client = mlflow.MlflowClient()
    if "mlflow.source.git.commit" in client.get_run(run_id).data.tags:  # pytest's own checkout
        client.delete_tag(run_id, "mlflow.source.git.commit")
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"device": "cpu (2 threads)", "preset": params.base.preset,
                         "git_commit": "a" * 40,
                         **({"mlflow.source.git.commit": mlflow_commit} if mlflow_commit else {})})
        lineage.log_dataset(Path("data/MNIST/raw"), verified=True, lock_file=lock)
        for name in ("model_report.json", "model_report.md"):
            mlflow.log_artifact(str(reports / name), artifact_path="reports")
    return run_id


def test_a_version_says_what_it_is(tmp_path, experiment):
    client = mlflow.MlflowClient()
    run_id = evaluated_run(tmp_path, experiment, 0.9954, bias=1, mlflow_commit="b" * 40)
    version = client.get_model_version(REGISTERED_MODEL, promote(client, run_id)["version"])
    run = client.get_run(run_id)
    report = json.loads((tmp_path / "reports" / "model_report.json").read_text())
    params = run.data.params
    digest = hashlib.sha256(json.dumps(dict(sorted(params.items())),
                                       separators=(",", ":")).encode()).hexdigest()[:16]
    card = f"runs:/{run_id}/reports/model_report.md"
    assert version.tags == {
        "preset": params["base.preset"], "seed": params["base.seed"], "test_accuracy": "0.9954",
        "parameters": str(report["total_params"]), "params_digest": digest,
        "data_digest": "0123456789abcdef0123456789abcdef", "git_commit": "b" * 40,
        "model_card": card, "promotion": "promoted: first champion: test accuracy 99.54%"}
    assert version.description == (
        f"Preset {params['base.preset']}, seed {params['base.seed']}: test accuracy 99.54%, "
        f"{report['total_params']:,} parameters, trained on cpu (2 threads). Model card: {card}")
    # The model card is the evaluate stage's report, as the run's artifacts hold it.
    downloaded = Path(mlflow.artifacts.download_artifacts(card, dst_path=str(tmp_path / "card")))
    assert downloaded.read_text() == (tmp_path / "reports" / "model_report.md").read_text()
    assert "Total parameters:" in downloaded.read_text()

    # Promoted again, the same run keeps the same tags: the digests are stable.
    promote(client, logged_run(experiment, 0.9960, bias=2))
    promote(client, run_id)
    again = client.get_model_version(REGISTERED_MODEL, version.version)
    assert {k: v for k, v in again.tags.items() if k != "promotion"} == {
        k: v for k, v in version.tags.items() if k != "promotion"}


def test_a_decision_not_to_promote_is_recorded_with_its_reason(tmp_path, experiment):
    client = mlflow.MlflowClient()
    champion = promote(client, evaluated_run(tmp_path, experiment, 0.9950, bias=1))["version"]
    before = client.get_model_version(REGISTERED_MODEL, champion)
    loser = evaluated_run(tmp_path, experiment, 0.9910, bias=2)  # the stages' git_commit only
    version = client.get_model_version(REGISTERED_MODEL, promote(client, loser)["version"])
    assert version.tags["promotion"] == ("not promoted: test accuracy 99.10% does not beat the "
                                         f"champion's 99.50% (version {champion} stays champion)")
    assert version.tags["git_commit"] == "a" * 40
    assert version.tags["model_card"] == f"runs:/{loser}/reports/model_report.md"
    after = client.get_model_version(REGISTERED_MODEL, champion)  # the champion's: untouched
    assert (after.tags, after.description) == (before.tags, before.description)
    assert after.tags["promotion"] == "promoted: first champion: test accuracy 99.50%"
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, ALIAS).version) == champion


def test_a_run_without_a_model_card_says_so(experiment):
    """A run the evaluate stage logged no report for (made by hand, or an older one): no link
    to a file that is not there, and nothing made up."""
    client = mlflow.MlflowClient()
    run_id = logged_run(experiment, 0.9800, bias=1)
    version = client.get_model_version(REGISTERED_MODEL, promote(client, run_id)["version"])
    assert "model_card" not in version.tags and "parameters" not in version.tags
    assert version.tags["test_accuracy"] == "0.98"
    assert version.description.endswith(
        "No model card: the run has no reports/model_report.md among its artifacts.")
