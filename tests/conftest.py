"""Shared fixtures: a tiny synthetic MNIST (so tests never need the real download or the
network) and a params factory that starts from the repo's own params.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import mnist

REPO = Path(__file__).resolve().parents[1]


def write_idx(raw_dir: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (uint8 [N, 28, 28]) and labels as the two IDX files torchvision reads."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / f"{prefix}-images-idx3-ubyte").write_bytes(
        mnist.idx_images(images.astype(np.uint8).tobytes(), len(images)))
    (raw_dir / f"{prefix}-labels-idx1-ubyte").write_bytes(
        mnist.idx_labels(labels.astype(np.uint8).tobytes()))


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable stand-in for MNIST: class k is a bright 6x6 blob at one of ten places,
    jittered by a pixel or two, on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        row, col = 3 + 15 * (k // 5), 2 + 5 * (k % 5)
        dr, dc = rng.integers(-1, 2, 2)
        images[i, row + dr: row + dr + 6, col + dc: col + dc + 6] = 230
    return images, labels


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
    """stages.device.configure flushes denormal floats to zero for the whole process (a CPU
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
