"""The team's MLflow tracking server, checked before it starts.

    python -m tools.server --backend URI --host HOST --port PORT --artifacts DIR   (`make server`)
        [--allowed-hosts NAME:PORT,...] [--cors-origins https://HOST,...] [--auth 1 --server-dir DIR]
    python -m tools.server add-user NAME [--url URL]   (a user of a server started with AUTH=1)

`mlflow server` takes whatever it is given and finds out late: a database that does not
answer is retried for minutes without a word, a BACKEND it cannot use ends in a traceback,
and a port already taken ends the server with exit status 0. This checks, in seconds and
before anything is written, that BACKEND is a database URI MLflow accepts, that the address
is free, and that the database answers and is not an Optuna study's; each failure is one
line. Then it becomes `mlflow server` with the same settings (proxied artifacts in DIR).

MLflow answers 403 "Invalid Host header" to a client that names the server by anything but
localhost or a private IP address: ALLOWED_HOSTS lists the names clients use. AUTH=1 runs
MLflow's basic-auth app: every request needs a user and password (MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD on the client), the first admin's password comes from
MLFLOW_AUTH_ADMIN_PASSWORD, and `add-user` adds the others.
"""

from __future__ import annotations

import argparse
import configparser
import errno
import importlib.util
import io
import os
import re
import secrets
import socket
import sqlite3
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from mnistlab.files import write_atomic
from mnistlab.config import echo
from mnistlab.tracking import redact
from tools.cli import OneLineParser, is_whole_number

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
# A Host header as MLflow's --allowed-hosts matches it (fnmatch, `*` a wildcard): a name or
# IPv4 address, or an [IPv6] one, then an optional port. No scheme, path or spaces.
HOST_PATTERN = re.compile(r"(\*|[A-Za-z0-9*][A-Za-z0-9.*_-]*|\[[0-9A-Fa-f:.*]+\])(:([0-9]{1,5}|\*))?")
ORIGIN_PATTERN = re.compile(r"\*|https?://([A-Za-z0-9*][A-Za-z0-9.*_-]*|\[[0-9A-Fa-f:.*]+\])(:([0-9]{1,5}|\*))?")
# The password MLflow's basic_auth.ini shipped before 3.x; MLflow 3.17 refuses it for an admin.
OLD_DEFAULT_PASSWORD = "password1234"
MIN_PASSWORD = 12  # MLflow's own rule (mlflow.utils.validation._validate_password)
USER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
AUTH_CONFIG = "basic_auth.ini"
AUTH_DATABASE = "basic_auth.db"
# Every user may log runs to every experiment (one shared experiment, mnist-cnn, for the
# whole team). MLflow's default, READ, would let only the user who created it log there.
DEFAULT_PERMISSION = "EDIT"


class ServerError(RuntimeError):
    """A setting the tracking server cannot start with."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True, help="the database (BACKEND)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (SERVER_HOST)")
    parser.add_argument("--port", default="5050", help="the port to listen on (SERVER_PORT)")
    parser.add_argument("--artifacts", required=True, help="where the served artifacts are kept")
    parser.add_argument("--workers", default="1", help="server processes")
    parser.add_argument("--allowed-hosts", default="",
                        help="names clients reach the server by, comma-separated (ALLOWED_HOSTS)")
    parser.add_argument("--cors-origins", default="",
                        help="web origins allowed to call the server, comma-separated (CORS_ORIGINS)")
    parser.add_argument("--auth", default="", help="1: users and passwords (AUTH)")
    parser.add_argument("--server-dir", default="",
                        help="where AUTH=1 keeps its users' database and config (SERVER_DIR)")
    return parser.parse_args(argv)


def whole_number(name: str, value: str, least: int, most: int) -> int:
    if not is_whole_number(value, least, most):
        raise ServerError(f"{name}={echo(value)}: should be a whole number from {least} to {most}")
    return int(value)


def allowed_hosts(value: str, port: int) -> list[str]:
    """ALLOWED_HOSTS as MLflow's --allowed-hosts: a name without a port also stands for
    NAME:PORT (clients send the port in their Host header, and MLflow matches it exactly),
    and what MLflow allows by default (localhost, private addresses) stays allowed: a list
    given to MLflow replaces its defaults, and would shut out this machine's own clients."""
    entries = value.split(",")
    if not all(HOST_PATTERN.fullmatch(entry) for entry in entries):
        raise ServerError(f"ALLOWED_HOSTS={echo(value)}: should be the names clients reach the "
                          f"server by, comma-separated, each HOST or HOST:PORT (e.g. "
                          f"mlflow.team.example:{port},10.0.0.5; * a wildcard), no http://")
    from mlflow.server.security_utils import get_default_allowed_hosts

    hosts = []
    for entry in entries:
        for host in (entry, f"{entry}:{port}") if HOST_PATTERN.fullmatch(entry)[2] is None else (entry,):
            if host not in hosts:
                hosts.append(host)
    return hosts + [host for host in get_default_allowed_hosts() if host not in hosts]


