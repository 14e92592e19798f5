"""A private PostgreSQL server for the MLflow tracking server, started without root or Docker.

    python -m tools.postgres server/postgres        (`make postgres`)

It runs PostgreSQL from the PyPI wheel `pgserver` (the server binaries ship inside it), keeps
its data in the given folder, listens on a Unix socket in that folder only (no TCP port), and
prints the BACKEND to give `make server`. It stops on Ctrl-C; the data stays for next time.
A team server that other machines reach needs a PostgreSQL they can reach instead (any
managed or packaged one): pass its postgresql+psycopg:// URI as BACKEND.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path


class PostgresError(RuntimeError):
    """PostgreSQL cannot be started in the given folder."""


def check_folder(folder: Path) -> None:
    """The data folder exists (made here) and this user can write in it, before pgserver
    starts (it would end in a traceback)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PostgresError(f"cannot create the data folder {folder}: {err.strerror}; pick a "
                            f"SERVER_DIR this user can write") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PostgresError(f"the data folder {folder} is not writable; pick a SERVER_DIR "
                            f"this user can write")


def start(folder: Path):
    """The running server (stopped when this process exits) and its SQLAlchemy URI for MLflow."""
    check_folder(folder)
    with warnings.catch_warnings():  # "XDG_RUNTIME_DIR is not set": pgserver then uses /tmp
        warnings.simplefilter("ignore")
        import pgserver
    server = pgserver.get_server(folder, cleanup_mode="stop")
    # pgserver's URI names no driver; SQLAlchemy would pick psycopg2, the wheel here is psycopg 3.
    return server, server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


def stop_by_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tools.postgres FOLDER")
    folder = Path(sys.argv[1]).resolve()
    # pgserver logs a failed start as many lines (the command, its output, the server log):
    # the one line below says what failed and where the log is.
    logging.getLogger("pgserver").setLevel(logging.CRITICAL)
    try:
        _, uri = start(folder)
    except PostgresError as err:
        sys.exit(f"tools.postgres: error: {err}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        sys.exit(f"tools.postgres: error: PostgreSQL did not start in {folder}: {first} "
                 f"(its log: {folder / 'log'})")
    # SIGTERM, and SIGINT where a script started this in the background (which leaves SIGINT
    # ignored), stop PostgreSQL like Ctrl-C; otherwise this process would end without
    # stopping it. Set before the line below, which tells a script that it may stop us.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_by_signal)
    print(f"PostgreSQL is running; start the tracking server with\n  make server BACKEND='{uri}'\n"
          f"Ctrl-C stops PostgreSQL.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("PostgreSQL stopped")


if __name__ == "__main__":
    main()
