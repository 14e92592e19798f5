"""A tracking server the team reaches, and a new clone's `make pull`:

* MLflow refuses a client that names the server by anything but localhost or a private
  address (403 "Invalid Host header"); ALLOWED_HOSTS lets the names through. Shown with a
  client in a network namespace of its own that reaches the server by name (root, `ip`), and
  with an explicit Host header over 127.0.0.1 everywhere;
* AUTH=1: MLflow's basic-auth app, 401 without a password, a run logged by an added user;
* `make team-up` / `make team-down`: PostgreSQL and the server in the background, either one
  twice is harmless, nothing left running;
* `make pull` in a new clone whose remote holds nothing: exit 0, and which outputs `dvc
  repro` will rebuild; a remote folder that does not exist: one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import BIN, REPO, tiny_project

from tools.mlflow_ui import free_port, wait_until_up
from tools.team import alive

NAME = "mlflow.team.test"
ADMIN_PASSWORD = "a team's secret, 31 characters"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def clean_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **more)
    return env


@contextlib.contextmanager
def server(tmp_path: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None, *args: str):
    """`make server`'s command with extra settings (ARGS); yields its port. Stopped with its
    process group (the uvicorn workers) whatever happens."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "tools.server", "--backend", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts", str(tmp_path / "artifacts"), "--server-dir", str(tmp_path), "--host", host,
         "--port", str(port), "--workers", "1", *args],
        cwd=REPO, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        wait_until_up(f"http://{host}:{port}", process, seconds=90)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


# --- ALLOWED_HOSTS -----------------------------------------------------------------------------


@pytest.mark.fault
def test_a_host_header_of_another_name_needs_allowed_hosts(tmp_path):
    """The Host header a client on another machine sends, over 127.0.0.1: refused unless
    ALLOWED_HOSTS names it (with or without the port); the server's own names still work."""
    with server(tmp_path / "closed") as port:
        assert status(f"http://127.0.0.1:{port}{SEARCH}", {"Host": f"{NAME}:{port}"}) == 403
        assert status(f"http://127.0.0.1:{port}{SEARCH}") == 200
    with server(tmp_path / "open", "127.0.0.1", None, "--allowed-hosts", NAME) as port:
        assert status(f"http://127.0.0.1:{port}{SEARCH}", {"Host": f"{NAME}:{port}"}) == 200
        assert status(f"http://127.0.0.1:{port}{SEARCH}", {"Host": f"other.test:{port}"}) == 403
        assert status(f"http://127.0.0.1:{port}{SEARCH}") == 200  # MLflow's defaults stay
        assert status(f"http://localhost:{port}{SEARCH}") == 200
        assert status(f"http://127.0.0.1:{port}{SEARCH}", {"Host": f"10.1.2.3:{port}"}) == 200