def cors_origins(value: str) -> list[str]:
    entries = value.split(",")
    if not all(ORIGIN_PATTERN.fullmatch(entry) for entry in entries):
        raise ServerError(f"CORS_ORIGINS={echo(value)}: should be the web pages' origins allowed "
                          f"to call the server, comma-separated, each http(s)://HOST[:PORT] (e.g. "
                          f"https://notebooks.team.example), no path")
    return entries


def admin_credentials() -> tuple[str, str]:
    """The first admin's name and password, as MLflow's basic-auth app reads them."""
    name = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not USER_PATTERN.fullmatch(name):
        raise ServerError(f"MLFLOW_AUTH_ADMIN_USERNAME={echo(name)}: should be letters, digits "
                          f"and . _ @ -, at most 64")
    if not password:
        raise ServerError(f"AUTH=1: set MLFLOW_AUTH_ADMIN_PASSWORD to the password of the admin "
                          f"user {name!r} ({MIN_PASSWORD} characters or more)")
    if password == OLD_DEFAULT_PASSWORD:
        raise ServerError(f"MLFLOW_AUTH_ADMIN_PASSWORD is MLflow's old default password, known to "
                          f"all; pick another ({MIN_PASSWORD} characters or more)")
    if len(password) < MIN_PASSWORD:
        raise ServerError(f"MLFLOW_AUTH_ADMIN_PASSWORD has {len(password)} characters; MLflow "
                          f"needs {MIN_PASSWORD} or more")
    return name, password


def check_auth(value: str, server_dir: str) -> bool:
    if value not in ("", "0", "1"):
        raise ServerError(f"AUTH={echo(value)}: should be 1 (users and passwords) or 0")
    if value != "1":
        return False
    if not server_dir:
        raise ServerError("AUTH=1 needs --server-dir, the folder of its users' database")
    if importlib.util.find_spec("flask_wtf") is None:  # MLflow's `auth` extra
        raise ServerError("AUTH=1 needs Flask-WTF, which MLflow's basic-auth app uses: "
                          "pip install 'mlflow[auth]==3.17.2' (or make setup)")
    admin_credentials()
    return True


