"""Nothing lost when a run fails, and no failure recorded as a success.

Each test is one reproduction of a way a careless or hostile input used to lose data or
record a wrong result:

1.  a refused parameter under `dvc repro` / `dvc exp run` keeps the last model and reports
    (the validate stage refuses it before DVC deletes any stage's outputs), and the train
    stage's outputs come back with `dvc checkout` after a failed run;
2.  `dvc exp run` in a fresh clone keeps MNIST files placed there by hand;
3.  an I/O error in evaluate leaves every report as it was and the training run FINISHED;
4.  a diverged run stops with one line, FAILED in MLflow, no model, no NaN in any JSON;
5.  to 9.  values that used to pass validation and crash later (in-process, fast);
10. `train.resume` after mlflow.db was deleted continues into a new run;
11. Ctrl-C during a download or a training ends with one clear line;
12. a damaged MNIST file of the right size is refused by the training stage itself.

Projects come from tests/helpers.py: make_project (stages + params + synthetic MNIST) and
tiny_project (the whole repo under git and DVC).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    BIN,
    PYTHON,
    interrupt_after_epoch_1,
    make_project,
    mlflow_runs,
    run,
    run_stage,
    stage_env,
    steps,
    tiny_project,
)

from mnistlab.data import DataError, batch_indices, load_split, steps_per_epoch
from mnistlab.loop import TrainingRun
from mnistlab.config import ParamsError, load_params, parse_params

TRAIN_OUTPUTS = ("models/model.pt", "reports/train_metrics.json", "reports/training_curves.csv")
EVALUATE_OUTPUTS = ("reports/metrics.json", "reports/model_report.json",
                    "reports/model_report.md", "reports/per_class_accuracy.csv",
                    "reports/predictions.csv", "reports/figures/confusion_matrix.png",
                    "reports/figures/training_curves.png")


def snapshot(project: Path, names=TRAIN_OUTPUTS + EVALUATE_OUTPUTS) -> dict[str, bytes]:
    return {name: (project / name).read_bytes() for name in names}


def set_param(project: Path, dotted: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=stage_env(),
                          capture_output=True, text=True, timeout=600)


def absent_device() -> str:
    return next(name for name in ("mps", "cuda") if not (
        torch.backends.mps.is_available() if name == "mps" else torch.cuda.is_available()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny repo under git and DVC, trained and evaluated once, dvc.lock committed."""
    project = tiny_project(tmp_path_factory.mktemp("trained"))
    run([str(BIN / "dvc"), "repro"], project)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trained"], project)
    return project


# --- 1. a refused value costs nothing ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("key, value", [
    ("train.lr", -1), ("train.device", absent_device()), ("train.bogus", 1),
    ("base.preset", "../../elsewhere/evil"),
], ids=["negative lr", "absent device", "unknown key", "preset path"])
def test_refused_param_keeps_the_last_model_and_reports(trained, key, value):
    before = snapshot(trained)
    set_param(trained, key, value)
    try:
        result = dvc(trained, "repro")
    finally:
        run(["git", "checkout", "params.yaml"], trained)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("validate: error:")]
    assert len(errors) == 1 and key in errors[0], result.stderr
    assert "Running stage 'train'" not in result.stdout
    assert snapshot(trained) == before


@pytest.mark.slow
@pytest.mark.bad_input
def test_preset_with_unknown_key_under_exp_run_keeps_everything(trained):
    before = snapshot(trained)
    (trained / "conf/preset/broken.yaml").write_text(
        "# @package _global_\nbase: {preset: broken}\ntrain: {learning_rate: 0.1}\n")
    try:
        result = dvc(trained, "exp", "run", "-S", "preset=broken")
    finally:
        (trained / "conf/preset/broken.yaml").unlink()
        run(["git", "checkout", "params.yaml"], trained)
    assert result.returncode != 0
    assert "validate: error: train.learning_rate: unknown key" in result.stderr, result.stderr
    assert snapshot(trained) == before


@pytest.mark.slow
@pytest.mark.fault
def test_train_outputs_come_back_with_dvc_checkout_after_a_failed_run(trained):
    before = snapshot(trained, TRAIN_OUTPUTS)
    set_param(trained, "train.lr", 1e30)
    try:
        result = dvc(trained, "repro", "train")
        assert result.returncode != 0 and "diverged" in result.stderr, result.stderr
    finally:
        run(["git", "checkout", "params.yaml"], trained)
    restored = dvc(trained, "checkout")
    assert restored.returncode == 0, restored.stderr
    assert snapshot(trained, TRAIN_OUTPUTS) == before


# --- 2. files placed by hand survive dvc exp run in a fresh clone ----------------------------


