"""`make server` and `make postgres` with settings they cannot run on: each ends within
seconds, non-zero, with one line that names the bad setting (a password hidden), before
anything is written; and with good settings `make server` still starts MLflow's server.

* BACKEND: a PostgreSQL that refuses or never answers, a URI MLflow cannot use, a sqlite
  path that is a folder or not a database, an Optuna study's database;
* SERVER_PORT already in use, or no port at all; SERVER_HOST not of this machine;
* `make postgres` with a SERVER_DIR it cannot write.

Run through make itself (its `setup` prerequisite assumed done), as a user types them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BIN, REPO

from tools.mlflow_ui import free_port, wait_until_up
from tools.team import alive

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")

SECONDS = 30  # "within seconds": MLflow alone retried an unreachable database for minutes


def make(target: str, tmp_path: Path, **variables: str) -> tuple[subprocess.CompletedProcess, float]:
    """`make TARGET VAR=value...` in the repo, on this venv, without its `setup` (-o: the
    venv counts as installed). Stopped, with everything it started, after SECONDS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true")
    settings = {"BIN": str(BIN), "SERVER_DIR": str(tmp_path / "server"), **variables}
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", target,
               *[f"{key}={value}" for key, value in settings.items()]]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"`make {target}` was still running after {SECONDS} s")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), \
        time.monotonic() - started


def one_line(result: subprocess.CompletedProcess, prog: str) -> str:
    """The tool's one error line (make adds its own `make: *** ... Error 1` after it)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("make")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


@pytest.fixture
def silent_server():
    """A port where a TCP connection is taken (by the kernel) but nothing ever answers: a
    database server that hangs, or a firewall that drops."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


# --- BACKEND ----------------------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.parametrize("where", ["refused", "silent"])
def test_an_unreachable_postgresql_ends_in_seconds(tmp_path, silent_server, where):
    port = 1 if where == "refused" else silent_server
    backend = f"postgresql+psycopg://mlflow:secret@127.0.0.1:{port}/mlflow"
    result, took = make("server", tmp_path, BACKEND=backend, SERVER_PORT=str(free_port()))
    line = one_line(result, "tools.server")
    assert line.startswith(f"tools.server: error: BACKEND=postgresql+psycopg://mlflow:***@127.0.0.1:"
                           f"{port}/mlflow: cannot connect: "), line
    assert ("Connection refused" if where == "refused" else "timeout") in line, line
    assert "secret" not in result.stdout + result.stderr
    assert took < SECONDS
    assert not (tmp_path / "server").exists()  # not even the artifacts folder


def optuna_database(path: Path) -> str:
    import optuna

    uri = f"sqlite:///{path}"
    optuna.storages.RDBStorage(uri)  # creates Optuna's tables
    return uri


@pytest.mark.bad_input
@pytest.mark.parametrize("backend, message", [
    ("garbage", "BACKEND='garbage': should be sqlite:///PATH, postgresql+psycopg://USER:PASSWORD@"
                "HOST[:PORT]/DB, mysql+DRIVER://... or mssql+DRIVER://..."),
    ("./mlruns", "BACKEND='./mlruns': should be sqlite:///PATH"),  # MLflow's retired file store
    ("http://127.0.0.1:5000", "BACKEND='http://127.0.0.1:5000': should be sqlite:///PATH"),
    ("sqlite://", "BACKEND='sqlite://': should be sqlite:///PATH"),  # in memory: lost at exit
    ("postgres://u:secret@h/db", "BACKEND='postgres://u:***@h/db': should be sqlite:///PATH"),
    ("mysql+nodriver://u:secret@h/db", "BACKEND='mysql+nodriver://u:***@h/db': its driver "
                                       "'mysql+nodriver' is not installed"),
    ("sqlite:///{tmp}", "BACKEND=sqlite:///{tmp}: {tmp} is a folder, not a database file"),
    ("sqlite:///{tmp}/notes.txt", "BACKEND=sqlite:///{tmp}/notes.txt: {tmp}/notes.txt is not a "
                                  "database MLflow can use: file is not a database"),
    ("optuna", "holds an Optuna study's tables (a SEARCH_STORAGE of make search); MLflow needs "
               "a database of its own"),
])
def test_a_backend_mlflow_cannot_use_is_refused(tmp_path, backend, message):
    (tmp_path / "notes.txt").write_text("not a database\n")
    if backend == "optuna":
        backend = optuna_database(tmp_path / "search.db")
    backend, message = backend.format(tmp=tmp_path), message.format(tmp=tmp_path)
    before = sorted(tmp_path.rglob("*"))
    result, _ = make("server", tmp_path, BACKEND=backend, SERVER_PORT=str(free_port()))
    line = one_line(result, "tools.server")
    assert message in line, line
    assert "secret" not in result.stdout + result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, no database file touched


# --- the address ------------------------------------------------------------------------------


