"""The team's tracking server in the background, from one terminal: PostgreSQL and MLflow.

    python -m tools.team up [--backend URI] SERVER_SETTINGS...   (`make team-up`)
    python -m tools.team down --server-dir DIR                    (`make team-down`)

`up` checks the server's settings (tools/server.py), starts a private PostgreSQL
(tools/postgres.py; none when BACKEND names a database already) and the tracking server, each
in a process group of its own with its log and PID in SERVER_DIR, waits until the server
answers, and prints the MLFLOW_TRACKING_URI to give clients. `down` stops both. Either one
again is harmless: it says what already runs, or that nothing does, and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mnistlab.tracking import redact
from tools import server

PROG = "tools.team"
REPO = Path(__file__).resolve().parents[1]
START_S = 120  # PostgreSQL's first start (initdb) or MLflow's first migrations: tens of seconds
STOP_S = 30
# What each PID file's process runs: a PID the system gave to another program since is no
# process of ours (tools.server becomes `mlflow server`).
MARKERS = {"server": b"mlflow", "postgres": b"tools.postgres"}


class TeamError(RuntimeError):
    """The team's server cannot be started."""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1][0] != "Z"  # a zombie has stopped
    return True


def running(server_dir: Path, name: str) -> int | None:
    """The PID in SERVER_DIR/NAME.pid, while that process is still ours and running."""
    try:
        pid = int((server_dir / f"{name}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        ours = MARKERS[name] in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        ours = alive(pid)  # no /proc: trust the PID file
    return pid if ours and alive(pid) else None


def log_lines(path: Path, offset: int = 0) -> list[str]:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def start(server_dir: Path, name: str, command: list[str]) -> tuple[subprocess.Popen, int]:
    """COMMAND in a session of its own (Ctrl-C in this terminal does not reach it), its output
    appended to SERVER_DIR/NAME.log, its PID in SERVER_DIR/NAME.pid; and where its log starts."""
    log_path = server_dir / f"{name}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    (server_dir / f"{name}.pid").write_text(f"{process.pid}\n")
    return process, offset


def failure(server_dir: Path, name: str, offset: int) -> str:
    """The one line a tool ends with (its `error:` line), or the log's last line."""
    lines = log_lines(server_dir / f"{name}.log", offset)
    errors = [line for line in lines if ": error: " in line]
    return (errors or lines or ["(nothing in its log)"])[-1].strip()


def start_postgres(server_dir: Path) -> str:
    """A private PostgreSQL in SERVER_DIR/postgres; its BACKEND."""
    process, offset = start(server_dir, "postgres", [sys.executable, "-m", "tools.postgres",
                                                      str(server_dir / "postgres")])
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        for line in log_lines(server_dir / "postgres.log", offset):
            if match := re.search(r"BACKEND='([^']+)'", line):
                return match[1]
        if process.poll() is not None:
            (server_dir / "postgres.pid").unlink(missing_ok=True)
            raise TeamError(f"PostgreSQL did not start: {failure(server_dir, 'postgres', offset)}")
        time.sleep(0.2)
    stop(server_dir, "postgres")
    raise TeamError(f"PostgreSQL did not start in {START_S} s; see {server_dir / 'postgres.log'}")


def postgres_backend(server_dir: Path) -> str | None:
    """The BACKEND of the PostgreSQL an earlier `up` left running."""
    for line in reversed(log_lines(server_dir / "postgres.log")):
        if match := re.search(r"BACKEND='([^']+)'", line):
            return match[1]
    return None


def wait_for_health(process: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def client_uri(server_dir: Path) -> str:
    """The address tools.server printed at its last start."""
    for line in reversed(log_lines(server_dir / "server.log")):
        if match := re.search(r"MLFLOW_TRACKING_URI=(\S+?)[.,;]?(\s|$)", line):
            return match[1]
    return f"(see {server_dir / 'server.log'})"


def up(argv: Sequence[str]) -> None:
    backend = None
    if "--backend" in argv:  # BACKEND given: a database of the team's own, no PostgreSQL here
        at = list(argv).index("--backend")
        backend, argv = argv[at + 1], [*argv[:at], *argv[at + 2:]]
    args = server.parse_args([*argv, "--backend", "-", "--artifacts", "-"])
    if not args.server_dir:
        sys.exit(f"{PROG}: error: give --server-dir (SERVER_DIR)")
    server_dir = Path(args.server_dir).resolve()
    if pid := running(server_dir, "server"):
        print(f"{PROG}: the tracking server is already running (PID {pid}); clients: "
              f"MLFLOW_TRACKING_URI={client_uri(server_dir)}")
        return
    try:
        server.check_settings(args)  # every setting, before PostgreSQL starts
        server.make_folders(None, server_dir)
    except server.ServerError as err:
        sys.exit(f"{PROG}: error: {err}")
    started_postgres = False
    try:
        if backend is None:
            backend = postgres_backend(server_dir) if running(server_dir, "postgres") else None
            if backend is None:
                backend, started_postgres = start_postgres(server_dir), True
        command = [sys.executable, "-m", "tools.server", *argv, "--backend", backend,
                   "--artifacts", str(server_dir / "artifacts")]
        process, offset = start(server_dir, "server", command)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        url = f"http://[{host}]:{args.port}" if ":" in host else f"http://{host}:{args.port}"
        if not wait_for_health(process, url):
            stop(server_dir, "server")
            raise TeamError(f"the tracking server did not start: {failure(server_dir, 'server', offset)}")
    except TeamError as err:
        if started_postgres:
            stop(server_dir, "postgres")
        sys.exit(f"{PROG}: error: {redact(str(err))}")
    postgres = running(server_dir, "postgres")
    print(f"{PROG}: the tracking server is running (PID {process.pid}"
          f"{f', PostgreSQL PID {postgres}' if postgres else ''}; logs in {server_dir}); "
          f"clients: MLFLOW_TRACKING_URI={client_uri(server_dir)}; make team-down stops it")


def stop(server_dir: Path, name: str) -> int | None:
    """Stop NAME's process group (the server's uvicorn workers with it), then its PID file.
    PostgreSQL's own processes are stopped by tools.postgres on SIGTERM."""
    pid = running(server_dir, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if name == "server":
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    if name == "postgres":
        stop_postmaster(server_dir / "postgres")
    (server_dir / f"{name}.pid").unlink(missing_ok=True)
    return pid


def stop_postmaster(data: Path) -> None:
    """A PostgreSQL that outlived its tools.postgres (killed): its fast shutdown."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def down(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "--server-dir":
        sys.exit(f"usage: python -m {PROG} down --server-dir DIR")
    server_dir = Path(argv[1]).resolve()
    stopped = [f"{label} (PID {pid})" for name, label in (("server", "the tracking server"),
                                                           ("postgres", "PostgreSQL"))
               if (pid := stop(server_dir, name)) is not None]
    if stopped:
        print(f"{PROG}: stopped {' and '.join(stopped)}")
    else:
        print(f"{PROG}: nothing is running in {server_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["up"]:
        up(argv[1:])
    elif argv[:1] == ["down"]:
        down(argv[1:])
    else:
        sys.exit(f"usage: python -m {PROG} up|down ...")


if __name__ == "__main__":
    main()
