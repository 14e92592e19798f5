"""A private PostgreSQL server for the MLflow tracking server, started without root or Docker.

    python -m tools.postgres server/postgres        (`make postgres`)

It runs PostgreSQL from the PyPI wheel `pgserver` (the server binaries ship inside it), keeps
its data in the given folder, listens on a Unix socket in that folder only (no TCP port), and
prints the BACKEND to give `make server`. It stops on Ctrl-C; the data stays for next time.
A team server that other machines reach needs a PostgreSQL they can reach instead (any
managed or packaged one): pass its postgresql+psycopg:// URI as BACKEND.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def start(folder: Path):
    """The running server (stopped when this process exits) and its SQLAlchemy URI for MLflow."""
    import pgserver

    folder.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(folder, cleanup_mode="stop")
    # pgserver's URI names no driver; SQLAlchemy would pick psycopg2, the wheel here is psycopg 3.
    return server, server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tools.postgres FOLDER")
    _, uri = start(Path(sys.argv[1]).resolve())
    print(f"PostgreSQL is running; start the tracking server with\n  make server BACKEND='{uri}'\n"
          f"Ctrl-C stops PostgreSQL.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("PostgreSQL stopped")


if __name__ == "__main__":
    main()