@contextlib.contextmanager
def namespace():
    """A network namespace whose one link is a veth pair to this host: this side 10.231.77.1,
    the namespace's side 10.231.77.2 (a /30 of their own), and in it NAME is 10.231.77.1
    (`ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts). Yields the command prefix
    that runs a program in it; everything is removed afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("a client in a network namespace needs root and `ip` (iproute2); the Host "
                    "header test covers the check without one")
    ns, here, there = f"mlt{os.getpid()}", f"mlh{os.getpid()}", f"mln{os.getpid()}"
    hosts = Path("/etc/netns") / ns
    made_netns_dir = not hosts.parent.exists()

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    try:
        try:
            ip("netns", "add", ns)
        except subprocess.CalledProcessError as err:
            pytest.skip(f"no network namespace here: {err.stderr.decode().strip()}")
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", there, "netns", ns)
        ip("addr", "add", "10.231.77.1/30", "dev", here)
        ip("link", "set", here, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", "10.231.77.2/30", "dev", there)
        ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n10.231.77.1 {NAME}\n")
        yield ["ip", "netns", "exec", ns]
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(hosts, ignore_errors=True)
        if made_netns_dir:
            with contextlib.suppress(OSError):
                hosts.parent.rmdir()


@pytest.mark.slow
@pytest.mark.fault
def test_a_client_on_another_host_logs_a_dvc_exp_run_by_name(tmp_path):
    """A client that reaches the server as mlflow.team.test (another host, as far as the
    network goes): refused without ALLOWED_HOSTS; with it, a whole `dvc exp run` lands."""
    import mlflow

    project = tiny_project(tmp_path / "project")
    probe = [str(BIN / "python"), "-c", "import sys, urllib.request, urllib.error\n"
             "try: print(urllib.request.urlopen(sys.argv[1], timeout=10).status)\n"
             "except urllib.error.HTTPError as err: print(err.code, err.read().decode())"]
    with namespace() as inside:
        with server(tmp_path / "closed", "10.231.77.1") as port:
            answer = subprocess.run([*inside, *probe, f"http://{NAME}:{port}{SEARCH}"],
                                    capture_output=True, text=True, timeout=60)
            assert answer.stdout.startswith("403") and "Invalid Host header" in answer.stdout, answer
        with server(tmp_path / "open", "10.231.77.1", None, "--allowed-hosts", NAME) as port:
            url = f"http://{NAME}:{port}"
            answer = subprocess.run([*inside, *probe, f"{url}{SEARCH}"], capture_output=True,
                                    text=True, timeout=60)
            assert answer.stdout.startswith("200"), answer
            result = subprocess.run([*inside, str(BIN / "dvc"), "exp", "run", "-n", "by-name"],
                                    cwd=project, env=clean_env(MLFLOW_TRACKING_URI=url),
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout + result.stderr
            mlflow.set_tracking_uri(f"http://10.231.77.1:{port}")  # a private address: allowed
            runs = mlflow.search_runs(experiment_names=["mnist-cnn"], output_format="list")
            assert [run.info.run_name for run in runs] == ["by-name"]
            assert runs[0].info.status == "FINISHED" and "final_test_accuracy" in runs[0].data.metrics
    assert not (project / "mlruns").exists()


# --- AUTH=1 ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.fault
def test_auth_needs_a_user_and_an_added_user_logs_a_run(tmp_path):
    pytest.importorskip("flask_wtf")
    env = clean_env(MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD)
    with server(tmp_path, "127.0.0.1", env, "--auth", "1") as port:
        url = f"http://127.0.0.1:{port}"
        assert status(f"{url}{SEARCH}") == 401
        config = tmp_path / "basic_auth.ini"
        assert config.stat().st_mode & 0o777 == 0o600
        assert ADMIN_PASSWORD not in config.read_text()  # the password stays off the disk
        added = subprocess.run([str(BIN / "python"), "-m", "tools.server", "add-user", "alice",
                                "--url", url], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
        assert added.returncode == 0, added.stderr
        password = added.stdout.split("MLFLOW_TRACKING_PASSWORD=")[1].split()[0]
        log = ("import mlflow\nmlflow.set_experiment('mnist-cnn')\n"
               "with mlflow.start_run(run_name='alice-run'):\n    mlflow.log_metric('m', 1.0)\n")
        for user, secret, ok in [("alice", "wrong password!", False), ("alice", password, True)]:
            result = subprocess.run(
                [str(BIN / "python"), "-c", log], cwd=tmp_path, timeout=120, capture_output=True,
                text=True, env=clean_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=user,
                                         MLFLOW_TRACKING_PASSWORD=secret,
                                         MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
            assert (result.returncode == 0) == ok, result.stderr[-2000:]
        again = subprocess.run([str(BIN / "python"), "-m", "tools.server", "add-user", "alice",
                                "--url", url], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode != 0 and "Traceback" not in again.stderr
        assert again.stderr.startswith("tools.server: error: cannot add 'alice'"), again.stderr


# --- make team-up / team-down --------------------------------------------------------------------


def make(target: str, server_dir: Path, timeout: int = 180, **variables: str) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", target, f"BIN={BIN}",
               f"SERVER_DIR={server_dir}", *[f"{key}={value}" for key, value in variables.items()]]
    return subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_team_up_and_down_twice_each_leave_nothing_running(tmp_path):
    pytest.importorskip("pgserver")
    server_dir, port = tmp_path / "server", free_port()
    pids: list[int] = []
    try:
        up = make("team-up", server_dir, SERVER_PORT=str(port))
        assert up.returncode == 0, up.stdout + up.stderr
        pids = [int((server_dir / f"{name}.pid").read_text()) for name in ("server", "postgres")]
        pids.append(int((server_dir / "postgres/postmaster.pid").read_text().split()[0]))
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port};" in up.stdout, up.stdout
        assert status(f"http://127.0.0.1:{port}{SEARCH}") == 200
        assert "postgresql+psycopg://" in (server_dir / "server.log").read_text()
        again = make("team-up", server_dir, SERVER_PORT=str(port))
        assert again.returncode == 0 and "already running" in again.stdout, again
        assert int((server_dir / "server.pid").read_text()) == pids[0]
        down = make("team-down", server_dir)
        assert down.returncode == 0 and "stopped the tracking server" in down.stdout, down
        assert not any(alive(pid) for pid in pids), [pid for pid in pids if alive(pid)]
        assert not (server_dir / "server.pid").exists() and not (server_dir / "postgres.pid").exists()
        again = make("team-down", server_dir)
        assert again.returncode == 0 and "nothing is running" in again.stdout, again
    finally:
        for pid in pids:  # whatever failed above, nothing stays running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if pid != pids[-1] else os.kill(pid, signal.SIGINT)


@pytest.mark.bad_input
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_team_up_with_a_bad_setting_starts_nothing(tmp_path):
    server_dir = tmp_path / "server"
    result = make("team-up", server_dir, timeout=60, SERVER_PORT="99999")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("tools.team: error: SERVER_PORT='99999': should be a whole "
                                    "number from 1 to 65535"), result.stderr
    assert not server_dir.exists()


# --- make pull ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A new clone of a tiny project: no DVC cache, no outputs."""
    base = tmp_path_factory.mktemp("pull")
    project = tiny_project(base / "project")
    subprocess.run(["git", "clone", "-q", str(project), str(base / "clone")], check=True, timeout=60)
    return base / "clone"


def make_pull(clone: Path, remote: Path) -> subprocess.CompletedProcess:
    subprocess.run([str(BIN / "dvc"), "remote", "modify", "--local", "storage", "url", str(remote)],
                   cwd=clone, env=clean_env(), check=True, capture_output=True, timeout=60)
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "pull", f"BIN={BIN}"],
                          cwd=clone, env=clean_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_make_pull_from_an_empty_remote_says_what_repro_rebuilds(clone, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    result = make_pull(clone, remote)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "md5:" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "tools.pull: nothing new from the remote 'storage'", result.stdout
    assert lines[1].startswith("tools.pull: dvc repro will rebuild "), result.stdout
    assert "train (models/model.pt" in lines[1], lines[1]


@pytest.mark.bad_input
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")
def test_make_pull_names_a_remote_folder_that_is_not_there(clone, tmp_path):
    result = make_pull(clone, tmp_path / "unmounted")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert lines == [f"tools.pull: error: the DVC remote 'storage' is the folder "
                     f"{tmp_path / 'unmounted'}, which does not exist; mount it, or point this "
                     f"clone elsewhere with make remote URL=... LOCAL=1"], result.stderr
    assert not (clone / "models/model.pt").exists()
