"""Interrupted, faulty and parallel runs: the stages as real processes, on tiny synthetic data.

* a SIGTERM or Ctrl-C mid-training ends the MLflow run KILLED and keeps the last finished
  epoch's checkpoint, and no final model and no temp file;
* such a run, resumed, ends with exactly the weights of a run that was never interrupted,
  in the same single MLflow run;
* an unreachable tracking server stops training before it starts, in one line, without
  printing the credentials in its URI;
* bad params are refused before any stage writes anything;
* four queued DVC experiments run two at a time into one sqlite store, all finished and
  complete.

Each test works in its own project (tests/helpers.py): the repo's stages/ and params.yaml
(made tiny) beside a synthetic MNIST, or a copy of the whole tiny repo under git and DVC, so
nothing here needs the real data or the network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import (
    BIN,
    PYTHON,
    STARTUP_TIMEOUT_S,
    Training,
    client,
    curves,
    free_port,
    interrupt_after_epoch_1,
    make_project,
    mlflow_runs,
    run,
    run_stage,
    stage_env,
    steps,
    temp_files,
    tiny_project,
)

pytestmark = pytest.mark.slow


# --- 1. a stop signal mid-training -----------------------------------------------------------


@pytest.mark.interruption
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_marks_run_killed_and_keeps_last_epoch(tmp_path, sig):
    project = make_project(tmp_path / "project", epochs=5)
    training = interrupt_after_epoch_1(project, tmp_path, sig)

    (run,) = mlflow_runs(project)
    assert run.info.status == "KILLED", run.info.status
    assert steps(project, run.info.run_id) == [1]
    # One line says what happened and what is kept; no traceback.
    assert "Traceback" not in training.stderr, training.output()
    last = training.stderr.strip().splitlines()[-1]
    assert last.startswith("train: ") and "models/checkpoint.pt" in last, last
    if sig == signal.SIGTERM:
        assert "SIGTERM" in last, last
    # The final model exists only after a complete run; the checkpoint holds epoch 1.
    assert not (project / "models" / "model.pt").exists()
    assert not (project / "reports" / "train_metrics.json").exists()
    checkpoint = torch.load(project / "models" / "checkpoint.pt", weights_only=True)
    assert [m["epoch"] for m in checkpoint["history"]] == [1]
    assert checkpoint["mlflow_run_id"] == run.info.run_id
    assert checkpoint["model_state"] and checkpoint["optimizer_state"]["state"]
    assert [row["epoch"] for row in curves(project)] == ["1"]
    assert "train: epoch 2 " not in training.stdout
    assert temp_files(project) == []


# --- 2. resume after a stop ------------------------------------------------------------------


@pytest.mark.interruption
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    straight = make_project(tmp_path / "straight", epochs=3, resume=False)
    result = run_stage(straight, "train")
    assert result.returncode == 0, result.stdout + result.stderr
    expected = torch.load(straight / "models" / "model.pt", weights_only=True)["state_dict"]

    resumed = make_project(tmp_path / "resumed", epochs=3, resume=True)
    interrupt_after_epoch_1(resumed, tmp_path)
    assert not (resumed / "models" / "model.pt").exists()
    saved = len(torch.load(resumed / "models" / "checkpoint.pt", weights_only=True)["history"])
    assert saved == 1
    result = run_stage(resumed, "train")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"train: resuming after epoch {saved} " in result.stdout, result.stdout

    state = torch.load(resumed / "models" / "model.pt", weights_only=True)["state_dict"]
    assert state.keys() == expected.keys()
    differing = [name for name in expected if not torch.equal(state[name], expected[name])]
    assert differing == [], f"resumed weights differ from the uninterrupted run's: {differing}"

    rows = curves(resumed)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    timeless = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]
    assert timeless == [{k: v for k, v in row.items() if k != "epoch_seconds"}
                        for row in curves(straight)]
    # One MLflow run, reopened: every epoch logged once, ended FINISHED.
    (run,) = mlflow_runs(resumed)
    assert run.info.status == "FINISHED"
    for metric in ("test_accuracy", "train_loss", "lr"):
        assert steps(resumed, run.info.run_id, metric) == [1, 2, 3], metric
    assert temp_files(resumed) == []


# --- 3. the tracking server is unreachable ---------------------------------------------------


def unreachable_run(tmp_path: Path, uri: str) -> tuple[Path, subprocess.CompletedProcess, float]:
    project = make_project(tmp_path / "project")
    started = time.monotonic()
    result = run_stage(project, "train", timeout=120, MLFLOW_TRACKING_URI=uri)
    return project, result, time.monotonic() - started


@pytest.mark.fault
def test_unreachable_tracking_server_stops_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    project, result, seconds = unreachable_run(tmp_path, uri)

    assert result.returncode != 0, result.stdout + result.stderr
    assert seconds < 20, f"took {seconds:.1f} s to give up"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"train: error: MLflow tracking store {uri} is unreachable"), \
        lines[0]
    # Training never started: no model, no checkpoint, no curves, no local store.
    assert not (project / "models").exists() and not (project / "reports").exists()
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()


@pytest.mark.fault
def test_tracking_uri_credentials_are_never_printed(tmp_path):
    port = free_port()
    _, result, _ = unreachable_run(tmp_path, f"http://user:secret@127.0.0.1:{port}")

    assert result.returncode != 0
    assert "secret" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert f"http://user:***@127.0.0.1:{port} is unreachable" in result.stderr, result.stderr


@pytest.mark.parametrize(("text", "shown"), [
    ("http://user:secret@host:5000/x", "http://user:***@host:5000/x"),
    ("https://token@mlflow.example.com", "https://***@mlflow.example.com"),
    ("store http://a:b@h1 and https://c:d@h2/p?q=1", "store http://a:***@h1 and https://c:***@h2/p?q=1"),
    ("sqlite:////tmp/p/mlflow.db", "sqlite:////tmp/p/mlflow.db"),
    ("http://127.0.0.1:5000/path?mail=a@b.c", "http://127.0.0.1:5000/path?mail=a@b.c"),
    ("databricks", "databricks"),
], ids=["user and password", "token", "two URIs in a message", "sqlite", "@ in the query",
        "not a URI"])
def test_redact_hides_uri_credentials(text, shown):
    from mnistlab.tracking import redact

    assert redact(text) == shown


# --- 4. bad params: refused before any work --------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("stage", ["train", "evaluate", "download"])
def test_bad_params_are_refused_before_any_work(tmp_path, stage):
    project = make_project(tmp_path / "project", lr=-1)
    data_before = sorted(p.name for p in (project / "data" / "MNIST" / "raw").iterdir())

    result = run_stage(project, stage, timeout=120)

    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "train.lr = -1" in lines[0], lines[0]
    for name in ("models", "reports", "mlflow.db", "mlruns"):
        assert not (project / name).exists(), f"{stage} wrote {name}"
    assert sorted(p.name for p in (project / "data" / "MNIST" / "raw").iterdir()) == data_before


# --- 5. queued experiments, two at a time, one store -----------------------------------------


@pytest.mark.fault
def test_stages_starting_together_on_a_fresh_store_all_connect(tmp_path):
    """Parallel experiments on a fresh repo open a store that does not exist yet: each
    process would create (and migrate) mlflow.db's tables, and without a lock around that
    first use they fail ("table alembic_version already exists")."""
    project = make_project(tmp_path / "project")
    code = "from mnistlab import tracking; print('experiment', tracking.connect())"
    procs = [subprocess.Popen([str(PYTHON), "-c", code], cwd=project, env=stage_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    results = [(proc.communicate(timeout=120)[0], proc.returncode) for proc in procs]
    for output, code in results:
        assert code == 0, output
    ids = {line for output, _ in results for line in output.splitlines()
           if line.startswith("experiment ")}
    assert len(ids) == 1, results
    (line,) = ids
    assert client(project).get_experiment_by_name("mnist-cnn").experiment_id == line.split()[1]


@pytest.mark.fault
def test_parallel_queued_experiments_all_finish_in_one_store(tmp_path):
    project = tiny_project(tmp_path)
    dvc = str(BIN / "dvc")
    names = {"p1": 0.02, "p2": 0.1}  # one experiment per worker, both writing at once
    outputs = []
    for name, lr in names.items():
        outputs.append(run([dvc, "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}",
                            "-S", "train.epochs=2", "-S", "train.limit_train=512"], project))
    started = time.monotonic()
    # Blocks until the queue is empty (`dvc queue start` would return at once).
    try:
        outputs.append(run([dvc, "exp", "run", "--run-all", "-j", "2"], project, timeout=900))
    except BaseException:  # the workers are daemons: stop them with the test
        subprocess.run([dvc, "queue", "stop", "--kill"], cwd=project, capture_output=True,
                       timeout=120)
        raise
    seconds = time.monotonic() - started
    status = run([dvc, "queue", "status"], project)
    outputs.append(status)
    print(f"{len(names)} queued experiments, 2 at a time: {seconds:.0f} s")

    for name in names:  # each experiment's own output: both stages ran, to the end
        log = run([dvc, "queue", "logs", name], project)
        assert "train: epoch 2 " in log.stdout and "evaluate: test accuracy" in log.stdout, \
            log.stdout
        outputs.append(log)
    text = "".join(o.stdout + o.stderr for o in outputs)
    # The workers' logs too (DVC keeps them under .dvc/tmp).
    for path in (project / ".dvc" / "tmp").rglob("*"):
        if path.is_file() and path.stat().st_size < 10_000_000:
            text += path.read_text(errors="replace")
    assert "database is locked" not in text.lower()
    assert status.stdout.count("Success") == len(names), status.stdout

    runs = mlflow_runs(project)
    assert sorted(r.info.run_name for r in runs) == sorted(names), [r.info.run_name for r in runs]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    mlruns = project / "mlruns"
    images = np.random.default_rng(0).uniform(0, 255, size=(3, 28, 28)).astype(np.float32)
    for run_ in runs:
        name, run_id = run_.info.run_name, run_.info.run_id
        assert run_.info.status == "FINISHED", name
        assert run_.data.params["train.lr"] == str(names[name])
        assert steps(project, run_id) == [1, 2], name
        assert "final_test_accuracy" in run_.data.metrics, name  # evaluate reached the run
        # The artifacts are files in the project's mlruns/, not in DVC's temporary copy.
        artifacts = Path(run_.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(mlruns), artifacts
        assert (artifacts / "reports" / "metrics.json").is_file(), name
        logged = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        assert np.asarray(logged.predict(images)).shape == (3, 10)
        model_dir = Path(mlflow.models.get_model_info(f"runs:/{run_id}/model")
                         .artifact_path.removeprefix("file://"))
        assert model_dir.is_relative_to(mlruns) and (model_dir / "MLmodel").is_file(), model_dir


# --- 6. resume under `dvc exp run` -----------------------------------------------------------


@pytest.mark.interruption
def test_dvc_exp_run_resumes_the_interrupted_run_into_the_same_mlflow_run(tmp_path):
    """The recovery the stage prints (the same command with -S train.resume=true) works under
    `dvc exp run` too. Before each experiment DVC checks out every cached output of dvc.lock,
    so a checkpoint in DVC's cache would be replaced by the committed run's (other params)
    and the interrupted epochs trained again, in a new MLflow run, the old one left behind."""
    project = tiny_project(tmp_path / "project")
    dvc = str(BIN / "dvc")
    run([dvc, "repro"], project)  # a committed baseline whose outputs DVC's cache holds
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project)
    (baseline,) = mlflow_runs(project)

    # Many short epochs: Ctrl-C lands while the stage trains, however late this process
    # reads the "epoch 2" line on a loaded machine.
    epochs = 80
    recipe = ["-S", f"train.epochs={epochs}"]
    stderr = (tmp_path / "exp-stderr.log").open("w")
    exp = subprocess.Popen([dvc, "exp", "run", *recipe], cwd=project, env=stage_env(),
                           stdout=subprocess.PIPE, stderr=stderr, text=True,
                           start_new_session=True,  # Ctrl-C reaches a terminal's whole group
                           # as at a terminal, Ctrl-C's default action, even when this test
                           # runs under a shell that ignores SIGINT (a background job's)
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []  # (seconds since the start, line): what this process read, and when
    try:
        started = time.monotonic()
        for line in exp.stdout:
            seen.append(f"{time.monotonic() - started:6.1f} s  {line.rstrip()}")
            if line.startswith("train: epoch 2 ") or time.monotonic() > started + STARTUP_TIMEOUT_S:
                break
        os.killpg(exp.pid, signal.SIGINT)
        exp.communicate(timeout=120)
    finally:
        if exp.poll() is None:
            os.killpg(exp.pid, signal.SIGKILL)
        stderr.close()
    assert exp.returncode != 0, "\n".join(["stdout as read:", *seen, "stderr:",
                                           (tmp_path / "exp-stderr.log").read_text()])
    saved = torch.load(project / "models" / "checkpoint.pt", weights_only=True)
    epochs_done = len(saved["history"])
    assert 2 <= epochs_done < epochs, epochs_done
    interrupted = saved["mlflow_run_id"]
    assert client(project).get_run(interrupted).info.status == "KILLED"

    result = run([dvc, "exp", "run", *recipe, "-S", "train.resume=true"], project, timeout=600)

    assert f"train: resuming after epoch {epochs_done} " in result.stdout, result.stdout
    assert "starting afresh" not in result.stdout, result.stdout
    runs = mlflow_runs(project)
    assert [r.info.run_id for r in runs] == [baseline.info.run_id, interrupted]
    assert runs[1].info.status == "FINISHED"
    for metric in ("test_accuracy", "train_loss", "lr"):
        assert steps(project, interrupted, metric) == list(range(1, epochs + 1)), metric
    assert torch.load(project / "models" / "model.pt",
                      weights_only=True)["mlflow_run_id"] == interrupted
    # Out of DVC's cache, the checkpoint must not land in git instead: no experiment commits it.
    refs = run(["git", "for-each-ref", "--format=%(objectname)", "refs/exps"], project).stdout.split()
    assert refs
    for ref in refs:
        tree = run(["git", "ls-tree", "-r", "--name-only", ref], project).stdout.split()
        assert "models/checkpoint.pt" not in tree and "models/model.pt" not in tree


@pytest.mark.interruption
def test_a_run_left_running_is_ended_when_its_checkpoint_is_not_resumed(tmp_path):
    """A stage killed outright (SIGKILL, a lost machine) cannot end its MLflow run; the next
    training in the project that does not resume it marks it KILLED, so no run stays RUNNING."""
    project = make_project(tmp_path / "project", epochs=3)
    training = Training(project, tmp_path)
    training.wait_for("train: epoch 1 ")
    training.proc.kill()
    training.finish()
    (killed,) = mlflow_runs(project)
    assert killed.info.status == "RUNNING"  # nothing in the stage could run to end it

    result = run_stage(project, "train")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"MLflow run {killed.info.run_id} of models/checkpoint.pt was left RUNNING" \
        in result.stdout, result.stdout
    statuses = {r.info.run_id: r.info.status for r in mlflow_runs(project)}
    assert statuses.pop(killed.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]
