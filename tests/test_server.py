"""Team mode: `make server`'s MLflow tracking server, on sqlite and on a real PostgreSQL
(pgserver, no root), with the pipeline logging to it over HTTP. Every param, per-epoch
metric, report and the model land on the server; nothing lands in the client's mlruns/."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from test_pipeline import BIN, free_port, tiny_project

pytestmark = pytest.mark.slow


def start_server(backend: str, artifacts: Path) -> tuple[subprocess.Popen, str]:
    """`make server`'s command on a free local port; waits until it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--serve-artifacts",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read().decode()[-3000:]) from None
            assert time.monotonic() < deadline, "the tracking server did not start in 120 s"
            time.sleep(0.5)


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
        yield url, folder / "artifacts"
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


def test_a_dvc_exp_run_lands_on_the_server(server, tmp_path):
    url, artifacts = server
    project = tiny_project(tmp_path)
    run_against(url, [str(BIN / "dvc"), "exp", "run", "-n", "on-server", "-S", "train.lr=0.04"],
                project)

    mlflow.set_tracking_uri(url)
    (run,) = mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
    assert run.info.status == "FINISHED" and run.info.run_name == "on-server"
    assert run.data.params["train.lr"] == "0.04"
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1, 2]
    assert "final_test_accuracy" in run.data.metrics
    # Artifacts went through the server into its artifacts folder, not to the client's disk.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"reports"}
    stored = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"metrics.json", "MLmodel", "model_report.md"} <= stored, stored
    assert not (project / "mlruns").exists()
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature is not None


def test_the_server_ui_lists_the_run(server, tmp_path):
    import shutil

    from tools.mlflow_ui import browser_page, runs_page

    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's package)")
    url, _ = server
    mlflow.set_tracking_uri(url)
    experiment = mlflow.get_experiment_by_name("mnist-cnn")
    if experiment is None:  # this backend's pipeline test did not run first
        pytest.skip("no run on this server")
    with browser_page() as page:
        page.goto(runs_page(url, experiment.experiment_id))
        page.get_by_text("on-server", exact=True).first.wait_for()
