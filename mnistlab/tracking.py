"""MLflow: where runs are stored, and one run per pipeline execution.

The train stage opens the run and records its id in the checkpoint; the evaluate stage
reopens the same run to add the test metrics and reports.

Where the store lives matters under `dvc exp run --queue` and `--temp`: those run in a
throw-away copy of the repo, so a relative URI would lose the run with the copy. The store
is therefore pinned to the original repo (DVC_ROOT), and the experiment is created with an
explicit artifact location there. MLFLOW_TRACKING_URI, when set, wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from mnistlab.signals import raise_keyboard_interrupt

EXPERIMENT_NAME = "mnist-cnn"
# Tags a caller wants on the run the train stage opens, as a JSON object in this variable
# (the repeats tool passes {"mlflow.parentRunId": ...} to group a preset's repeats).
RUN_TAGS_ENV = "PIPELINE_RUN_TAGS"


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or used."""


def project_root() -> Path:
    """The original repo, also when DVC runs the stage in a temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


# `scheme://user:password@host` or `scheme://token@host`: the part before `@` is a secret.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it hidden, for printing and error messages:
    http://user:secret@host -> http://user:***@host, http://token@host -> http://***@host."""
    def hide(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user + ':' if colon else ''}***@"

    return _USERINFO.sub(hide, text)


def is_remote(uri: str | None = None) -> bool:
    """A tracking server (over HTTP), rather than a database or folder on this machine."""
    return (uri or tracking_uri()).startswith(("http://", "https://"))


