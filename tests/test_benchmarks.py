"""The benchmark commands measure what they claim, without touching the project's files."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import overheads, same_recipe
from stages.data import load_split
from stages.params import parse_params


def test_bookkeeping_timing_uses_a_throwaway_store(tmp_path, monkeypatch):
    project_store = tmp_path / "project.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project_store}")
    seconds = overheads.time_bookkeeping(epochs=2)
    assert set(seconds) == {"MLflow log_metrics", "checkpoint", "curves CSV", overheads.ASYNC}
    assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
    assert not project_store.exists()  # the user's store is neither created nor written
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{project_store}"


@pytest.mark.slow
@pytest.mark.parametrize("path", same_recipe.PATHS)
def test_both_training_paths_learn_the_same_recipe(path, tiny_mnist, default_params):
    """Each path trains the synthetic digits well past chance (10 %) with the same recipe."""
    raw = dict(default_params)
    raw["train"] = {**default_params["train"], "device": "cpu", "precision": "fp32",
                    "batch_size": 64, "lr": 0.05, "epochs": 3}
    params = parse_params(raw)
    train = load_split(train=True, root=tiny_mnist)
    test = load_split(train=False, root=tiny_mnist)
    accuracy, seconds = same_recipe.train_and_score(
        path, params, torch.device("cpu"), torch.float32, seed=0, train=train, test=test,
        workers=0, root=tiny_mnist)
    assert accuracy > 0.8 and seconds > 0
