"""End to end: the real `dvc repro` and `dvc exp run` in a temporary copy of this repo, on
a tiny synthetic MNIST, then the DVC outputs and the MLflow run they leave behind."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from helpers import BIN, post, run, serving, synthetic_digits, tiny_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tiny_project(tmp_path_factory.mktemp("project"))
    run([str(BIN / "dvc"), "repro"], root)
    return root


def runs(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list",
                              order_by=["attributes.start_time ASC"])


def test_repro_writes_model_metrics_and_reports(project):
    checkpoint = torch.load(project / "models/model.pt", weights_only=True)
    assert set(checkpoint) == {"state_dict", "params", "mlflow_run_id"}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    report = json.loads((project / "reports/model_report.json").read_text())
    assert report["total_params"] == 20_978 and report["head"] == "fc"
    assert report["checks"]["fewer than 20,000 parameters"] is False
    assert report["layers"][-1]["name"] == "fc"
    curves = (project / "reports/training_curves.csv").read_text().splitlines()
    assert curves[0].split(",") == ["epoch", "train_loss", "train_accuracy", "test_loss",
                                    "test_accuracy", "val_loss", "val_accuracy", "lr",
                                    "epoch_seconds"]
    assert len(curves) == 3
    assert all(line.split(",")[5:7] == ["", ""] for line in curves[1:])  # no validation split
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert (project / "reports/figures" / png).read_bytes()[:4] == b"\x89PNG"


def test_one_finished_mlflow_run_with_every_epoch(project):
    (run_,) = runs(project)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.epochs"] == "2" and run_.data.params["model.head"] == "fc"
    assert run_.data.tags["device"].startswith("cpu") and "git_commit" in run_.data.tags
    assert run_.data.tags["precision"] == "fp32: set by train.precision"  # the tiny project's
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2]
    for name in ("train_loss", "train_accuracy", "test_loss", "lr", "epoch_seconds"):
        assert len(mlflow.MlflowClient().get_metric_history(run_.info.run_id, name)) == 2
    # which data: the raw folder's DVC hash (as in dvc.lock) and each file's MD5
    (dataset_input,) = run_.inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist"
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert tags["dvc_hash"] == lock["stages"]["download"]["outs"][0]["md5"]
    assert tags["md5.t10k-labels-idx1-ubyte"] == hashlib.md5(
        (project / "data/MNIST/raw/t10k-labels-idx1-ubyte").read_bytes()).hexdigest()
    # evaluate added its metrics to the same run
    final = json.loads((project / "reports/metrics.json").read_text())["test_accuracy"]
    assert run_.data.metrics["final_test_accuracy"] == pytest.approx(final)
    assert run_.data.metrics["test_accuracy"] == pytest.approx(final)  # the last epoch's


def test_logged_model_predicts_like_model_pt(project):
    from mnistlab.checkpoint import load_model

    (run_,) = runs(project)
    model, _, run_id = load_model(project / "models/model.pt")
    assert run_id == run_.info.run_id
    logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    # The logged model takes what a user has: pixels 0-255, N x 28 x 28, and gives probabilities.
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.float32)
    with torch.no_grad():
        normalised = (torch.from_numpy(pixels)[:, None] / 255 - 0.1307) / 0.3081
        expected = torch.softmax(model.eval()(normalised), dim=1).numpy()
    np.testing.assert_allclose(np.asarray(logged.predict(pixels)), expected, rtol=1e-4, atol=1e-5)
    signature = mlflow.models.get_model_info(f"runs:/{run_id}/model").signature
    assert signature.inputs.inputs[0].shape == (-1, 28, 28), signature


def test_nothing_changed_nothing_rerun(project):
    started = time.perf_counter()
    out = run([str(BIN / "dvc"), "repro"], project).stdout
    assert "up to date" in out, out
    assert len(runs(project)) == 1
    print(f"no-op dvc repro: {time.perf_counter() - started:.2f} s")


def test_exp_run_gap_head_is_a_real_change(project):
    run([str(BIN / "dvc"), "exp", "run", "-n", "gap-head", "-S", "model.head=gap"], project)
    report = json.loads((project / "reports/model_report.json").read_text())
    assert report["head"] == "gap" and report["total_params"] == 11_378
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], project).stdout)
    names = json.dumps(shown)
    assert "gap-head" in names and "test_accuracy" in names
    last = runs(project)[-1]
    assert last.info.run_name == "gap-head" and last.data.tags["dvc_exp_name"] == "gap-head"
    assert last.data.params["model.head"] == "gap" and last.info.status == "FINISHED"


def test_exp_run_with_a_validation_split_scores_epochs_on_it(project):
    run([str(BIN / "dvc"), "exp", "run", "-n", "held-out", "-S", "train.validation=256"], project)
    with (project / "reports/training_curves.csv").open() as file:
        curves = list(csv.DictReader(file))
    assert [row["epoch"] for row in curves] == ["1", "2"]
    assert all(row["val_accuracy"] and not row["test_accuracy"] for row in curves)
    summary = json.loads((project / "reports/train_metrics.json").read_text())
    assert "best_val_accuracy" in summary and "best_test_accuracy" not in summary
    last = runs(project)[-1]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(last.info.run_id, "val_accuracy")] == [1, 2]
    # The test set appears once, for the final model (the evaluate stage), never per epoch.
    assert client.get_metric_history(last.info.run_id, "test_accuracy") == []
    assert "final_test_accuracy" in last.data.metrics
    assert last.data.params["train.validation"] == "256"
    # DVC draws the curves from the validation columns, with no missing-field error.
    shown = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], project).stdout)
    assert not shown.get("errors"), shown["errors"]
    fields = {row["field"] for row in shown["data"]["Accuracy"][0]["content"]["data"]["values"]}
    assert {"train_accuracy", "val_accuracy"} <= fields


# --- the model users get: registered, promoted, served --------------------------------------


@pytest.fixture(scope="module")
def server(project):
    """`make promote`, then `make serve`'s command on the champion, on a free local port."""
    promoted = run([str(BIN / "python"), "-m", "tools.promote"], project).stdout
    assert "promoted: first champion" in promoted, promoted
    with serving(project, f"sqlite:///{project / 'mlflow.db'}") as url:
        yield url


