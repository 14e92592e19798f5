"""Shared fixtures: a tiny synthetic MNIST (so tests never need the real download or the
network), a params factory that starts from the repo's own params.yaml, and the place where
the tiny project of tests/helpers.py is built. Functions the tests share are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import helpers
import pytest
import yaml
from helpers import REPO, synthetic_digits, write_idx


@pytest.fixture(scope="session", autouse=True)
def tiny_project_home(tmp_path_factory) -> None:
    """Where helpers.tiny_project builds the project it copies. Under pytest-xdist, the
    folder above each worker's own is this run's, shared: one worker builds, all copy."""
    base = tmp_path_factory.getbasetemp()
    helpers.TEMPLATE_HOME = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    # `train.precision: auto` caches what it measured on this CPU (mnistlab/precision.py):
    # the tests' runs, and the stages they start, share this run's cache, not the user's.
    os.environ["MNISTLAB_CACHE_DIR"] = str(helpers.TEMPLATE_HOME / "cache")


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """A data root with MNIST/raw holding 512 training and 256 test synthetic images."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    raw = root / "MNIST" / "raw"
    write_idx(raw, "train", *synthetic_digits(512, seed=0))
    write_idx(raw, "t10k", *synthetic_digits(256, seed=1))
    return root


@pytest.fixture(autouse=True)
def denormal_floats_back():
    """mnistlab.runtime.configure flushes denormal floats to zero for the whole process (a CPU
    speed setting of the stages); after a test that ran a stage's code in this process,
    the next test (hypothesis checks that such floats exist) gets an ordinary process."""
    yield
    import torch

    torch.set_flush_denormal(False)


@pytest.fixture
def default_params() -> dict:
    """The repo's params.yaml as a plain dict, for tests to modify."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


# --- the reliability tally -----------------------------------------------------------------
#
# Tests carrying one of these markers (pytest.ini) are counted when they pass; the summary
# prints one line, e.g. "reliability: 59 bad inputs refused, 14 faults injected, 4 runs
# interrupted; nothing lost". Parametrized cases count one each.

RELIABILITY = {  # marker -> (singular, plural)
    "bad_input": ("bad input refused", "bad inputs refused"),
    "fault": ("fault injected", "faults injected"),
    "interruption": ("run interrupted", "runs interrupted"),
}


def pytest_collection_modifyitems(config, items) -> None:
    # On the item, so that every report carries them (also from pytest-xdist's workers).
    for item in items:
        marks = tuple(name for name in RELIABILITY if item.get_closest_marker(name))
        if marks:
            item.user_properties.append(("reliability", marks))


def _marks(report) -> tuple[str, ...]:
    return dict(getattr(report, "user_properties", ())).get("reliability", ())


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    stats = terminalreporter.stats
    passed = {r.nodeid: _marks(r) for r in stats.get("passed", []) if r.when == "call"}
    failed = {r.nodeid for key in ("failed", "error") for r in stats.get(key, [])
              if getattr(r, "nodeid", None) and _marks(r)}
    counts = {name: sum(1 for nodeid, marks in passed.items()
                        if nodeid not in failed and name in marks)
              for name in RELIABILITY}
    if not any(counts.values()) and not failed:
        return
    tally = ", ".join(f"{n} {RELIABILITY[name][n != 1]}" for name, n in counts.items())
    outcome = "nothing lost" if not failed else f"{len(failed)} failed"
    terminalreporter.write_line(f"reliability: {tally}; {outcome}")
