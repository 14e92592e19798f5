"""The results table comes from runs only (tools/results_table.py).

* recording a group keeps, per seed, the MLflow run it came from (found in a real sqlite
  store: the newest FINISHED run of the experiment's name whose final test accuracy is the
  one DVC shows), and a repeat without a run is left out, said in one line;
* a group without per-seed records (one typed in) is neither in the table's numbers nor in
  the figure, and a drawn row's numbers are those of its per-seed records;
* `--check` re-derives a recorded row from its runs: a match exits 0; a stored value edited,
  or a run the store lacks, is named on its seed's line and exits non-zero; a preset it
  cannot re-derive is refused in one line.
"""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
from matplotlib.axes import Axes
from mlflow import MlflowClient
from mlflow.entities import Metric

from mnistlab import tracking
from tools import results_table
from tools.repeat_stats import group_stats
from tools.results_table import drawn, group_record, main, record, recorded_repeats, rows

DEVICE = "cpu: AMD EPYC (2 threads)"
TORCH = "2.5.1+cpu"
BASELINE, OTHER_COMMIT = "a" * 40, "b" * 40
# Per-epoch test accuracies: epochs 2 and 3 tie, and the train stage's best epoch is the first.
HISTORY = {"I3-s0": [0.9800, 0.9953, 0.9953], "I3-s1": [0.9810, 0.9940, 0.9961]}
FINAL = {"I3-s0": 0.9953, "I3-s1": 0.9961}
BEST_EPOCH = {"I3-s0": 2, "I3-s1": 3}
# The train stage's `precision` tag: I3-s1 trained under bf16 as `auto` chose; I3-s0's run is
# older than the tag and names only its device.
PRECISION_TAG = {"I3-s1": {"precision": "auto chose bf16: bf16 autocast trained I1's model at 1.41x"}}
DEVICE_SHOWN = {"I3-s0": DEVICE, "I3-s1": f"{DEVICE}, bf16"}
CLAIMS = {"I3": {"source": "README 004", "parameters": 14_500, "final": 0.996,
                 "printed": "99.6%", "rounding": 0.0005},
          "I1": {"source": "README 004", "parameters": 20_978, "final": 0.996,
                 "printed": "99.6%", "rounding": 0.0005}}


def logged_run(client, experiment_id, name, history, final, commit=BASELINE, start=1_000,
               status="FINISHED") -> str:
    """A run as the train and evaluate stages leave it: the tags, each epoch's test
    accuracy and the final model's."""
    run = client.create_run(experiment_id, start_time=start, run_name=name, tags={
        "dvc_exp_name": name, "dvc_exp_baseline_rev": commit, "git_commit": commit,
        "device": DEVICE, "torch_version": TORCH, **PRECISION_TAG.get(name, {})})
    run_id = run.info.run_id
    client.log_batch(run_id, metrics=[Metric("test_accuracy", value, start, epoch)
                                      for epoch, value in enumerate(history, start=1)]
                     + [Metric("final_test_accuracy", final, start, 0)])
    client.set_terminated(run_id, status)
    return run_id


def shown(name: str, final: float) -> dict:
    """One experiment as `experiments()` gives it from `dvc exp show --json`."""
    return {"timestamp": "2025-01-01T00:00:00", "metrics": {
        "reports/metrics.json": {"data": {"test_accuracy": final}},
        "reports/train_metrics.json": {"data": {
            "best_epoch": BEST_EPOCH.get(name, 3), "params": 14_500, "epochs": 3, "device": DEVICE}}}}


def log_runs(client, experiment_id) -> dict[str, str]:
    """Runs of I3-s0 and I3-s1, and newer runs of the same name that are not DVC's I3-s0:
    one from another commit, which ended at another accuracy, and one stopped with the right
    accuracy logged. Returns the right runs' ids."""
    ids = {name: logged_run(client, experiment_id, name, HISTORY[name], FINAL[name])
           for name in ("I3-s0", "I3-s1")}
    logged_run(client, experiment_id, "I3-s0", [0.98, 0.99, 0.9949], 0.9949, OTHER_COMMIT, start=2_000)
    logged_run(client, experiment_id, "I3-s0", HISTORY["I3-s0"], FINAL["I3-s0"], start=3_000,
               status="KILLED")
    return ids


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple:
    """Two sqlite MLflow stores, made once (a new store's tables take seconds): empty.db
    holds the pipeline's experiment only, runs.db also `log_runs`. Returns their folder
    and the runs' ids."""
    home = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/empty.db")
        experiment_id = tracking.connect()
    shutil.copy(home / "empty.db", home / "runs.db")
    ids = log_runs(MlflowClient(f"sqlite:///{home}/runs.db"), experiment_id)
    mlflow.set_tracking_uri(None)
    return home, ids