# For a stage talking to a server: a few quick retries, then an error, instead of MLflow's
# default of minutes of back-off while the training waits. The user's own settings win.
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def connect(experiment_name: str = EXPERIMENT_NAME) -> str:
    """Point MLflow at the store and return the id of the experiment (created if new),
    failing fast when unreachable.

    MLflow retries HTTP requests for minutes by default; the probe uses one short attempt so
    a dead server stops the stage in seconds, before any training.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if is_remote(uri):
        for key, value in SERVER_RETRIES.items():
            os.environ.setdefault(key, value)
    probe_env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {key: os.environ.get(key) for key in probe_env}
    os.environ.update(probe_env)
    try:
        with _store_lock(uri):  # the first call creates a new store's tables
            experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(experiment_name, artifact_location=artifact_location(uri))
        except MlflowException:  # a parallel queued run created it first
            return mlflow.get_experiment_by_name(experiment_name).experiment_id
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot track"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(redact(f"MLflow tracking store {uri} is unreachable or unusable: "
                                   f"{first_line}")) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts. For a local store, mlruns/ in the original
    repo (not in DVC's temporary copy, which is deleted after a queued run). For a tracking
    server, None: the server decides (with --serve-artifacts, its own store), so a client's
    artifacts reach the server rather than the client's disk."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (project_root() / "mlruns").as_uri()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time for a sqlite store's first use.

    MLflow creates and migrates the tables of a new mlflow.db on first use; two processes
    doing that at once (`dvc exp run --run-all -j 2` on a fresh repo) both fail, with "table
    alembic_version already exists" or the like. The lock file lives in the temp folder,
    keyed by the database's path, so it adds nothing to the repo.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if fcntl is None or not uri.startswith("sqlite:///"):
        yield
        return
    key = hashlib.sha256(uri.removeprefix("sqlite:///").encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mlflow-store-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def run_name(preset: str | None = None) -> str | None:
    """Runs are named after the DVC experiment when there is one, else after the preset."""
    return os.environ.get("DVC_EXP_NAME") or preset


def run_tags(device: str, extra: Mapping[str, str] = {}) -> dict[str, str]:
    import torch

    tags = {"device": device, "torch_version": torch.__version__, **extra, **caller_tags()}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def caller_tags() -> dict[str, str]:
    """The tags of RUN_TAGS_ENV; a value that is not a JSON object of strings is an error
    that names it, before any run is opened."""
    text = os.environ.get(RUN_TAGS_ENV)
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except json.JSONDecodeError:
        tags = None
    if not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
        raise TrackingError(f"{RUN_TAGS_ENV}={text[:200]!r} is not a JSON object of string "
                            f"tags, e.g. {{\"team\": \"vision\"}}")
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=project_root(), timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.2}} -> {"train.lr": "0.2"}; lists stay one compact JSON value."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, separators=(",", ":"))
        else:
            flat[name] = str(value)
    return flat


@contextlib.contextmanager
def run_status(run_id: str) -> Iterator[None]:
    """Keep the run active while the block runs, and end it with the status it earned:
    FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM. Never left RUNNING, and
    metrics logged with `synchronous=False` are all stored before it ends."""
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # Ctrl-C's path
    # System metrics (CPU, memory, disk; the GPU where nvidia-ml-py is installed) every 10 s,
    # without the monitor's own start and stop lines in the stage's log.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    mlflow.start_run(run_id=run_id, log_system_metrics=True)
    try:
        yield
    except KeyboardInterrupt:
        _end_run(RunStatus.KILLED)
        raise
    except BaseException:
        _end_run(RunStatus.FAILED)
        raise
    else:
        _end_run(RunStatus.FINISHED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_run(status: int) -> None:
    try:
        mlflow.flush_async_logging()  # any metrics still queued, first
    finally:
        if status == RunStatus.FINISHED:
            mlflow.end_run(RunStatus.to_string(status))
        else:
            # The block already failed, perhaps because the store went away: marking the
            # run must not replace that error with a second one. A run left RUNNING on a
            # server that stopped is continued by `train.resume: true`.
            with contextlib.suppress(Exception):  # end_run has left the run either way
                mlflow.end_run(RunStatus.to_string(status))


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def new_run(experiment_id: str, tags: Mapping[str, str]) -> str:
    """Create a run (not yet active) and return its id. A `mlflow.parentRunId` tag makes it
    a child of that run."""
    run = client().create_run(experiment_id, run_name=run_name(tags.get("preset")), tags=dict(tags))
    return run.info.run_id


def run_exists(run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def end_if_running(run_id: str | None) -> str | None:
    """Mark a run KILLED if it is still RUNNING (its process was stopped before it could end
    the run, e.g. by a lost server); returns its id when it did."""
    if not run_id:
        return None
    try:
        if client().get_run(run_id).info.status != "RUNNING":
            return None
        client().set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    except MlflowException:  # not in this store (deleted, or another server): nothing to end
        return None
    return run_id


def log_params(run_id: str, params: Any) -> None:
    """A params object as the run's MLflow params, flattened ("train.lr": "0.2"), in batches
    of at most 100 (MLflow's limit per request)."""
    from mlflow.entities import Param

    pairs = [Param(key, value) for key, value in flatten(params.model_dump(mode="json")).items()]
    for start in range(0, len(pairs), 100):
        client().log_batch(run_id, params=pairs[start:start + 100])


def log_missing_epochs(run_id: str, history: list[dict]) -> list[int]:
    """Log the checkpoint's epochs that the run lacks (the store stopped answering after
    the checkpoint was written); returns them."""
    import time

    from mlflow.entities import Metric

    logged = {m.step for m in client().get_metric_history(run_id, "train_loss")}
    missing = [epoch for epoch in history if epoch["epoch"] not in logged]
    now = int(time.time() * 1000)
    if missing:
        client().log_batch(run_id, metrics=[Metric(name, value, now, epoch["epoch"])
                                            for epoch in missing for name, value in epoch.items()
                                            if name != "epoch"])
    return [epoch["epoch"] for epoch in missing]


def log_new_run(run_id: str, params: Any, history: list[dict]) -> None:
    """Give a run that continues a checkpoint everything the lost run had: the params and the
    finished epochs' metrics."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    log_params(run_id, params)
    client().log_batch(run_id, metrics=[Metric(name, value, now, epoch["epoch"])
                                        for epoch in history for name, value in epoch.items()
                                        if name != "epoch"])


@contextlib.contextmanager
def added_to_finished_run(run_id: str) -> Iterator[None]:
    """Reopen a finished run to add to it (the evaluate stage's metrics and reports).

    If the block fails, the run keeps the status it had: an error while writing reports
    does not make a training that finished look failed. The failure is tagged instead.
    """
    status = mlflow.MlflowClient().get_run(run_id).info.status
    mlflow.start_run(run_id=run_id)
    try:
        yield
    except BaseException as err:
        mlflow.set_tag("evaluate_error", redact(f"{type(err).__name__}: {err}")[:500])
        raise
    finally:
        try:
            mlflow.flush_async_logging()
        finally:
            mlflow.end_run(status)


def ui_url(port: int) -> str:
    """Where `make ui` shows this project's runs. The experiment's plain page opens MLflow's
    GenAI overview; its /runs page is the table of training runs."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        return f"http://127.0.0.1:{port}/  (no runs yet: `make repro` first)"
    return f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs"