@pytest.mark.slow
@pytest.mark.fault
def test_exp_run_in_a_fresh_clone_keeps_hand_placed_mnist(trained, tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(trained), str(clone)], tmp_path)
    raw = "data/MNIST/raw"
    shutil.copytree(trained / raw, clone / raw)
    placed = {path.name: path.read_bytes() for path in (clone / raw).iterdir()}
    result = dvc(clone, "exp", "run", "-S", "train.epochs=1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {path.name: path.read_bytes() for path in (clone / raw).iterdir()} == placed


# --- 3. evaluate: all reports new or all as they were -----------------------------------------


@pytest.mark.slow
@pytest.mark.fault
def test_evaluate_io_error_keeps_reports_and_run_status(tmp_path):
    project = make_project(tmp_path / "project", epochs=1)
    assert run_stage(project, "train").returncode == 0
    assert run_stage(project, "evaluate").returncode == 0
    for name in EVALUATE_OUTPUTS:  # mark every report, so "as it was" is visible
        (project / name).write_bytes(b"old " + name.encode())
    before = snapshot(project, EVALUATE_OUTPUTS)
    blocked = project / "reports/model_report.json"
    blocked.unlink()
    blocked.mkdir()  # something that cannot be replaced by a file
    (blocked / "keep").write_text("x")
    del before["reports/model_report.json"]

    result = run_stage(project, "evaluate")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("evaluate: error: could not write the reports")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(project, before) == before
    (run,) = mlflow_runs(project)
    assert run.info.status == "FINISHED"
    assert "evaluate_error" in run.data.tags


# --- 4. divergence ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.fault
def test_divergence_stops_the_run_failed_with_one_line(tmp_path):
    project = make_project(tmp_path / "project", lr=1e30, epochs=2)
    result = run_stage(project, "train")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: training diverged in epoch 1:"), result.stderr
    assert "train.lr (now 1e+30)" in last and "train.grad_clip" in last
    (run,) = mlflow_runs(project)
    assert run.info.status == "FAILED"
    assert not (project / "models/model.pt").exists()
    assert not (project / "models/checkpoint.pt").exists()  # no epoch finished finite
    for path in (project / "reports").glob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


# --- 5. to 9. values that used to crash after work started ------------------------------------


def _params(**changes) -> dict:
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml").model_dump(mode="json")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    return params


@pytest.mark.bad_input
def test_seed_beyond_what_every_library_takes_is_refused():
    with pytest.raises(ParamsError, match=r"^base.seed = 18446744073709551616: .*4294967295"):
        parse_params(_params(base__seed=2**64))


ONE_BY_ONE = [{"conv": 8}, {"maxpool": 4}, {"maxpool": 7}, {"conv": 8}]  # BatchNorm on 1x1


@pytest.mark.bad_input
def test_batch_of_one_on_a_one_by_one_batchnorm_is_refused():
    with pytest.raises(ParamsError, match=r"^train.batch_size = 1: the BatchNorm of "
                                          r"model.layers.3 sees a 1x1 feature map"):
        parse_params(_params(model__layers=ONE_BY_ONE, train__batch_size=1))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16, 17, 33, 64, 65, 129])
@pytest.mark.parametrize("batch_size", [1, 2, 8, 32])
def test_no_last_batch_of_one_and_the_schedule_knows_it(n, batch_size):
    batches = batch_indices(n, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                            device="cpu")
    assert len(batches) == steps_per_epoch(n, batch_size)
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    if batch_size > 1 and n > 1:
        assert all(len(batch) > 1 for batch in batches)


def test_one_by_one_batchnorm_trains_when_the_last_batch_would_be_one(tiny_mnist):
    """65 images in batches of 64 used to leave a batch of one for the 1x1 BatchNorm."""
    params = parse_params(_params(model__layers=ONE_BY_ONE, model__head="gap", train__epochs=1,
                                  train__batch_size=64, train__scheduler="onecycle"))
    train = load_split(train=True, root=tiny_mnist, limit=65, verify_md5=False)
    test = load_split(train=False, root=tiny_mnist, limit=32, verify_md5=False)
    run = TrainingRun.start(params, train, test, torch.float32, eval_batch_size=32, seed=0)
    (metrics,) = run.epochs()
    assert metrics["epoch"] == 1


@pytest.mark.bad_input
def test_model_too_large_for_memory_is_refused_before_work():
    from mnistlab import plan

    huge = [{"conv": 1024, "kernel": 1, "padding": 28}] * 4
    with pytest.raises(ParamsError) as caught:
        plan.check(_params(model__layers=huge, train__device="cpu"))
    message = str(caught.value)
    assert message.startswith("model.layers: training this model needs about ")
    assert "653,440,010 parameters" in message and "GiB" in message and "train.batch_size" in message


@pytest.mark.bad_input
@pytest.mark.parametrize("preset", ["../../../some/dir/evil", "/etc/passwd", "I1/../../x"])
def test_preset_must_be_a_plain_name(preset):
    with pytest.raises(ParamsError, match=r"^base.preset = "):
        parse_params(_params(base__preset=preset))


