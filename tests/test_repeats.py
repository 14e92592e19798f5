"""Repeated presets (tools/repeats.py) and the statistics of the results table
(tools/results_table.py).

* bad REPEATS, JOBS or preset names are refused in one line before anything is queued;
* aggregates, the table's mean and standard deviation and its verdicts equal values worked
  out by hand, and MLflow's aggregates equal the table's to the last digit;
* an MLflow group with a missing repeat closes incomplete, keeping what finished;
* end to end on tiny data: 2 presets x 2 random seeds give 4 child runs under 2 parents
  whose aggregates are exactly those of their children, and a rerun of one preset
  supersedes its group without touching the other.
"""

from __future__ import annotations

import json
import math
import re
import signal
import statistics
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient
from helpers import BIN, REPO, run, tiny_project

from tools.repeat_stats import group_stats
from tools.repeats import (
    MEMBERS_TAG,
    PARENT_TAG,
    aggregate,
    close_group,
    finished_repeats,
    open_group,
    presets_git_lacks,
    reopen_group,
    run_experiments,
)
from tools.results_table import (
    Repeat,
    changed_since,
    group_record,
    preset_digest,
    printed_figure,
    record,
    rows,
    summarize,
    verdict,
)
from tools.team import alive

# --- bad input ---------------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--repeats", "0", "I1"], "tools.repeats: error: REPEATS='0': should be a whole number of at least 1"),
    (["--repeats", "three", "I1"], "tools.repeats: error: REPEATS='three': should be a whole number"),
    (["--repeats", "-2", "I1"], "tools.repeats: error: REPEATS='-2': should be a whole number"),
    (["--jobs", "0", "I1"], "tools.repeats: error: JOBS='0': should be a whole number of at least 1"),
    (["I1", "I9"], "tools.repeats: error: preset 'I9' does not exist; the presets are I0, I1, I2, I3, "
                   "readme000"),
    (["../conf/config"], "tools.repeats: error: preset '../conf/config' does not exist"),
    (["--set", "train.epochs", "I1"], "tools.repeats: error: --set 'train.epochs': should be KEY=VALUE"),
])
def test_bad_arguments_are_refused_before_anything_is_queued(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "tools.repeats", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": str(BIN), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "m.db").exists()  # not even the tracking store was opened


def at_most_2_gib() -> None:
    """In the child: a cap on its memory, so that a REPEATS it tried to honour ends in a
    MemoryError within seconds rather than in swapping the whole machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--repeats", "99999999999999999999", "I1"], "REPEATS='99999999999999999999': should be a whole "
                                                  "number of at least 1 and at most 1000"),
    (["--repeats", "1001", "I1"], "REPEATS='1001': should be a whole number of at least 1 and at most 1000"),
    (["--jobs", "65", "I1"], "JOBS='65': should be a whole number of at least 1 and at most 64"),
    (["--jobs", "9" * 5000, "I1"], "JOBS='999999999999999999999999999...9999999999999999999999999999': "
                                   "should be a whole number of at least 1 and at most 64"),
    (["--repeats", "\u00b2", "I1"], "REPEATS='\u00b2': should be a whole number"),  # '²'.isdigit()
])
def test_too_many_repeats_or_jobs_are_refused_before_any_work(tmp_path, args, message):
    """A REPEATS of 10^20 once built its list of experiment names until memory ran out."""
    # A tracking store that cannot open: were the values let through, the tool would stop
    # there, before running a single experiment in the repo.
    (tmp_path / "a-file").write_text("")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tools.repeats", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60, preexec_fn=at_most_2_gib,
                            env={"PATH": str(BIN), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/a-file/m.db"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"tools.repeats: error: {message}"), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert time.monotonic() - started < 30


@pytest.mark.bad_input
def test_a_preset_git_does_not_know_is_refused_before_anything_is_queued(tmp_path, monkeypatch):
    """`make search` writes its winner as a new, untracked file; DVC's temporary copies leave
    untracked files out, so each repeat would fail at validate. One line says what to do."""
    presets = tmp_path / "conf/preset"
    presets.mkdir(parents=True)
    (presets / "I1.yaml").write_text("# @package _global_\n")
    (presets / "search8000.yaml").write_text("# @package _global_\n")
    run(["git", "init", "-q"], tmp_path)
    run(["git", "add", "conf/preset/I1.yaml"], tmp_path)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    result = subprocess.run([sys.executable, "-m", "tools.repeats", "I1", "search8000"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr == (
        "tools.repeats: error: preset 'search8000': conf/preset/search8000.yaml is not in git, "
        "and each `dvc exp run --temp` copies only the files git knows; "
        "`git add conf/preset/search8000.yaml` first\n")
    assert not (tmp_path / "m.db").exists()
    run(["git", "add", "conf/preset/search8000.yaml"], tmp_path)  # staged is enough for DVC
    monkeypatch.chdir(tmp_path)
    assert presets_git_lacks(["I1", "search8000"]) == []


# --- statistics worked out by hand ------------------------------------------------------------


def test_aggregate_of_known_values():
    stats = aggregate([0.9950, 0.9960, 0.9970])
    assert stats["n_runs"] == 3
    assert stats["final_test_accuracy_mean"] == pytest.approx(0.9960, abs=1e-12)
    assert stats["final_test_accuracy_std"] == pytest.approx(0.0010, abs=1e-12)
    assert (stats["final_test_accuracy_min"], stats["final_test_accuracy_max"]) == (0.9950, 0.9970)
    assert aggregate([0.99])["final_test_accuracy_std"] == 0.0
    assert aggregate([]) == {"n_runs": 0}


def repeats(*finals: float, best_epochs=None) -> list[Repeat]:
    best_epochs = best_epochs or [10] * len(finals)
    return [Repeat(seed=i, final=f, best_epoch=b, parameters=14_500, epochs=15, device="cpu",
                   name=f"I3-s{i}", run_id=f"{i:032x}")
            for i, (f, b) in enumerate(zip(finals, best_epochs))]


def test_summary_mean_sd_and_sem_of_hand_made_runs():
    stats = summarize(repeats(0.9940, 0.9950, 0.9966, best_epochs=[9, 12, 15]))
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.9952, abs=1e-12)
    # deviations -12, -2, +14 (in 1e-4): sum of squares 344e-8, / (n - 1) = 172e-8
    assert stats["sd"] == pytest.approx(math.sqrt(172e-8), rel=1e-9)
    assert stats["sem"] == pytest.approx(math.sqrt(172e-8) / math.sqrt(3), rel=1e-9)
    assert (stats["min"], stats["max"], stats["best_epoch"]) == (0.9940, 0.9966, 12)


def test_mlflow_groups_and_the_table_give_the_same_numbers_to_the_last_digit():
    """A group's n, mean, sd and min to max are computed once (tools.repeat_stats): what
    tools.repeats logs to MLflow's parent run and what the results table prints agree
    exactly, and the standard error is sd / sqrt(n); one run has no spread."""
    for finals in ([0.9941, 0.9957, 0.9962, 0.9938, 0.9949], [0.9950, 0.9960], [0.9913]):
        shared = group_stats(finals)
        assert shared["mean"] == statistics.fmean(finals)
        assert shared["sd"] == (statistics.stdev(finals) if len(finals) > 1 else None)
        assert shared["sem"] == (shared["sd"] / math.sqrt(len(finals)) if shared["sd"] else None)
        table = summarize(repeats(*finals))
        assert {key: table[key] for key in shared} == shared
        logged = aggregate(finals)
        assert logged == {"n_runs": shared["n"], "final_test_accuracy_mean": shared["mean"],
                          "final_test_accuracy_std": shared["sd"] or 0.0,
                          "final_test_accuracy_min": shared["min"],
                          "final_test_accuracy_max": shared["max"]}
    with pytest.raises(ValueError, match="at least one"):
        group_stats([])


@pytest.mark.parametrize("finals, target, rounding, expected", [
    ((0.9950, 0.9960, 0.9970), 0.996, 0.0, "reproduced"),           # mean == target
    # 0.05 pt under, SE 0.058: no difference
    ((0.9945, 0.9955, 0.9965), 0.996, 0.0, "no difference: 0.05 pt under (0.9 SE)"),
    ((0.9930, 0.9935, 0.9940), 0.996, 0.0, "short: 0.25 pt under (8.7 SE)"),
    # "99.6%" printed with one decimal reaches down to 99.55%: a mean of 99.56% reaches it
    ((0.9953, 0.9956, 0.9959), 0.996, 0.0005, "reproduced"),
    # 0.06 pt under 99.55%, SE 0.006: short, and said to be under the rounding
    ((0.9948, 0.9949, 0.9950), 0.996, 0.0005, "short: 0.06 pt under its rounding (10.4 SE)"),
    ((0.9950,), 0.996, 0.0, "no verdict (n < 2)"),
])
def test_verdict_rule(finals, target, rounding, expected):
    assert verdict(summarize(repeats(*finals)), target, rounding) == expected


def test_a_target_is_met_only_at_or_above_it():
    assert verdict(summarize(repeats(0.9950, 0.9951, 0.9952)), 0.995, is_target=True) == "met"
    assert verdict(summarize(repeats(0.9945, 0.9950, 0.9955)), 0.995, is_target=True) == "met"
    # 0.02 pt under, SE 0.03: not met, not shown short either
    assert verdict(summarize(repeats(0.9943, 0.9948, 0.9953)), 0.995, is_target=True) == \
        "no difference from the target: 0.02 pt under (0.7 SE)"


@pytest.mark.parametrize("printed, value, rounding", [
    ("99.6%", 0.996, 0.0005), ("98.0%", 0.980, 0.0005), ("99.24%", 0.9924, 0.00005),
    (">99.4%", 0.994, 0.0), ("100%", 1.0, 0.005),
])
def test_a_printed_figure_keeps_its_rounding(printed, value, rounding):
    assert printed_figure(printed) == (pytest.approx(value, abs=1e-12), pytest.approx(rounding, abs=1e-12))


@pytest.mark.parametrize("bad", ["0.996", "99,6%", "about 99.6%", ""])
def test_a_figure_not_written_as_printed_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        printed_figure(bad)


def test_every_reported_figure_reads():
    from tools.results_table import reported
    figures = reported()
    assert figures["I3"]["printed"] == "99.6%" and figures["I3"]["rounding"] == pytest.approx(0.0005)
    assert figures["readme002"]["rounding"] == 0.0  # "above 99.4%" is a bound


def test_table_marks_short_groups_incomplete_and_unrun_presets():
    claims = {"I3": {"source": "README 004", "parameters": 14_500, "final": 0.996,
                     "printed": "99.6%", "rounding": 0.0005},
              "I1": {"source": "README 004", "parameters": 20_978, "final": 0.996,
                     "printed": "99.6%", "rounding": 0.0005}}
    header, _, i3, i1 = rows({"I3": group_record(repeats(0.9950, 0.9960))}, claims, planned=3)
    cells = [cell.strip() for cell in i3.split("|")[1:-1]]
    assert cells[:6] == ["I3", "14,500", "15", "2 of 3 (incomplete)", "99.55% +- 0.07 pt",
                         "99.50% to 99.60%"]
    assert "no recorded runs" in i1 and header.startswith("| preset |")


def test_recording_a_group_replaces_that_presets_group_only():
    ledger = {"I1": {**summarize(repeats(0.9950, 0.9960)), "digest": "from another clone"},
              "I3": summarize(repeats(0.9940, 0.9941))}
    recorded = record(ledger, {"I3": repeats(0.9950, 0.9960, 0.9970)})
    assert recorded["I1"] == ledger["I1"]  # run elsewhere, kept as it was
    assert (recorded["I3"]["n"], recorded["I3"]["mean"]) == (3, pytest.approx(0.996, abs=1e-12))
    assert recorded["I3"]["digest"] == preset_digest("I3")
    assert json.loads(json.dumps(recorded)) == recorded  # what reports/results.json holds


def test_a_row_says_when_its_preset_changed_since_the_runs():
    ledger = record({}, {"I3": repeats(0.9950, 0.9960, 0.9970)})
    ledger["I1"] = {**group_record(repeats(0.9950, 0.9960)), "digest": preset_digest("I3")}
    ledger["gone"] = {**group_record(repeats(0.9950, 0.9960)), "digest": "no such preset now"}
    assert changed_since(ledger) == {"I1", "gone"}
    claims = {name: {"source": "README 004", "parameters": 14_500, "final": 0.996,
                     "printed": "99.6%", "rounding": 0.0005} for name in ("I3", "I1")}
    _, _, i3, i1 = rows(ledger, claims, planned=3, changed=changed_since(ledger))
    assert "changed since" not in i3
    assert "2 of 3 (incomplete)" in i1 and "the preset has changed since these runs" in i1


# --- MLflow groups, by hand -------------------------------------------------------------------


def test_group_with_a_missing_repeat_closes_incomplete(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("mnist-cnn")
    parent = open_group(client, experiment_id, "I3", ["I3-s0", "I3-s1", "I3-s2"])
    for name, status, accuracy in (("I3-s0", "FINISHED", 0.995), ("I3-s1", "FAILED", None),
                                   ("I3-s0", "FINISHED", 0.997)):  # s0 rerun: its last counts
        child = client.create_run(experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent, "dvc_exp_name": name})
        if accuracy is not None:
            client.log_metric(child.info.run_id, "final_test_accuracy", accuracy)
        client.set_terminated(child.info.run_id, status)
    stats = close_group(client, experiment_id, parent)
    assert (stats["n_runs"], stats["complete"], stats["planned"]) == (1, False, 3)
    run_ = client.get_run(parent)
    assert run_.info.status == "FINISHED" and run_.data.tags["complete"] == "false"
    assert run_.data.metrics["final_test_accuracy_mean"] == 0.997


def test_a_new_group_supersedes_its_presets_earlier_group_only(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("mnist-cnn")
    first_i1 = open_group(client, experiment_id, "I1", ["I1-s0", "I1-s1"])
    close_group(client, experiment_id, first_i1)
    i3 = open_group(client, experiment_id, "I3", ["I3-s0"])  # left open: a machine stopped
    unclosed_i1 = open_group(client, experiment_id, "I1", ["I1-s0"])
    second_i1 = open_group(client, experiment_id, "I1", ["I1-s0"])
    tags = {run_id: client.get_run(run_id).data.tags for run_id in (first_i1, unclosed_i1, i3)}
    assert tags[first_i1]["superseded_by"] == unclosed_i1  # the first supersession stays
    assert tags[unclosed_i1]["superseded_by"] == second_i1
    assert client.get_run(unclosed_i1).info.status == "KILLED"
    assert "superseded_by" not in tags[i3] and client.get_run(i3).info.status == "RUNNING"


def test_resume_reopens_the_group_and_runs_only_the_missing_repeats(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("mnist-cnn")
    members = ["I3-s0", "I3-s1", "I3-s2"]
    parent = open_group(client, experiment_id, "I3", members)
    for name, accuracy in (("I3-s0", 0.995), ("I3-s2", 0.993)):
        child = client.create_run(experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent, "dvc_exp_name": name})
        client.log_metric(child.info.run_id, "final_test_accuracy", accuracy)
        client.set_terminated(child.info.run_id, "FINISHED")
    assert close_group(client, experiment_id, parent)["complete"] is False

    assert reopen_group(client, experiment_id, "I3", members) == parent
    assert client.get_run(parent).info.status == "RUNNING"  # children join it again
    assert sorted(finished_repeats(client, experiment_id, parent)) == ["I3-s0", "I3-s2"]
    with pytest.raises(SystemExit, match="planned 3 repeats .* not 2"):
        reopen_group(client, experiment_id, "I3", members[:2])
    assert reopen_group(client, experiment_id, "I1", ["I1-s0"]) is None  # no group yet


@pytest.mark.interruption
def test_a_stop_reaches_the_stage_under_dvc(tmp_path):
    """`dvc exp run` does not pass SIGTERM on to the stage it runs: stopping the repeats
    must stop the whole tree, or a training run goes on alone after its group closed."""
    pid_file = tmp_path / "stage.pid"
    # Stands for `dvc exp run`: a parent that starts a long child (the stage) and waits.
    parent = ("import subprocess, sys; stage = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(stage.pid)); stage.wait()")

    def stop(_signum, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiments({"I1-s0": [sys.executable, "-c", parent]}, jobs=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    stage = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(stage):
        time.sleep(0.1)
    assert not alive(stage), "the stage outlived the stopped repeats"


# --- end to end: 2 presets x 2 random seeds on tiny data --------------------------------------


def experiment_names(node) -> list[str]:
    """Every experiment name in `dvc exp show --json` output."""
    if isinstance(node, dict):
        return ([node["name"]] if node.get("name") else []) + [
            name for value in node.values() for name in experiment_names(value)]
    if isinstance(node, list):
        return [name for value in node for name in experiment_names(value)]
    return []


@pytest.mark.slow
def test_two_presets_two_seeds_make_two_groups_of_two(tmp_path):
    project = tiny_project(tmp_path / "project")
    tiny = ["--set", "train.epochs=1", "--set", "train.lr=0.05", "--set", "train.batch_size=128"]
    # All four at once, each in its own temporary copy: they take turns at DVC's repo lock
    # (without waiting for it, all but one would fail at the start).
    run([str(BIN / "python"), "-m", "tools.repeats", "--repeats", "2", "--jobs", "4", *tiny,
         "I1", "I3"], project)
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], project).stdout)
    assert {f"{p}-s{seed}" for p in ("I1", "I3") for seed in (0, 1)} <= set(experiment_names(shown))

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-cnn")
    parents = {run_.info.run_name: run_ for run_ in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{PARENT_TAG} != ''")}
    assert sorted(parents) == ["I1", "I3"]
    child_ids = set()
    for preset, parent in parents.items():
        assert json.loads(parent.data.tags[MEMBERS_TAG]) == [f"{preset}-s0", f"{preset}-s1"]
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(child.info.run_name for child in children) == [f"{preset}-s0", f"{preset}-s1"]
        assert {child.data.params["base.seed"] for child in children} == {"0", "1"}
        finals = [child.data.metrics["final_test_accuracy"] for child in children]
        child_ids |= {child.info.run_id for child in children}
        assert parent.data.metrics["n_runs"] == 2 and parent.data.tags["complete"] == "true"
        assert parent.data.metrics["final_test_accuracy_mean"] == statistics.fmean(finals)
        assert parent.data.metrics["final_test_accuracy_std"] == statistics.stdev(finals)

    # The table reads the same four experiments from DVC, records each with its MLflow run,
    # and re-derives both rows from those runs.
    table = run([str(BIN / "python"), "-m", "tools.results_table", "--repeats", "2", "--readme"],
                project).stdout
    assert [line.split("|")[4].strip() for line in table.splitlines()
            if line.startswith(("| I1 ", "| I3 "))] == ["2", "2"]
    ledger = json.loads((project / "reports/results.json").read_text())
    assert {seed["run_id"] for preset in ("I1", "I3") for seed in ledger[preset]["runs"]} == child_ids
    checked = run([str(BIN / "python"), "-m", "tools.results_table", "--check", "I1", "I3"],
                  project).stdout  # exit status 0: every value matches
    assert checked.count(": match (final test accuracy ") == 4, checked  # one per seed
    assert "I1: re-derived" in checked and "I3: re-derived" in checked, checked
    # (A rerun superseding a group: test_a_new_group_supersedes_its_presets_earlier_group_only.)
    mlflow.set_tracking_uri(None)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"mlflow.parentRunId": 7}'])
def test_run_tags_from_the_environment_that_are_not_string_tags_are_refused(monkeypatch, value):
    """The train stage reads the repeats' grouping (and any caller's tags) from
    PIPELINE_RUN_TAGS; a malformed value is refused naming it, before a run is opened."""
    from mnistlab import tracking

    monkeypatch.setenv(tracking.RUN_TAGS_ENV, value)
    with pytest.raises(tracking.TrackingError, match=re.escape(f"{tracking.RUN_TAGS_ENV}={value!r}")):
        tracking.caller_tags()


def test_run_tags_from_the_environment_reach_the_run_tags(monkeypatch):
    from mnistlab import tracking

    monkeypatch.setenv(tracking.RUN_TAGS_ENV, json.dumps({"mlflow.parentRunId": "abc"}))
    assert tracking.run_tags("cpu")["mlflow.parentRunId"] == "abc"
    monkeypatch.delenv(tracking.RUN_TAGS_ENV)
    assert "mlflow.parentRunId" not in tracking.run_tags("cpu")