def test_served_champion_classifies_raw_test_digits(project, server):
    images, _ = synthetic_digits(64, seed=1)  # digits like the project's test set
    status, answer = post(f"{server}/invocations",
                          json.dumps({"inputs": images.astype(float).tolist()}).encode())
    assert status == 200, answer
    probabilities = np.asarray(answer["predictions"])
    assert probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    # The same classes as models/model.pt on the same pixels, normalised as in training.
    from mnistlab.checkpoint import load_model

    model, _, _ = load_model(project / "models/model.pt")
    with torch.no_grad():
        normalised = (torch.from_numpy(images).float()[:, None] / 255 - 0.1307) / 0.3081
        expected = model.eval()(normalised).argmax(dim=1).numpy()
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected)


@pytest.mark.bad_input
@pytest.mark.parametrize("body, words", [
    (b'{"inputs": [[1, 2, 3]]}', "Shape of input"),
    (b"not json", "Invalid input"),
    (b'{"wrong_key": []}', "inputs"),
], ids=["wrong shape", "not JSON", "no inputs"])
def test_bad_requests_are_refused_and_the_server_keeps_serving(server, body, words):
    status, answer = post(f"{server}/invocations", body)
    assert status == 400, answer
    assert words in json.dumps(answer), answer
    good = json.dumps({"inputs": np.zeros((1, 28, 28)).tolist()}).encode()
    assert post(f"{server}/invocations", good)[0] == 200


def test_predict_command_reads_image_files(project, server, tmp_path):
    from PIL import Image

    images, _ = synthetic_digits(3, seed=1)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image).save(paths[-1])
    local = run([str(BIN / "python"), "-m", "tools.predict", *map(str, paths)], project).stdout
    remote = run([str(BIN / "python"), "-m", "tools.predict", "--url", server, *map(str, paths)],
                 project).stdout
    assert local == remote and len(local.splitlines()) == 3, (local, remote)
    for path, line in zip(paths, local.splitlines(), strict=True):
        assert line.startswith(f"{path}: ") and "(probability " in line, line


# --- the MLflow UI in a real browser (headless Debian chromium, Playwright) ------------------


def test_ui_lists_runs_shows_charts_and_compares(project):
    from tools.mlflow_ui import (
        browser_page,
        compare_page,
        mlflow_ui,
        run_page,
        runs_page,
    )

    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's package)")
    finished = [r for r in runs(project) if r.info.status == "FINISHED"]
    if len(finished) < 2:  # run alone, without the gap-head test's experiment before it
        run([str(BIN / "dvc"), "exp", "run", "-n", "gap-head", "-S", "model.head=gap"], project)
        finished = [r for r in runs(project) if r.info.status == "FINISHED"]
    first, second = finished[0], finished[-1]
    experiment = first.info.experiment_id
    with mlflow_ui(f"sqlite:///{project / 'mlflow.db'}", project / "mlruns") as url, \
            browser_page() as page:
        # The runs table: every run under its name (the DVC experiment's, or the preset's).
        page.goto(runs_page(url, experiment))
        for run_ in finished:
            page.get_by_text(run_.info.run_name, exact=True).first.wait_for()
        # A run's page: a chart per metric, a per-epoch one drawn against the step (the
        # charts are alphabetical and drawn as they scroll into view: epoch_seconds is near
        # the top).
        page.goto(run_page(url, experiment, second.info.run_id))
        page.get_by_text("Model metrics").first.wait_for()
        page.get_by_text("epoch_seconds", exact=True).first.wait_for()
        page.get_by_text("Step", exact=True).first.wait_for()
        # The compare view of two runs, with their metrics.
        page.goto(compare_page(url, experiment, [first.info.run_id, second.info.run_id]))
        page.get_by_text("Comparing 2 Runs from 1 Experiment").first.wait_for()
        page.get_by_text("final_test_accuracy").first.wait_for()
        for run_ in (first, second):
            page.get_by_text(run_.info.run_name, exact=True).first.wait_for()


# --- a DVC remote carries data and model to another clone ---------------------------------


def test_push_then_pull_into_a_second_clone_needs_no_download_or_training(project, tmp_path):
    storage = tmp_path / "storage"
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trained"], project)
    run([str(BIN / "dvc"), "remote", "modify", "--local", "storage", "url", str(storage)], project)
    pushed = run([str(BIN / "dvc"), "push"], project).stdout
    assert "pushed" in pushed, pushed

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run([str(BIN / "dvc"), "remote", "modify", "--local", "storage", "url", str(storage)], clone)
    run([str(BIN / "dvc"), "pull"], clone)
    repro = run([str(BIN / "dvc"), "repro"], clone)
    out = repro.stdout + repro.stderr
    # The raw folder (out of DVC's cache) comes back from the pulled archive; the tiny
    # project has no mirror and no PyPI fallback, so any download would have failed.
    assert "fetched from data/MNIST/raw.tar.gz" in out, out
    assert "Running stage 'train'" not in out and "Running stage 'evaluate'" not in out, out
    for name in ("models/model.pt", "reports/metrics.json", *(f"data/MNIST/raw/{f}" for f in (
            "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        assert (clone / name).read_bytes() == (project / name).read_bytes(), name