@pytest.mark.bad_input
def test_preset_names_the_files_of_conf_preset(tmp_path):
    from mnistlab.config import check_preset

    (tmp_path / "I1.yaml").write_text("")
    (tmp_path / "I3.yaml").write_text("")
    raw = _params(base__preset="I9")
    with pytest.raises(ParamsError, match=r"^base.preset = 'I9': should be a name from .*: I1, I3"):
        check_preset(raw, parse_params(raw), tmp_path)
    raw["preset"] = {"train": {"lr": 5}}  # what Hydra makes of a file that is not a preset
    with pytest.raises(ParamsError, match=r"^preset: .* not a preset; use a name from .*: I1, I3"):
        check_preset(raw, parse_params(_params()), tmp_path)


@pytest.mark.bad_input
def test_yaml_alias_bomb_gives_a_short_message(tmp_path):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level in "bcde":  # 9**5 = 59,049 numbers: a repr of 180 kB
        previous = chr(ord(level) - 1)
        bomb.append(f"{level}: &{level} [*{previous}, *{previous}, *{previous}, *{previous}, "
                    f"*{previous}, *{previous}, *{previous}, *{previous}, *{previous}]")
    params = yaml.safe_dump(_params(), sort_keys=False).replace("  lr: 0.2", "  lr: *e")
    (tmp_path / "params.yaml").write_text("\n".join(bomb) + "\n" + params)
    text = (tmp_path / "params.yaml").read_text()
    assert "lr: *e" in text
    with pytest.raises(ParamsError) as caught:
        load_params(tmp_path / "params.yaml")
    assert "train.lr = [[" in str(caught.value)
    assert len(str(caught.value)) < 1000, len(str(caught.value))


# --- 10. resume when the MLflow store is gone -------------------------------------------------


@pytest.mark.slow
@pytest.mark.interruption
def test_resume_after_the_mlflow_store_was_deleted(tmp_path):
    project = make_project(tmp_path / "project", epochs=3)
    interrupt_after_epoch_1(project, tmp_path)
    (project / "mlflow.db").unlink()
    set_param(project, "train.resume", True)
    result = run_stage(project, "train")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "so the finished epochs are logged again into a new run" in result.stdout
    (run,) = mlflow_runs(project)
    assert run.info.status == "FINISHED" and "resumed_from" in run.data.tags
    assert steps(project, run.info.run_id) == [1, 2, 3]
    assert run.data.params["train.epochs"] == "3"


# --- 11. Ctrl-C gives one clear line ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.interruption
def test_ctrl_c_in_training_says_what_stopped_it(tmp_path):
    project = make_project(tmp_path / "project", epochs=5)
    training = interrupt_after_epoch_1(project, tmp_path, signal.SIGINT)
    last = training.stderr.strip().splitlines()[-1]
    assert last.startswith("train: interrupted by Ctrl-C; finished epochs are kept"), last


@pytest.mark.slow
@pytest.mark.interruption
def test_ctrl_c_during_a_download_is_one_line(tmp_path):
    project = make_project(tmp_path / "project")
    shutil.rmtree(project / "data")
    with socket.socket() as server:  # accepts connections and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        set_param(project, "data.mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
        set_param(project, "data.timeout_s", 60)
        proc = subprocess.Popen([str(PYTHON), "-m", "stages.download"], cwd=project,
                                env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        server.settimeout(120)
        connection, _ = server.accept()  # the stage is past its imports, waiting for a file
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        connection.close()
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("download: interrupted; every file in"), stderr
    assert not list((project / "data/MNIST/raw").glob("*"))  # no half-written file


# --- 12. the training stage checks the checksums it relies on --------------------------------


@pytest.mark.bad_input
def test_load_split_refuses_files_that_are_not_mnist(tiny_mnist):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has md5 [0-9a-f]{32}, not "
                                        r"MNIST's 6bbc9ace898e44ae57da46a324031adb"):
        load_split(train=True, root=tiny_mnist)


@pytest.mark.slow
@pytest.mark.bad_input
def test_train_stage_refuses_files_that_are_not_mnist(tmp_path):
    """Same size and headers as MNIST, other bytes: only the checksum tells."""
    project = make_project(tmp_path / "project")
    set_param(project, "data.verify_md5", True)
    result = run_stage(project, "train")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("train: error: data/MNIST/raw/train-images-idx3-ubyte "
                                            "has md5"), result.stderr
    assert not (project / "mlflow.db").exists()  # refused before any run was opened


# --- the tracking store decides where artifacts go -------------------------------------------


@pytest.mark.parametrize("uri, local", [
    ("sqlite:////repo/mlflow.db", True), ("postgresql://u@host/db", True),
    ("http://127.0.0.1:5000", False), ("https://mlflow.example.com", False),
])
def test_artifacts_go_to_a_tracking_server_not_the_client_disk(uri, local, monkeypatch, tmp_path):
    from mnistlab.tracking import artifact_location

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    expected = (tmp_path / "mlruns").as_uri() if local else None
    assert artifact_location(uri) == expected
