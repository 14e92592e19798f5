"""The team's MLflow tracking server, checked before it starts.

    python -m tools.server --backend URI --host HOST --port PORT --artifacts DIR   (`make server`)

`mlflow server` takes whatever it is given and finds out late: a database that does not
answer is retried for minutes without a word, a BACKEND it cannot use ends in a traceback,
and a port already taken ends the server with exit status 0. This checks, in seconds and
before anything is written, that BACKEND is a database URI MLflow accepts, that the address
is free, and that the database answers and is not an Optuna study's; each failure is one
line. Then it becomes `mlflow server` with the same settings (proxied artifacts in DIR).
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from stages.params import echo
from stages.tracking import redact

PROG = "tools.server"
# The databases MLflow's tracking store runs on (mlflow.store.db.db_types), each with an
# optional SQLAlchemy driver: postgresql+psycopg://, mysql+pymysql://, ...
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
FORMS = ("sqlite:///PATH, postgresql+psycopg://USER:PASSWORD@HOST[:PORT]/DB, "
         "mysql+DRIVER://... or mssql+DRIVER://...")
# How long a database server may take to answer. MLflow itself would retry for minutes.
CONNECT_TIMEOUT_S = 5
# Tables that only an Optuna storage has (tools/search.py's SEARCH_STORAGE): MLflow would add
# its own next to them, and both keep their schema version in the same alembic_version table.
OPTUNA_TABLES = {"studies", "trials", "version_info"}


class ServerError(RuntimeError):
    """A setting the tracking server cannot start with."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True, help="the database (BACKEND)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (SERVER_HOST)")
    parser.add_argument("--port", default="5050", help="the port to listen on (SERVER_PORT)")
    parser.add_argument("--artifacts", required=True, help="where the served artifacts are kept")
    parser.add_argument("--workers", default="1", help="server processes")
    return parser.parse_args(argv)


def whole_number(name: str, value: str, least: int, most: int) -> int:
    # isascii: '²' is a digit to str.isdigit, not to int(); the length keeps int() quick.
    if not (value.isascii() and value.isdigit() and len(value) < 10 and least <= int(value) <= most):
        raise ServerError(f"{name}={echo(value)}: should be a whole number from {least} to {most}")
    return int(value)


def check_backend(uri: str):
    """The URI as SQLAlchemy reads it, when it is a database URI MLflow's server accepts
    and its driver is installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    bad = ServerError(f"BACKEND={redact(uri)!r}: should be {FORMS} (the databases mlflow "
                      f"server stores runs in)")
    try:
        url = make_url(uri)
    except (ArgumentError, ValueError):
        raise bad from None
    if url.get_backend_name() not in DATABASES or url.drivername.count("+") > 1:
        raise bad
    if url.get_backend_name() == "sqlite" and (not uri.startswith("sqlite:///") or
                                               url.database in (None, "", ":memory:")):
        raise bad  # an in-memory database would lose every run when the server stops
    try:
        url.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError) as err:
        raise ServerError(f"BACKEND={redact(uri)!r}: its driver {url.drivername!r} is not "
                          f"installed ({err})") from None
    return url


def check_address(host: str, port: int) -> None:
    """Bind HOST:PORT as the server will (with SO_REUSEADDR, as uvicorn does), and let go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror as err:
        raise ServerError(f"SERVER_HOST={echo(host)}: not a known host name or address "
                          f"({err.strerror})") from None
    except (ValueError, UnicodeError):  # a NUL byte, a label over 63 characters
        raise ServerError(f"SERVER_HOST={echo(host)}: not a host name or address") from None
    except OSError as err:
        address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if err.errno == errno.EADDRINUSE:
            raise ServerError(f"{address} is already in use (another server?); pass another "
                              f"SERVER_PORT or stop what listens there") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise ServerError(f"SERVER_HOST={echo(host)}: not an address of this machine") from None
        raise ServerError(f"cannot listen on {address}: {err.strerror}") from None


def sqlite_tables(uri: str, path: Path) -> set[str]:
    """The tables of an existing sqlite file, read without writing to it."""
    if path.is_dir():
        raise ServerError(f"BACKEND={uri}: {path} is a folder, not a database file")
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        raise ServerError(f"BACKEND={uri}: {path} is not a database MLflow can use: {err}") from None


def server_tables(uri: str, backend: str) -> set[str]:
    """The tables of a database server's database; its error when it does not answer
    within CONNECT_TIMEOUT_S (a thread, because not every driver has a timeout)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if backend in ("postgresql", "mysql") else {}
    found: dict[str, object] = {}

    def probe() -> None:
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=NullPool)
            try:
                found["tables"] = set(sqlalchemy.inspect(engine).get_table_names())
            finally:
                engine.dispose()
        except Exception as err:  # noqa: BLE001 - reported in one line below
            found["error"] = err

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(2 * CONNECT_TIMEOUT_S + 1)  # a host name to look up, then the connection
    if thread.is_alive():
        raise ServerError(f"BACKEND={redact(uri)} did not answer in {2 * CONNECT_TIMEOUT_S + 1} s; "
                          f"is the database server running and reachable from here?")
    if "error" in found:
        err = found["error"]
        cause = getattr(err, "orig", None) or err  # the driver's own message, not SQLAlchemy's
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ServerError(redact(f"BACKEND={uri}: cannot connect: {first}"))
    return found["tables"]  # type: ignore[return-value]


def check_database(uri: str, url) -> None:
    if url.get_backend_name() == "sqlite":
        path = Path(url.database)
        tables = sqlite_tables(uri, path) if path.exists() else set()  # MLflow creates a new one
    else:
        tables = server_tables(uri, url.get_backend_name())
    if OPTUNA_TABLES <= tables:
        raise ServerError(redact(f"BACKEND={uri} holds an Optuna study's tables (a SEARCH_STORAGE "
                                 f"of make search); MLflow needs a database of its own"))


def make_folders(url, artifacts: Path) -> None:
    folders = [artifacts] + ([Path(url.database).parent] if url.get_backend_name() == "sqlite" else [])
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ServerError(f"cannot create the folder {folder}: {err.strerror}; pick a "
                              f"SERVER_DIR this user can write") from None
        if not os.access(folder, os.W_OK):
            raise ServerError(f"{folder} is not writable; pick a SERVER_DIR this user can write")


def server_command(args: argparse.Namespace) -> list[str]:
    """`mlflow server` with proxied artifacts, as `make server` has always run it."""
    mlflow = str(Path(sys.executable).parent / "mlflow")
    return [mlflow, "server", "--backend-store-uri", args.backend, "--serve-artifacts",
            "--artifacts-destination", str(args.artifacts), "--host", args.host,
            "--port", str(args.port), "--workers", str(args.workers)]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.port = whole_number("SERVER_PORT", args.port, 1, 65535)
        args.workers = whole_number("workers", args.workers, 1, 64)
        url = check_backend(args.backend)
        check_address(args.host, args.port)
        check_database(args.backend, url)
        args.artifacts = Path(args.artifacts).resolve()
        make_folders(url, args.artifacts)
    except ServerError as err:
        sys.exit(f"{PROG}: error: {err}")
    print(f"{PROG}: {redact(args.backend)}, artifacts in {args.artifacts}; clients: "
          f"MLFLOW_TRACKING_URI=http://{args.host}:{args.port}", flush=True)
    command = server_command(args)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
