"""Child processes that find the executables of the Python running them.

dvc.yaml runs each stage as `python -m stages.<name>`, and the tools start `dvc` and `mlflow`:
a child process must find those of this interpreter's environment (the project's .venv), also
when its bin/ is not on PATH, as when `.venv/bin/python -m benchmarks.experiment_time` runs
outside `make` or an activated environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def bin_dir() -> Path:
    """The folder of this interpreter's executables. Not resolved: a virtual environment's
    python is a link to the system's, and the environment's bin/ is the folder of the link."""
    return Path(sys.executable).parent


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with `extra` on top and bin_dir() first on PATH."""
    env = {**os.environ, **(extra or {})}
    first = str(bin_dir())
    rest = env.get("PATH", "")
    if rest.split(os.pathsep)[0] != first:
        # No trailing separator when PATH was empty: an empty entry would mean the cwd.
        env["PATH"] = f"{first}{os.pathsep}{rest}" if rest else first
    return env
