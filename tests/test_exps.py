"""`make exps`: one row per experiment, the params set on top of its preset, within 120 columns."""

from __future__ import annotations

import pytest
from helpers import REPO

from tools import exps


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # presets are composed from ./conf, as `make exps` runs


def row(name: str, preset: str, seed: float, **values) -> dict:
    """A row as `dvc.api.exp_show` gives it: numbers as floats, "!" where there is no value."""
    composed = exps.preset_params(preset)
    return {"Experiment": name, "rev": "abc1234", "State": None, **composed,
            "base.preset": preset, "base.seed": seed, "test_accuracy": "!", "params": "!",
            "train_seconds": "!", **values}


def test_a_row_names_what_was_set_on_top_of_its_preset():
    rows = [row("quick-gap", "I1", 42.0, **{"model.head": "gap", "train.epochs": 1.0},
                test_accuracy=0.9874, params=11378.0, train_seconds=21.4),
            row("I3-s1", "I3", 1.0, test_accuracy=0.9957, params=14500.0, train_seconds=900.0),
            row("queued", "I1", 42.0, State="Queued", **{"train.lr": 0.01})]

    lines = exps.table(rows)

    assert lines[0].split()[:3] == ["experiment", "state", "preset"]
    gap, i3, queued = lines[1:]
    assert gap.split()[:6] == ["quick-gap", "I1", "42", "98.74%", "11,378", "21"], gap
    assert gap.endswith("model.head=gap train.epochs=1"), gap
    assert i3.split() == ["I3-s1", "I3", "1", "99.57%", "14,500", "900"], i3  # nothing set on top
    assert queued.split() == ["queued", "Queued", "I1", "42", "-", "-", "-", "train.lr=0.01"]


def test_no_line_is_wider_than_asked():
    many = {f"train.augment.{key}": value for key, value in
            (("degrees", 3.0), ("translate", 0.2), ("shear", 7.0))}
    rows = [row(f"experiment-with-a-long-name-{i}", "readme003", float(i), **many,
                **{"train.lr": 0.123456, "train.batch_size": 512.0, "model.head": "gap"})
            for i in range(3)]
    for width in (120, 80, 60):
        assert max(map(len, exps.table(rows, width))) <= width
    line = exps.table(rows)[1]  # what is set does not fit: cut, and the cut is shown
    assert len(line) == 120 and "train.augment.degrees=3 " in line and line.endswith("…"), line


def test_an_unknown_preset_lists_nothing_as_set():
    assert exps.differing({"base.preset": "gone", "train.lr": 0.5}, ["train.lr"]) == ""
