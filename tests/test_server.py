"""Team mode: `make server`'s MLflow tracking server, on sqlite and on a real PostgreSQL
(pgserver, no root), with the pipeline logging to it over HTTP. Every param, per-epoch
metric, report and the model land on the server; nothing lands in the client's mlruns/."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from helpers import REPO
from helpers import BIN, tiny_project

from tools.mlflow_ui import free_port, wait_until_up

pytestmark = pytest.mark.slow


def start_server(backend: str, artifacts: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`make server`'s command (its checks, then `mlflow server`) on a free local port (or
    `port`); waits until it answers."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # as `make server` runs it
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "tools.server", "--backend", backend, "--artifacts",
         str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, process)
    return process, url


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A tracking server on each backend, as `make server` (and `make postgres`) start it."""
    folder = tmp_path_factory.mktemp(f"server-{request.param}")
    postgres = None
    if request.param == "sqlite":
        backend = f"sqlite:///{folder / 'mlflow.db'}"
    else:
        from tools.postgres import start

        postgres, backend = start(folder / "postgres")
    process, url = start_server(backend, folder / "artifacts")
    try:
        yield url, folder / "artifacts", request.param
    finally:
        stop(process)
        if postgres is not None:
            postgres.cleanup()


def run_against(url: str, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_TRACKING_URI=url)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_dvc_exp_runs_land_on_the_server(server, tmp_path):
    """On sqlite, the repeats of two presets, two at a time (two clients at once, as `make
    iterations JOBS=2` runs them); on PostgreSQL one `dvc exp run`. Every run arrives whole:
    params, each epoch, reports, the model."""
    url, artifacts, backend = server
    project = tiny_project(tmp_path)
    if backend == "sqlite":
        run_against(url, [str(BIN / "python"), "-m", "tools.repeats", "--repeats", "1",
                          "--jobs", "2", "--set", "train.epochs=2", "I1", "I3"], project)
        names = ["I1-s0", "I3-s0"]
    else:
        run_against(url, [str(BIN / "dvc"), "exp", "run", "-n", "on-server-0"], project)
        names = ["on-server-0"]

    mlflow.set_tracking_uri(url)
    client = mlflow.MlflowClient()
    found = [run for run in mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
             if "dvc_exp_name" in run.data.tags]  # the training runs, not the repeats' parents
    assert sorted(run.info.run_name for run in found) == names
    for run in found:
        assert run.info.status == "FINISHED", run.info.run_name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
        assert steps == [1, 2], (run.info.run_name, steps)
        assert "final_test_accuracy" in run.data.metrics
        # Artifacts went through the server into its folder, not to the client's disk.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"reports"}
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        assert model.metadata.signature is not None
    stored = [p.name for p in artifacts.rglob("*") if p.is_file()]
    # One logged model per run, and inside it the exported network (mnistlab/served_model.py).
    models = [p for p in artifacts.rglob("MLmodel") if p.parent.name != "network"]
    assert len(models) == len(names) and stored.count("metrics.json") == len(names)
    assert all((model.parent / "artifacts" / "network" / "MLmodel").is_file() for model in models)
    assert not (project / "mlruns").exists()


@pytest.fixture
def logged_run(server) -> tuple[str, str, str]:
    """A finished run of its own on `server`, in the pipeline's experiment: what reads it
    needs no other test to have trained first. Returns (url, experiment id, run name)."""
    url, _, backend = server
    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("mnist-cnn")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("mnist-cnn")
    run = client.create_run(experiment_id, run_name=f"listed-on-{backend}")
    client.log_metric(run.info.run_id, "test_accuracy", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    return url, experiment_id, run.info.run_name


def test_the_server_ui_lists_the_run(logged_run):
    import shutil

    from tools.mlflow_ui import browser_page, runs_page

    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's package)")
    url, experiment_id, name = logged_run
    with browser_page() as page:
        page.goto(runs_page(url, experiment_id))
        page.get_by_text(name, exact=True).first.wait_for()


@pytest.mark.fault
def test_server_lost_mid_run_then_resumed_into_the_same_run(tmp_path):
    """The server stops after a few epochs: the stage stops within seconds with one line,
    the checkpoint keeps the finished epochs, and once the server is back
    `train.resume: true` finishes the same MLflow run, every epoch logged once."""
    import yaml

    project = tiny_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(epochs=8, limit_train=512)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    backend, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    process, url = start_server(backend, artifacts)
    port = url.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_TRACKING_URI=url)
    train = subprocess.Popen([str(BIN / "python"), "-m", "stages.train"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mlflow.set_tracking_uri(url)
        client = mlflow.MlflowClient()
        deadline = time.monotonic() + 300
        while True:  # wait for the first logged epoch
            assert train.poll() is None, train.communicate()
            assert time.monotonic() < deadline, "no epoch logged in 300 s"
            found = mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
            if found and client.get_metric_history(found[0].info.run_id, "test_accuracy"):
                run_id = found[0].info.run_id
                break
            time.sleep(0.2)
        stop(process)
        stopped = time.monotonic()
        _, stderr = train.communicate(timeout=120)
        assert time.monotonic() - stopped < 30, "the stage kept going without its server"
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "stopped answering after epoch" in lines[-1] and "train.resume: true" in lines[-1], stderr
    import torch

    kept = torch.load(project / "models/checkpoint.pt", weights_only=True)
    assert kept["mlflow_run_id"] == run_id and 0 < len(kept["history"]) < 8

    process, url = start_server(backend, artifacts, port=int(port))  # the same address again
    try:
        params["train"]["resume"] = True
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = subprocess.run([str(BIN / "python"), "-m", "stages.train"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert f"resuming after epoch {len(kept['history'])} (MLflow run {run_id}" in result.stdout
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run_id, "test_accuracy")]
        assert sorted(steps) == list(range(1, 9)), steps  # each epoch once
    finally:
        stop(process)