def write_auth_config(server_dir: Path) -> Path:
    """SERVER_DIR/basic_auth.ini, this user's only (mode 0600): the users' database in
    SERVER_DIR and the first admin's name. The admin's password stays in the environment
    (MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow reads ahead of the file), off the disk."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": DEFAULT_PERMISSION,
        "database_uri": f"sqlite:///{server_dir / AUTH_DATABASE}",
        "admin_username": admin_credentials()[0],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    text = io.StringIO()
    config.write(text)
    path = server_dir / AUTH_CONFIG

    def write(file) -> None:
        os.fchmod(file.fileno(), 0o600)  # before a byte is written
        file.write(text.getvalue().encode())

    write_atomic(path, write)
    return path


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


def make_folders(url, artifacts: Path, *more: Path) -> None:
    sqlite = url is not None and url.get_backend_name() == "sqlite"
    folders = [artifacts, *more] + ([Path(url.database).parent] if sqlite else [])
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
    command = [mlflow, "server", "--backend-store-uri", args.backend, "--serve-artifacts",
               "--artifacts-destination", str(args.artifacts), "--host", args.host,
               "--port", str(args.port), "--workers", str(args.workers)]
    if args.allowed_hosts:
        command += ["--allowed-hosts", ",".join(args.allowed_hosts)]
    if args.cors_origins:
        command += ["--cors-allowed-origins", ",".join(args.cors_origins)]
    if args.auth:
        command += ["--app-name", "basic-auth"]
    return command


def check_settings(args: argparse.Namespace) -> None:
    """Every setting but the database, in place (`make team-up` checks them before it starts
    PostgreSQL)."""
    args.port = whole_number("SERVER_PORT", str(args.port), 1, 65535)
    args.workers = whole_number("workers", str(args.workers), 1, 64)
    args.allowed_hosts = allowed_hosts(args.allowed_hosts, args.port) if args.allowed_hosts else []
    args.cors_origins = cors_origins(args.cors_origins) if args.cors_origins else []
    args.auth = check_auth(args.auth, args.server_dir)
    check_address(args.host, args.port)


def client_uri(args: argparse.Namespace) -> str:
    """The address clients give as MLFLOW_TRACKING_URI: the first name in ALLOWED_HOSTS
    without a wildcard, else the listening address (0.0.0.0 is no address to connect to)."""
    for host in args.allowed_hosts:  # each name comes with a port too (allowed_hosts)
        match = HOST_PATTERN.fullmatch(host)
        if match and "*" not in host and match[2] and match[1] not in ("localhost", "127.0.0.1"):
            return f"http://{host}"
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    return f"http://[{host}]:{args.port}" if ":" in host else f"http://{host}:{args.port}"


def serve(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    try:
        check_settings(args)
        url = check_backend(args.backend)
        check_database(args.backend, url)
        args.artifacts = Path(args.artifacts).resolve()
        server_dir = Path(args.server_dir).resolve() if args.auth else None
        make_folders(url, args.artifacts, *([server_dir] if server_dir else []))
        if server_dir:
            os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(server_dir))
            # The basic-auth app's CSRF key (its user-creation form); one per start is enough.
            os.environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    except ServerError as err:
        sys.exit(f"{PROG}: error: {err}")
    users = " (users: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)" if args.auth else ""
    print(f"{PROG}: {redact(args.backend)}, artifacts in {args.artifacts}; clients: "
          f"MLFLOW_TRACKING_URI={client_uri(args)}{users}. A new server gets no runs of the "
          f"stages DVC skips as unchanged: dvc exp run -f logs them again", flush=True)
    command = server_command(args)
    os.execv(command[0], command)


def add_user(argv: Sequence[str]) -> None:
    """A user of a server started with AUTH=1, through MLflow's own client (POST
    /api/2.0/mlflow/users/create, an admin's credentials). Prints the new user's password once."""
    parser = OneLineParser(prog=f"{PROG} add-user", description=add_user.__doc__.split("\n")[0])
    parser.add_argument("name", help="the new user's name")
    parser.add_argument("--url", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5050"),
                        help="the server (default: MLFLOW_TRACKING_URI, else http://127.0.0.1:5050)")
    args = parser.parse_args(argv)
    try:
        if not USER_PATTERN.fullmatch(args.name):
            raise ServerError(f"user name {echo(args.name)}: should be letters, digits and . _ @ -, "
                              f"at most 64")
        if not args.url.startswith(("http://", "https://")):
            raise ServerError(f"--url {echo(redact(args.url))}: should be the server's "
                              f"http(s)://HOST:PORT")
        if not os.environ.get("MLFLOW_TRACKING_USERNAME"):  # the admin of this machine's server
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = \
                admin_credentials()
    except ServerError as err:
        sys.exit(f"{PROG}: error: {err}")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    with warnings.catch_warnings():  # starlette's deprecation notice, about MLflow's own code
        warnings.simplefilter("ignore")
        from mlflow.exceptions import MlflowException
        from mlflow.server.auth.client import AuthServiceClient

    password = secrets.token_urlsafe(18)
    try:
        AuthServiceClient(args.url).create_user(args.name, password)
    except MlflowException as err:
        # The store's own words (a SQL error) follow "Error:"; what is wrong comes first.
        first = (str(err.message).strip().splitlines() or [type(err).__name__])[0].split(" Error: (")[0]
        sys.exit(f"{PROG}: error: cannot add {args.name!r} at {redact(args.url)}: {first[:300]}")
    print(f"{PROG}: added {args.name!r}; they log runs with MLFLOW_TRACKING_URI={redact(args.url)} "
          f"MLFLOW_TRACKING_USERNAME={args.name} MLFLOW_TRACKING_PASSWORD={password}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["add-user"]:
        add_user(argv[1:])
    else:
        serve(argv)


if __name__ == "__main__":
    main()