@pytest.fixture
def store(tmp_path, monkeypatch, stores) -> dict[str, str]:
    """A copy of runs.db in tmp_path, the store mnistlab.tracking points at; the runs' ids."""
    home, ids = stores
    shutil.copy(home / "runs.db", tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield ids
    mlflow.set_tracking_uri(None)


@pytest.fixture
def recorded(store):
    """I3's group of two, recorded from its runs; yields the ledger and the runs' ids."""
    yield record({}, recorded_repeats({name: shown(name, final) for name, final in FINAL.items()})), store


def test_recording_keeps_each_seed_with_the_run_it_came_from(store, capsys):
    ids = store
    found = {**{name: shown(name, final) for name, final in FINAL.items()},
             "I3-s2": shown("I3-s2", 0.9957)}  # no run of it in the store

    ledger = record({}, recorded_repeats(found))

    assert ledger["I3"]["runs"] == [
        {"seed": seed, "final_test_accuracy": FINAL[name], "best_epoch": BEST_EPOCH[name],
         "run_id": ids[name], "device": DEVICE_SHOWN[name], "torch_version": TORCH, "git_commit": BASELINE,
         "dvc_exp_name": name}
        for seed, name in enumerate(("I3-s0", "I3-s1"))]
    stats = group_stats([FINAL["I3-s0"], FINAL["I3-s1"]])
    assert {key: ledger["I3"][key] for key in stats} == stats
    assert ledger["I3"]["best_epoch"] == 2.5
    assert json.loads(json.dumps(ledger)) == ledger  # what reports/results.json holds
    left_out = capsys.readouterr().err.strip().splitlines()
    assert len(left_out) == 1 and left_out[0].startswith(
        "tools.results_table: I3-s2 left out of I3's group: no FINISHED run in sqlite:///"), left_out


def test_a_group_without_per_seed_records_is_not_drawn(tmp_path, monkeypatch):
    """A group typed into the ledger (no per-seed runs) reads like an unrun preset, in the
    table and in the figure; a drawn row's numbers are those of its per-seed records."""
    typed_in = {"n": 3, "mean": 0.9956, "sd": 0.0003, "sem": 0.00017, "min": 0.9953, "max": 0.9959,
                "best_epoch": 9.3, "parameters": 20_978, "epochs": 10, "devices": [DEVICE],
                "note": "as printed in the README's table before this file existed (rounded)"}
    i3 = group_record([results_table.Repeat(seed=seed, final=final, best_epoch=3, parameters=14_500,
                                            epochs=3, device=DEVICE, name=f"I3-s{seed}",
                                            run_id=f"{seed:032x}")
                       for seed, final in enumerate((0.9950, 0.9960, 0.9970))])
    i3["mean"] = 0.9999  # a group-level figure edited by hand is not what the row shows
    ledger = {"I1": typed_in, "I3": i3}

    assert set(drawn(ledger)) == {"I3"}
    _, _, i3_row, i1_row = rows(ledger, CLAIMS, planned=3)
    assert [cell.strip() for cell in i1_row.split("|")[1:-1]] == [
        "I1", "(20,978)", "", "0", "no recorded runs", "", "", "99.6% (README 004)", "", ""]
    assert [cell.strip() for cell in i3_row.split("|")[2:7]] == [
        "14,500", "3", "3", "99.60% +- 0.10 pt", "99.50% to 99.70%"]

    drawn_at = []
    errorbar = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        drawn_at.extend(x if isinstance(x, list) else [x])
        return errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    results_table.plot(ledger, CLAIMS, tmp_path / "results.png")
    assert drawn_at == [14_500]  # I3's point only: I1's typed-in group has none
    assert (tmp_path / "results.png").stat().st_size > 0


def check(tmp_path, monkeypatch, ledger: dict, *presets: str) -> int:
    """`python -m tools.results_table --check PRESETS` with `ledger` as reports/results.json."""
    (tmp_path / "reports").mkdir(exist_ok=True)
    (tmp_path / "reports/results.json").write_text(json.dumps(ledger, indent=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--check", *presets])
    return exit_.value.code


def test_check_re_derives_a_recorded_row_from_its_runs(tmp_path, monkeypatch, capsys, recorded):
    ledger, ids = recorded
    assert check(tmp_path, monkeypatch, ledger, "I3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"I3 seed 0 (I3-s0, run {ids['I3-s0']}): match (final test accuracy 0.9953, best epoch 2)",
        f"I3 seed 1 (I3-s1, run {ids['I3-s1']}): match (final test accuracy 0.9961, best epoch 3)",
        "I3 group statistics: match (n, mean, sd, sem, min, max, best_epoch)",
        f"I3: re-derived: every stored value matches its run in sqlite:///{tmp_path}/mlflow.db"]


@pytest.mark.parametrize("edit, expected", [
    pytest.param(lambda group: group["runs"][1].update(final_test_accuracy=0.9962),
                 "I3 seed 1 (I3-s1, run {I3-s1}): differs: final test accuracy: stored 0.9962, "
                 "run 0.9961", id="a final accuracy"),
    pytest.param(lambda group: group["runs"][0].update(best_epoch=3),
                 "I3 seed 0 (I3-s0, run {I3-s0}): differs: best epoch: stored 3, run 2",
                 id="a best epoch"),
    pytest.param(lambda group: group.update(mean=0.9958),
                 "I3 group statistics: differ: mean: stored 0.9958, from the runs 0.9957",
                 id="the group's mean"),
    pytest.param(lambda group: group["runs"][1].update(run_id="0" * 32),
                 "I3 seed 1 (I3-s1, run 00000000000000000000000000000000): run not in this store",
                 id="a run id"),
])
def test_check_names_a_stored_value_its_run_does_not_give(tmp_path, monkeypatch, capsys, recorded,
                                                          edit, expected):
    ledger, ids = recorded
    edit(ledger["I3"])
    assert check(tmp_path, monkeypatch, ledger, "I3") == 1
    lines = capsys.readouterr().out.splitlines()
    assert expected.format(**ids) in lines, lines
    assert lines[-1] == f"I3: NOT re-derived from sqlite:///{tmp_path}/mlflow.db: see the lines above"


def test_check_against_a_store_without_the_runs_fails(tmp_path, monkeypatch, capsys, stores, recorded):
    """Another clone's store (here, one without runs) has none of the recorded runs."""
    ledger, ids = recorded
    shutil.copy(stores[0] / "empty.db", tmp_path / "elsewhere.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    assert check(tmp_path, monkeypatch, ledger, "I3") == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"I3 seed {seed} (I3-s{seed}, run {ids[f'I3-s{seed}']}): run not in this store"
                         for seed in (0, 1)]
    assert lines[-1].startswith("I3: NOT re-derived from sqlite:///")


@pytest.mark.bad_input
@pytest.mark.parametrize("presets, message", [
    (["I9"], "tools.results_table: error: --check 'I9': no such preset in reports/results.json; "
             "the presets with recorded runs are I3\n"),
    (["I3", "I1"], "tools.results_table: error: --check 'I1': its group in reports/results.json has "
                   "no per-seed runs to re-derive; the presets with recorded runs are I3\n"),
])
def test_check_refuses_a_preset_it_cannot_re_derive(tmp_path, monkeypatch, capsys, presets, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    i3 = group_record([results_table.Repeat(seed=0, final=0.995, best_epoch=3, parameters=14_500,
                                            epochs=3, device=DEVICE, name="I3-s0", run_id="0" * 32)])
    ledger = {"I3": i3, "I1": {"n": 3, "mean": 0.9956, "note": "typed in"}}
    assert check(tmp_path, monkeypatch, ledger, *presets) == 2
    assert capsys.readouterr().err == message
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was opened


@pytest.mark.parametrize("tag, shown", [
    ("auto chose bf16: bf16 autocast trained I1's model at 1.41x fp32's speed", f"{DEVICE}, bf16"),
    ("auto chose fp32: the rule for cuda", f"{DEVICE}, fp32"),
    ("bf16: set by train.precision", f"{DEVICE}, bf16"),
    (None, DEVICE),
    ("something else", DEVICE),
])
def test_the_device_names_the_precision_the_run_trained_in(tag, shown):
    assert results_table.with_precision(DEVICE, tag) == shown
