"""Candidates compared on the validation split (tools/compare_on_validation.py).

* a comparison file that cannot run (unknown name, bad seeds, bad validation, an override
  the schema refuses) is refused in one line that names it, before any run;
* the shipped comparisons compose, each candidate as `dvc exp run` would build it;
* the table's paired differences and verdicts equal values worked out by hand;
* the runs are read back from a real MLflow store: the newest finished run per (candidate,
  seed), never one of a candidate that has since changed, nor an unfinished one;
* the generated block in docs/search.md names the device, torch build and command.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import REPO

from tools.compare_on_validation import (
    CANDIDATE_TAG,
    COMPARISON_TAG,
    DIGEST_TAG,
    ComparisonError,
    Score,
    comparison_names,
    finished_scores,
    load,
    table,
)

GOOD = """
validation: 1000
seeds: [1, 2, 3]
candidates:
  small: {preset: I3, set: ["model.layers=[{conv:8},{transition:8},{conv:16}]"]}
  I3: {preset: I3, set: []}
"""


def write(tmp_path, name: str, text: str):
    (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


def test_the_shipped_comparisons_compose():
    names = comparison_names()
    assert "I3_layout" in names
    for name in names:
        comparison = load(name)
        assert len({c.digest for c in comparison.candidates}) == len(comparison.candidates)
        for candidate in comparison.candidates:
            assert f"train.validation={comparison.validation}" in candidate.overrides
    layouts = {c.name: c.parameters for c in load("I3_layout").candidates}
    assert layouts["study_layout"] == layouts["I3"] == 14_500


@pytest.mark.parametrize("text, words", [
    (GOOD.replace("[1, 2, 3]", "[1, 1]"), "seeds = [1, 1]: should be a list of distinct"),
    (GOOD.replace("[1, 2, 3]", "[-1]"), "seeds = [-1]"),
    (GOOD.replace("validation: 1000", "validation: 0"), "validation = 0: should be the number"),
    (GOOD.replace("  I3: {preset: I3, set: []}\n", ""), "at least two candidates"),
    (GOOD.replace("set: []", "set: [train.lr=fast]"), "candidate I3: "),
    (GOOD.replace("set: []", "set: [train.nope=1]"), "candidate I3: "),
    (GOOD.replace("preset: I3, set: []", "preset: I9, set: []"), "preset 'I9'"),
    (GOOD.replace("set: []", "set: train.lr=0.1"), "set = 'train.lr=0.1': should be a list"),
])
def test_a_comparison_that_cannot_run_is_refused_naming_it(tmp_path, text, words):
    with pytest.raises(ComparisonError) as err:
        load("mine", write(tmp_path, "mine", text))
    assert words in str(err.value) and "mine.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_unknown_comparison_is_refused_before_any_run():
    out = subprocess.run([sys.executable, "-m", "tools.compare_on_validation", "I9_layout"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "tools.compare_on_validation: error: comparison 'I9_layout' does not exist; "
        f"the comparisons are {', '.join(comparison_names())} (conf/comparisons/)"]


def scores(values: dict[str, list[float]], seeds=(1, 2, 3)) -> list[Score]:
    return [Score(name, seed, value, "cpu: Test CPU (1 thread)", "2.14.1", f"{name}{seed}")
            for name, column in values.items() for seed, value in zip(seeds, column)]


def test_the_table_pairs_each_candidate_with_the_reference_seed_for_seed(tmp_path):
    comparison = load("mine", write(tmp_path, "mine", GOOD))
    # Differences 0.0010, 0.0012, 0.0014: mean 0.12 pt, sd 0.02 pt, standard error
    # 0.02 / sqrt(3) = 0.0115 pt: far beyond two standard errors, so "ahead".
    rows = table(comparison, scores({"small": [0.9900, 0.9900, 0.9900],
                                     "I3": [0.9910, 0.9912, 0.9914]}), "python -m tools.x")
    assert rows[0].startswith("Comparison `mine`") and "cpu: Test CPU (1 thread), torch 2.14.1" in rows[0]
    small, i3 = rows[4], rows[5]
    assert small.endswith("| 99.00% +- 0.00 pt | reference |")
    assert "| 99.10% | 99.12% | 99.14% | 99.12% +- 0.02 pt | +0.12 pt +- 0.01 pt: ahead |" in i3
    # Differences +0.1, -0.1, +0.1 pt: mean 0.033 pt, standard error 0.067 pt: no difference.
    rows = table(comparison, scores({"small": [0.9900, 0.9900, 0.9900],
                                     "I3": [0.9910, 0.9890, 0.9910]}), "python -m tools.x")
    assert rows[5].endswith("| +0.03 pt +- 0.07 pt: no difference |")
    # A gap under half a hundredth of a point prints as +0.00, never -0.00.
    rows = table(comparison, scores({"small": [0.9900, 0.9900, 0.9900],
                                     "I3": [0.9899, 0.9901, 0.99]}), "python -m tools.x")
    assert rows[5].endswith("| +0.00 pt +- 0.01 pt: no difference |")
    # One seed of the reference missing: that seed reads "-", and the pairs are seeds 1 and 2.
    rows = table(comparison, [s for s in scores({"small": [0.99, 0.99, 0.99],
                                                 "I3": [0.98, 0.981, 0.982]}) if s.run_id != "small3"],
                 "python -m tools.x")
    assert "| 99.00% | 99.00% | - |" in rows[4]
    assert rows[5].endswith("| -0.95 pt +- 0.05 pt: behind |")  # -1.0 and -0.9 pt


def test_scores_are_read_back_from_the_runs(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    comparison = load("mine", write(tmp_path, "mine", GOOD))
    small, i3 = comparison.candidates
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("mnist-cnn", artifact_location=str(tmp_path / "art"))

    def logged(candidate, seed: int, accuracy: float, digest=None, status="FINISHED") -> str:
        run = client.create_run(experiment, tags={
            COMPARISON_TAG: "mine", CANDIDATE_TAG: candidate.name,
            DIGEST_TAG: digest or candidate.digest, "device": "cpu: Test CPU (1 thread)",
            "torch_version": "2.14.1"})
        client.log_param(run.info.run_id, "base.seed", str(seed))
        for step, value in enumerate((0.5, accuracy), start=1):  # the last epoch counts
            client.log_metric(run.info.run_id, "val_accuracy", value, step=step)
        client.set_terminated(run.info.run_id, status=status)
        return run.info.run_id

    logged(small, 1, 0.97)
    newest = logged(small, 1, 0.98)
    logged(small, 2, 0.99, digest="an-older-candidate")
    logged(i3, 1, 0.995, status="KILLED")
    logged(i3, 2, 0.996)
    found = {(s.candidate, s.seed): (s.accuracy, s.run_id)
             for s in finished_scores(client, experiment, comparison)}
    assert found == {("small", 1): (0.98, newest), ("I3", 2): (0.996, found["I3", 2][1])}


def test_the_docs_block_names_device_torch_and_command():
    text = (REPO / "docs" / "search.md").read_text()
    block = re.search(r"<!-- validation-I3_layout:begin -->\n(.*?)<!-- validation-I3_layout:end -->",
                      text, re.S)
    assert block, "docs/search.md lacks the validation-I3_layout block"
    first = block[1].splitlines()[0]
    assert re.search(r"on cpu: .+ \(\d+ threads?\)|on NVIDIA ", first), first
    assert re.search(r"torch \d+\.\d+", first), first
    assert "`python -m tools.compare_on_validation I3_layout --report`" in first
    rows = [line for line in block[1].splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == [
        c.name for c in load("I3_layout").candidates]