@pytest.mark.fault
def test_a_port_in_use_is_refused_naming_it(tmp_path):
    """Another server has the port: `make server` must fail, not exit 0 as if it had run."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        result, took = make("server", tmp_path, BACKEND=f"sqlite:///{tmp_path}/mlflow.db",
                            SERVER_PORT=str(port))
    line = one_line(result, "tools.server")
    assert f"127.0.0.1:{port} is already in use" in line, line
    assert took < SECONDS
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("variables, message", [
    ({"SERVER_PORT": "99999"}, "SERVER_PORT='99999': should be a whole number from 1 to 65535"),
    ({"SERVER_PORT": "http"}, "SERVER_PORT='http': should be a whole number from 1 to 65535"),
    ({"SERVER_PORT": ""}, "SERVER_PORT='': should be a whole number from 1 to 65535"),
    # TEST-NET-1 (RFC 5737): an address no machine of ours has
    ({"SERVER_HOST": "192.0.2.1"}, "SERVER_HOST='192.0.2.1': not an address of this machine"),
])
def test_a_bad_address_is_refused(tmp_path, variables, message):
    variables = {"SERVER_PORT": str(free_port()), **variables}
    result, _ = make("server", tmp_path, BACKEND=f"sqlite:///{tmp_path}/mlflow.db", **variables)
    assert message in one_line(result, "tools.server")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("variables, message", [
    ({"ALLOWED_HOSTS": "http://mlflow.team.example:5050"},
     "ALLOWED_HOSTS='http://mlflow.team.example:5050': should be the names clients reach the "
     "server by, comma-separated, each HOST or HOST:PORT"),
    ({"ALLOWED_HOSTS": "a.example, b.example"}, "ALLOWED_HOSTS='a.example, b.example': should be"),
    ({"CORS_ORIGINS": "notebooks.example"}, "CORS_ORIGINS='notebooks.example': should be the web "
                                            "pages' origins allowed to call the server"),
    ({"AUTH": "yes"}, "AUTH='yes': should be 1 (users and passwords) or 0"),
    ({"AUTH": "1"}, "AUTH=1: set MLFLOW_AUTH_ADMIN_PASSWORD to the password of the admin user 'admin'"),
    ({"AUTH": "1", "MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"},
     "MLFLOW_AUTH_ADMIN_PASSWORD is MLflow's old default password, known to all"),
    ({"AUTH": "1", "MLFLOW_AUTH_ADMIN_PASSWORD": "short"},
     "MLFLOW_AUTH_ADMIN_PASSWORD has 5 characters; MLflow needs 12 or more"),
], ids=["scheme", "spaces", "cors", "auth-yes", "no-password", "old-default", "short"])
def test_bad_team_settings_are_refused(tmp_path, variables, message):
    """Host names, web origins and AUTH=1's admin password: one line each, nothing written."""
    pytest.importorskip("flask_wtf")
    result, took = make("server", tmp_path, BACKEND=f"sqlite:///{tmp_path}/mlflow.db",
                        SERVER_PORT=str(free_port()), **variables)
    assert message in one_line(result, "tools.server")
    assert took < SECONDS and not (tmp_path / "server").exists()


def test_good_settings_start_mlflows_server(tmp_path):
    """The checks pass on a new sqlite store, and the process becomes `mlflow server` with
    the proxied artifacts in SERVER_DIR/artifacts; a password in BACKEND is never printed."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true")
    server_dir = tmp_path / "server"
    process = subprocess.Popen(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "server", f"BIN={BIN}",
         f"SERVER_DIR={server_dir}", f"SERVER_PORT={port}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process)
        assert (server_dir / "mlflow.db").is_file() and (server_dir / "artifacts").is_dir()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    out = process.stdout.read().decode()
    assert out.startswith(f"tools.server: sqlite:///{server_dir}/mlflow.db, artifacts in "
                          f"{server_dir}/artifacts; clients: MLFLOW_TRACKING_URI="
                          f"http://127.0.0.1:{port}"), out


# --- make postgres ----------------------------------------------------------------------------


@pytest.mark.bad_input
def test_make_postgres_in_a_server_dir_that_is_a_file(tmp_path):
    (tmp_path / "server").write_text("a file where the folder should be\n")
    result, took = make("postgres", tmp_path)
    line = one_line(result, "tools.postgres")
    assert line == (f"tools.postgres: error: cannot create the data folder {tmp_path}/server/postgres: "
                    f"Not a directory; pick a SERVER_DIR this user can write"), line
    assert took < SECONDS


@pytest.mark.bad_input
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_make_postgres_in_a_read_only_server_dir(tmp_path):
    server_dir = tmp_path / "server"
    server_dir.mkdir(mode=0o555)
    try:
        result, _ = make("postgres", tmp_path)
    finally:
        server_dir.chmod(0o755)
    line = one_line(result, "tools.postgres")
    assert "Permission denied; pick a SERVER_DIR this user can write" in line, line
    assert not (server_dir / "postgres").exists()


@pytest.mark.fault
def test_postgres_in_a_folder_it_may_not_write(tmp_path, monkeypatch, capsys):
    """What a user without write access sees (the suite may run as root, who may write
    anywhere): the data folder cannot be created."""
    from tools import postgres

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    monkeypatch.setattr(sys, "argv", ["tools.postgres", str(tmp_path / "server/postgres")])
    with pytest.raises(SystemExit) as stopped:
        postgres.main()
    assert stopped.value.code == (f"tools.postgres: error: cannot create the data folder "
                                  f"{tmp_path}/server/postgres: Permission denied; pick a "
                                  f"SERVER_DIR this user can write")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.interruption
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_make_postgres_stopped_by_a_signal_stops_postgresql(tmp_path, stop):
    """Started in the background by a script (which leaves SIGINT ignored) and stopped with
    `kill -INT` or `kill -TERM`: PostgreSQL stops with it instead of running on, ownerless."""
    pytest.importorskip("pgserver")
    folder = tmp_path / "postgres"
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    process = subprocess.Popen([str(BIN / "python"), "-m", "tools.postgres", str(folder)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ignore_sigint)
    postgres = None
    try:
        assert process.stdout.readline().startswith("PostgreSQL is running"), process.stderr.read()
        postgres = int((folder / "postmaster.pid").read_text().split()[0])
        process.send_signal(stop)
        process.wait(timeout=SECONDS)
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline and alive(postgres):
            time.sleep(0.2)
        assert not alive(postgres), "PostgreSQL outlived `make postgres`"
        assert not (folder / "postmaster.pid").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if postgres is not None:  # whatever happened above, no PostgreSQL is left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(postgres, signal.SIGINT)  # PostgreSQL's fast shutdown
