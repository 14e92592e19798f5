"""End to end: the real `dvc repro` and `dvc exp run` in a temporary copy of this repo, on
a tiny synthetic MNIST, then the DVC outputs and the MLflow run they leave behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, synthetic_digits, write_idx

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tiny_project(dest: Path) -> Path:
    """The repo's current files (committed or not) in a fresh git repo, with conf/ made
    tiny: 2 epochs on 1,024 synthetic images, downloads off."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split()
    for name in files:
        if name.startswith(("data/", "models/", "reports/", "mlruns/")) or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    config = yaml.safe_load((dest / "conf/config.yaml").read_text())
    config["data"] = {"mirrors": [], "pypi_fallback": False, "timeout_s": 1, "verify_md5": False}
    config["train"].update(epochs=2, lr=0.05, batch_size=128, precision="fp32")
    (dest / "conf/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run([str(BIN / "python"), "-c", "from pathlib import Path; from dvc.utils.hydra import "
         "compose_and_dump; compose_and_dump(Path('params.yaml'), str(Path('conf').resolve()), "
         "None, 'config', '.', [])"], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], dest)
    raw = dest / "data/MNIST/raw"
    write_idx(raw, "train", *synthetic_digits(1024, seed=0))
    write_idx(raw, "t10k", *synthetic_digits(256, seed=1))
    # The synthetic files cannot pass the download's MNIST checksums: record them as the
    # download stage's output instead, so `dvc repro` starts at train.
    run([str(BIN / "dvc"), "commit", "-f", "download"], dest)
    return dest


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
    assert set(checkpoint) >= {"model", "state_dict", "params", "mlflow_run_id"}
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    report = json.loads((project / "reports/model_report.json").read_text())
    assert report["total_params"] == 20_978 and report["head"] == "fc"
    assert report["checks"]["fewer than 20,000 parameters"] is False
    assert report["layers"][-1]["name"] == "fc"
    curves = (project / "reports/training_curves.csv").read_text().splitlines()
    assert curves[0].split(",") == ["epoch", "train_loss", "train_accuracy", "test_loss",
                                    "test_accuracy", "lr", "epoch_seconds"]
    assert len(curves) == 3
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert (project / "reports/figures" / png).read_bytes()[:4] == b"\x89PNG"


def test_one_finished_mlflow_run_with_every_epoch(project):
    (run_,) = runs(project)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.epochs"] == "2" and run_.data.params["model.head"] == "fc"
    assert run_.data.tags["device"].startswith("cpu") and "git_commit" in run_.data.tags
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2]
    for name in ("train_loss", "train_accuracy", "test_loss", "lr", "epoch_seconds"):
        assert len(mlflow.MlflowClient().get_metric_history(run_.info.run_id, name)) == 2
    # evaluate added its metrics to the same run
    final = json.loads((project / "reports/metrics.json").read_text())["test_accuracy"]
    assert run_.data.metrics["final_test_accuracy"] == pytest.approx(final)
    assert run_.data.metrics["test_accuracy"] == pytest.approx(final)  # the last epoch's


def test_logged_model_predicts_like_model_pt(project):
    from stages.evaluate import load_model

    (run_,) = runs(project)
    model, _, run_id = load_model(project / "models/model.pt")
    assert run_id == run_.info.run_id
    logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.asarray(logged.predict(images)), expected, rtol=1e-4, atol=1e-5)


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
