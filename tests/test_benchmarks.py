"""The benchmark commands measure what they claim, without touching the project's files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from benchmarks import (
    common,
    overheads,
    profile_step,
    same_recipe,
    train_throughput,
)
from mnistlab.data import load_split
from mnistlab.runtime import cpu_model, describe, keep_freed_memory
from mnistlab.config import parse_params
from tools import results_table


def test_bookkeeping_timing_uses_a_throwaway_store(tmp_path, monkeypatch):
    project_store = tmp_path / "project.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project_store}")
    seconds = overheads.time_bookkeeping(epochs=2)
    assert set(seconds) == {overheads.SYNC, "checkpoint", "curves CSV", overheads.QUEUED,
                            overheads.QUEUE_END}
    per_run = seconds.pop(overheads.QUEUE_END)
    assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
    assert len(per_run) == 1 and per_run[0] > 0
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
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)
    test = load_split(train=False, root=tiny_mnist, verify_md5=False)
    accuracy, seconds = same_recipe.train_and_score(
        path, params, torch.device("cpu"), torch.float32, seed=0, train=train, test=test,
        workers=0, root=tiny_mnist)
    assert accuracy > 0.8 and seconds > 0


def test_compile_lever_trains_the_compiled_model(tiny_mnist, default_params, monkeypatch):
    """`--compile` times the torch.compile'd model, not the plain one (the spy stands in
    for compiling, which takes most of a minute on a CPU)."""
    compiled = []

    class Wrapper(torch.nn.Module):  # what torch.compile returns: a module around the model
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, images):
            compiled.append(len(images))
            return self.inner(images)

    def spy(model):
        compiled.clear()
        return Wrapper(model)

    monkeypatch.setattr(train_throughput.torch, "compile", spy)
    raw = dict(default_params)
    raw["train"] = {**default_params["train"], "batch_size": 32}
    params = parse_params(raw)
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)
    result = train_throughput.project_way(params, torch.device("cpu"), train, steps=4,
                                          dtype=torch.float32, compile_model=True)
    assert compiled == [32] * 7  # 3 warm-up and 4 timed steps, all through the wrapper
    assert result["images_per_second"] > 0
    assert result["warmup_seconds"] > 0


def test_keeping_freed_memory_applies_on_linux_glibc():
    """The allocator setting the stages rely on for CPU speed is really accepted here."""
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory() is True


def test_each_cpu_attempt_changes_its_setting_only_inside_its_row():
    """The `--attempts` rows measure what they name, and leave the next row as the stage runs."""
    if not torch.set_flush_denormal(True):  # as mnistlab.runtime.configure sets it on the CPU
        pytest.skip("this CPU cannot flush denormals")
    smallest_normal = torch.finfo(torch.float32).tiny
    with train_throughput.CPU_ATTEMPTS["project, fp32, denormals not flushed"]():
        assert (torch.tensor([smallest_normal]) / 4).item() > 0
    assert (torch.tensor([smallest_normal]) / 4).item() == 0
    enabled = torch.backends.mkldnn.enabled
    with train_throughput.CPU_ATTEMPTS["project, fp32, oneDNN off"]():
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == enabled


def test_step_profile_names_where_the_time_goes(tiny_mnist, default_params):
    raw = dict(default_params)
    raw["train"] = {**default_params["train"], "batch_size": 32}
    params = parse_params(raw)
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)
    seconds = profile_step.profile_steps(params, torch.device("cpu"), train, steps=4,
                                         dtype=torch.float32)
    # I1 has convolutions, BatchNorm, dropout, pooling and ReLU: each shows up with time.
    for kind in ("convolutions (forward + backward)", "BatchNorm (forward + backward)",
                 "dropout masks (random draws)", "max pooling (forward + backward)",
                 "ReLU (forward + backward)", "augmentation (batched affine warps)"):
        assert seconds[kind] > 0, kind
    assert profile_step.kind_of("aten::convolution_backward") == "convolutions (forward + backward)"
    assert profile_step.kind_of("aten::add_") == profile_step.OTHER


@pytest.mark.parametrize("seconds, precision, expected", [
    (41.7, {"precision": "bf16"}, "99.4% test accuracy first reached after epoch 3, 42 s on cpu, bf16."),
    (None, {"precision": "fp32"}, "99.4% test accuracy never reached on cpu, fp32."),
    (None, {}, "99.4% test accuracy never reached on cpu."),  # written before it was recorded
])
def test_default_run_line_reports_time_to_target_and_precision(tmp_path, monkeypatch, seconds,
                                                                precision, expected):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "train_metrics.json").write_text(json.dumps({
        "best_test_accuracy": 0.995, "best_epoch": 10,
        "epochs": 10, "params": 20978, "train_seconds": 120.0, "epoch_images_per_second": 5000,
        "epoch_to_target": 3 if seconds else None, "seconds_to_target": seconds,
        "target_accuracy": 0.994, "device": "cpu", **precision}))
    (reports / "metrics.json").write_text(json.dumps({"test_accuracy": 0.995, "test_errors": 50}))
    (reports / "model_report.json").write_text(json.dumps({"preset": "default"}))
    monkeypatch.chdir(tmp_path)
    [line] = results_table.default_run()
    assert expected in line


def test_the_experiment_split_accounts_for_every_second(tmp_path):
    """The stages' phases plus DVC's share add up to the wall clock, and the fixed cost is
    everything but the training loop and the test pass."""
    from benchmarks import experiment_time

    timeline = tmp_path / "timeline.jsonl"
    phases = [("train", "start-up and imports", 100.0, 104.0),
              ("train", experiment_time.LOOP_PHASES[0], 104.0, 110.0),
              ("train", "MLflow log_model", 110.0, 112.0)]
    timeline.write_text("".join(json.dumps({"stage": stage, "phase": phase, "start": start,
                                            "end": end}) + "\n"
                                for stage, phase, start, end in phases))
    rows = experiment_time.split(timeline, wall=15.0)
    assert [seconds for *_, seconds in rows] == [4.0, 6.0, 2.0, 3.0]  # DVC's: 15 - 12
    summary = experiment_time.table(rows, 15.0, "heading")[-1]
    assert summary == ("Whole `dvc exp run`: 15.0 s; training loop and test pass 6.0 s; "
                       "fixed cost 9.0 s; whole / loop = 2.5x.")


def write_timeline(path: Path, phases: list[tuple[str, str, float, float]]) -> Path:
    """A timeline as the stages write it (mnistlab/timing.py): one JSON line per phase."""
    path.write_text("".join(json.dumps({"stage": stage, "phase": phase, "start": start,
                                        "end": end}) + "\n"
                            for stage, phase, start, end in phases))
    return path


@pytest.mark.parametrize("argv, allowed", [
    (["--repeats", "0"], "from 1 to 20"),
    (["--repeats", "21"], "from 1 to 20"),
    (["--repeats", "2.5"], "from 1 to 20"),
    (["--baseline", "no-such-revision"], "not a commit git knows"),
    (["--baseline", "HEAD", "--baseline", "no-such-revision"], "not a commit git knows"),
    (["--baseline", "HEAD", "--repeats", "three"], "from 1 to 20"),
])
def test_a_bad_repeats_or_baseline_is_refused_in_one_line_before_any_run(
        argv, allowed, monkeypatch, capsys):
    from benchmarks import experiment_time

    def no_run(*args, **kwargs):
        raise AssertionError("an experiment ran before the arguments were checked")

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(experiment_time, "run_experiment", no_run)
    monkeypatch.setattr(experiment_time, "measure", no_run)
    with pytest.raises(SystemExit) as refused:
        experiment_time.main(argv)
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert repr(argv[-1]) in error and allowed in error


def test_a_good_baseline_and_repeats_are_taken_with_the_commit_they_name(monkeypatch):
    from benchmarks import experiment_time

    monkeypatch.chdir(REPO)
    args = experiment_time.parse_args(["--baseline", "HEAD", "--repeats", "20"])
    [baseline] = args.baseline
    assert args.repeats == 20 and baseline.name == "HEAD"
    assert re.fullmatch(r"[0-9a-f]{40}", baseline.commit)
    assert experiment_time.parse_args([]).baseline == []


def test_several_baselines_are_kept_in_the_order_given_with_their_commits(monkeypatch):
    """A series of changes: each --baseline names the commit before one of them."""
    from benchmarks import experiment_time

    monkeypatch.chdir(REPO)
    args = experiment_time.parse_args(["--baseline", "HEAD~1", "--baseline", "HEAD"])
    commits = subprocess.run(["git", "rev-parse", "HEAD~1", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert args.baseline == [experiment_time.Revision("HEAD~1", commits[0]),
                             experiment_time.Revision("HEAD", commits[1])]


def test_before_and_after_are_medians_and_the_ratio_of_their_fixed_costs(tmp_path):
    """Each side's figures are medians over its runs, so one noisy run (the current side's
    40 s) does not decide; the fixed cost is the whole run less the training loop and the
    test pass, and the phase table's last line says the same."""
    from benchmarks import experiment_time

    loop, test = experiment_time.LOOP_PHASES

    def runs(side: str, timings: list[tuple[float, float, float]]) -> list:
        """One run per (wall, loop seconds, test seconds): 2 s of imports, then the loop,
        then the test pass; the rest of the wall clock is DVC's."""
        made = []
        for number, (wall, train_s, test_s) in enumerate(timings):
            timeline = write_timeline(tmp_path / f"{side}-{number}.jsonl", [
                ("train", "start-up and imports", 0.0, 2.0),
                ("train", loop, 2.0, 2.0 + train_s),
                ("evaluate", test, 10.0, 10.0 + test_s)])
            made.append(experiment_time.Run(wall, experiment_time.split(timeline, wall)))
        return made

    baseline = experiment_time.summarize(runs("baseline", [(20.0, 5.0, 1.0), (30.0, 9.0, 1.0),
                                                           (22.0, 6.0, 3.0)]))
    current_runs = runs("current", [(12.0, 5.0, 1.0), (14.0, 6.0, 2.0), (40.0, 5.0, 1.0)])
    current = experiment_time.summarize(current_runs)
    assert (baseline.whole, baseline.loop, baseline.fixed) == (22.0, 7.0, 15.0)
    assert (current.whole, current.loop, current.fixed) == (14.0, 6.0, 8.0)
    lines = experiment_time.before_after([("baseline old (abc1234)", baseline),
                                          ("current (def5678)", current)], "heading")
    assert lines[0] == "heading"
    assert lines[-2:] == ["| baseline old (abc1234) | 22.0 | 7.0 | 15.0 | — | — |",
                          "| current (def5678) | 14.0 | 6.0 | 8.0 | 0.53x | 0.53x |"]
    rows = experiment_time.median_rows([run.rows for run in current_runs])
    assert [row[:2] for row in rows] == [("train", "start-up and imports"), ("train", loop),
                                         ("evaluate", test), current_runs[0].rows[-1][:2]]
    assert "fixed cost 8.0 s" in experiment_time.table(rows, current.whole, "heading")[-1]


def test_the_before_after_block_repeats_every_baseline_and_has_a_row_for_each(
        monkeypatch, capsys):
    """The header's command gives each --baseline as typed; the rows follow the sides in the
    order measure() returns them, baselines first, then the current checkout."""
    from benchmarks import experiment_time

    def one_run(wall: float) -> list:
        return [experiment_time.Run(wall, [("train", experiment_time.LOOP_PHASES[0], 1.0),
                                           (experiment_time.DVC_STAGE, "DVC", wall - 1.0)])]

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(experiment_time, "measure",
                        lambda *args: [one_run(30.0), one_run(20.0), one_run(10.0)])
    experiment_time.main(["--baseline", "HEAD~1", "--baseline", "HEAD"])
    printed = capsys.readouterr().out.splitlines()
    headers = [line for line in printed if line.startswith("Device: ")]
    assert len(headers) == 2 and "alternating with the baselines'" in headers[0]
    assert all(line.endswith("--preset I1 --baseline HEAD~1 --baseline HEAD`") for line in headers)
    short = {rev: experiment_time.git("rev-parse", "--short", rev) for rev in ("HEAD~1", "HEAD")}
    rows = [line.split(" | ")[:2] for line in printed if line.startswith(("| baseline ", "| current ("))]
    assert rows[:2] == [[f"| baseline HEAD~1 ({short['HEAD~1']})", "30.0"],
                        [f"| baseline HEAD ({short['HEAD']})", "20.0"]]
    assert rows[2][0].startswith("| current (") and rows[2][1] == "10.0" and len(rows) == 3


def test_a_baseline_without_a_timeline_gets_its_wall_clock_and_no_ratio(tmp_path):
    """A revision older than the stages' timeline: its row says so instead of failing."""
    from benchmarks import experiment_time

    missing = tmp_path / "never-written.jsonl"
    old = experiment_time.summarize([experiment_time.Run(wall, experiment_time.split(missing, wall))
                                     for wall in (21.0, 25.0, 20.0)])
    assert (old.whole, old.loop, old.fixed) == (21.0, None, None)
    current = experiment_time.Summary(14.0, 6.0)
    lines = experiment_time.before_after([("baseline old (abc1234)", old),
                                          ("current (def5678)", current)], "heading")
    assert lines[-2:] == ["| baseline old (abc1234) | 21.0 | no phases recorded | — | — | — |",
                          "| current (def5678) | 14.0 | 6.0 | 8.0 | — | — |"]


def test_a_series_of_changes_gets_each_rows_ratio_to_the_first_and_to_the_row_above(tmp_path):
    """Two changes after a first baseline: the first-row column gives the series so far, the
    row-above column each change alone; a row without phases leaves both of its cells and
    the next row's row-above cell empty, while the next row's first-row cell still stands."""
    from benchmarks import experiment_time

    loop, test = experiment_time.LOOP_PHASES

    def summary(name: str, wall: float, train_s: float, test_s: float):
        timeline = write_timeline(tmp_path / f"{name}.jsonl", [
            ("train", "start-up and imports", 0.0, 2.0),
            ("train", loop, 2.0, 2.0 + train_s),
            ("evaluate", test, 10.0, 10.0 + test_s)])
        return experiment_time.summarize([experiment_time.Run(
            wall, experiment_time.split(timeline, wall))])

    first = summary("first", 24.0, 3.0, 1.0)    # fixed cost 20 s
    second = summary("second", 19.0, 3.0, 1.0)  # 15 s
    current = summary("current", 16.0, 3.0, 1.0)  # 12 s
    lines = experiment_time.before_after([("baseline e6f1686 (e6f1686)", first),
                                          ("baseline 8a00b0b (8a00b0b)", second),
                                          ("current (2dd8fe3)", current)], "heading")
    assert lines[2].endswith("| fixed cost / first row's | fixed cost / row above's |")
    assert lines[-3:] == ["| baseline e6f1686 (e6f1686) | 24.0 | 4.0 | 20.0 | — | — |",
                          "| baseline 8a00b0b (8a00b0b) | 19.0 | 4.0 | 15.0 | 0.75x | 0.75x |",
                          "| current (2dd8fe3) | 16.0 | 4.0 | 12.0 | 0.60x | 0.80x |"]
    unrecorded = experiment_time.summarize([experiment_time.Run(
        30.0, experiment_time.split(tmp_path / "never-written.jsonl", 30.0))])
    lines = experiment_time.before_after([("baseline a", first), ("baseline b", unrecorded),
                                          ("current", current)], "heading")
    assert lines[-2:] == ["| baseline b | 30.0 | no phases recorded | — | — | — |",
                          "| current | 16.0 | 4.0 | 12.0 | 0.60x | — |"]


def project_to_measure(tmp_path: Path, monkeypatch) -> Path:
    """A tiny project with one commit, as the current directory, whose runs experiment_time
    measures with a stand-in for the MLflow store (the tests fake the runs themselves)."""
    from helpers import tiny_project

    from benchmarks import experiment_time

    project = tiny_project(tmp_path / "project")
    monkeypatch.chdir(project)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setattr(experiment_time, "warmed_store", lambda folder: "sqlite:///unused.db")
    return project


@pytest.mark.parametrize("interruption", [RuntimeError("dvc exp run failed"), KeyboardInterrupt()])
def test_the_baseline_worktree_is_removed_when_a_run_fails(tmp_path, monkeypatch, interruption):
    """The worktree of --baseline holds this checkout's MNIST files and uses its DVC cache
    while the run goes; after a run that fails or is interrupted, no folder and no worktree
    entry of git's is left."""
    from benchmarks import experiment_time

    project = project_to_measure(tmp_path, monkeypatch)
    checkouts = []

    def failing_run(preset, overrides, store, timeline, checkout=None):
        checkouts.append(checkout)
        if checkout != Path.cwd():  # the baseline's, which runs first
            raw = Path("data/MNIST/raw")
            assert sorted(path.name for path in (checkout / raw).iterdir()) \
                == sorted(path.name for path in raw.iterdir())
            assert (checkout / "data/MNIST/raw.tar.gz").read_bytes() \
                == Path("data/MNIST/raw.tar.gz").read_bytes()
            cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=checkout,
                                   capture_output=True, text=True, check=True).stdout.strip()
            assert Path(cache) == (project / ".dvc" / "cache").resolve()
        raise interruption

    monkeypatch.setattr(experiment_time, "run_experiment", failing_run)
    baseline = experiment_time.revision("HEAD")
    with pytest.raises(type(interruption)):
        experiment_time.measure("I1", [], 2, [baseline])
    [worktree] = checkouts  # the first run failed: nothing ran after it
    assert worktree != project and not worktree.exists()
    listed = subprocess.run(["git", "worktree", "list", "--porcelain"], capture_output=True,
                            text=True, check=True).stdout
    assert [line for line in listed.splitlines() if line.startswith("worktree ")] \
        == [f"worktree {project.resolve()}"]


@pytest.mark.parametrize("interruption", [
    subprocess.CalledProcessError(1, [sys.executable, "-m", "dvc", "exp", "run"]),
    KeyboardInterrupt()])
def test_every_baseline_worktree_is_removed_when_a_later_sides_run_fails(
        tmp_path, monkeypatch, interruption):
    """Two baselines, the same commit typed two ways: each runs in a worktree of its own, and
    when the second one's run fails or is interrupted after the first one's succeeded, both
    worktrees are gone and a failed run's error names the side it was."""
    from benchmarks import experiment_time

    project = project_to_measure(tmp_path, monkeypatch)
    checkouts = []

    def second_run_fails(preset, overrides, store, timeline, checkout=None):
        assert (checkout / "data/MNIST/raw.tar.gz").is_file()  # each worktree is set up
        checkouts.append(checkout)
        if len(checkouts) == 2:
            raise interruption
        return 10.0

    monkeypatch.setattr(experiment_time, "run_experiment", second_run_fails)
    short = experiment_time.git("rev-parse", "--short", "HEAD")
    baselines = [experiment_time.revision("HEAD"), experiment_time.revision(short)]
    expected = SystemExit if isinstance(interruption, subprocess.CalledProcessError) \
        else KeyboardInterrupt
    with pytest.raises(expected) as failed:
        experiment_time.measure("I1", [], 2, baselines)
    if expected is SystemExit:
        assert f"baseline {short}'s run 1 failed" in str(failed.value.code)
    first, second = checkouts
    assert len({first, second, project}) == 3
    assert not first.exists() and not second.exists()
    listed = subprocess.run(["git", "worktree", "list", "--porcelain"], capture_output=True,
                            text=True, check=True).stdout
    assert [line for line in listed.splitlines() if line.startswith("worktree ")] \
        == [f"worktree {project.resolve()}"]


def test_stage_laps_are_written_only_when_asked(tmp_path, monkeypatch):
    from mnistlab import timing

    monkeypatch.delenv(timing.TIMELINE, raising=False)
    timing.Laps("train")("start-up and imports")  # nothing to write to: nothing written
    timeline = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(timing.TIMELINE, str(timeline))
    laps = timing.Laps("evaluate")
    laps("start-up and imports")
    laps("test pass")
    first, second = (json.loads(line) for line in timeline.read_text().splitlines())
    assert (first["stage"], first["phase"], second["phase"]) == ("evaluate", "start-up and imports", "test pass")
    assert first["start"] == timing.IMPORTED and first["end"] == second["start"] <= second["end"]


@pytest.mark.slow
@pytest.mark.fault
def test_an_experiment_starts_its_stages_python_from_this_environment_off_path(
        tmp_path, monkeypatch):
    """`.venv/bin/python -m benchmarks.experiment_time` outside `make`: with the environment's
    bin/ not on PATH, the stages' `python` (dvc.yaml) is still this environment's."""
    import shutil
    import subprocess

    import yaml

    from benchmarks import experiment_time
    from mnistlab.timing import TIMELINE

    project = tmp_path / "project"
    project.mkdir()
    # One stage that writes down which python ran it, where the benchmark's timeline goes.
    stage = ("python -c \"import os, sys; "
             f"open(os.environ['{TIMELINE}'], 'w').write(sys.executable)\"")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"which": {"cmd": stage}}}))
    (project / "params.yaml").write_text("preset: I1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    ["git", "add", "-A"], [*git, "commit", "-qm", "one stage"]):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    monkeypatch.chdir(project)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    # A PATH with git and the system's tools, but not this environment's bin/.
    monkeypatch.setenv("PATH", os.pathsep.join(
        dict.fromkeys([os.path.dirname(shutil.which("git")), "/usr/bin", "/bin"])))
    timeline = tmp_path / "which.txt"
    seconds = experiment_time.run_experiment("I1", [], f"sqlite:///{tmp_path / 'mlflow.db'}",
                                             timeline)
    assert seconds > 0
    assert timeline.read_text() == sys.executable


def test_every_generated_block_lives_where_its_command_writes():
    """Each `<!-- NAME:begin -->` block of the documentation stands once, paired, in a file
    that `--readme` rewrites (tools.doc_blocks.DOCUMENTS): a block moved to a page the
    commands do not know would go stale without a word."""
    import re

    from tools.doc_blocks import DOCUMENTS

    markers = re.compile(r"<!-- ([\w.-]+):(begin|end) -->")
    written = {REPO / path for path in DOCUMENTS}
    seen: dict[str, Path] = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found = markers.findall(path.read_text())
        begins = [name for name, side in found if side == "begin"]
        assert begins == [name for name, side in found if side == "end"], path
        for name in begins:
            assert path in written, f"block {name} is in {path.name}, which no command rewrites"
            assert name not in seen, f"block {name} is in both {seen[name].name} and {path.name}"
            seen[name] = path
    assert {"results", "default"} <= set(seen) and any(n.startswith("search-") for n in seen)


def header_gaps(line: str) -> list[str]:
    """What a block's first line, "Device: <GPU or CPU model>, torch <version>; ...
    `python -m benchmarks.<name> ...`", fails to name."""
    device = re.match(r"Device: (.+?)(?:, torch |;)", line)
    if device is None:
        named = False
    elif device[1].startswith("cpu"):  # "cpu: <model> (<n> threads)", as describe() writes it
        cpu = re.fullmatch(r"cpu: (.+) \(\d+ threads?\)", device[1])
        named = cpu is not None and cpu[1] != "unknown"
    else:
        named = device[1] not in {"cuda", "mps", "gpu"}
    torch_version = re.match(r"Device: [^;]+?, torch \d+\.\d+\S*;", line)
    command = re.search(r"`python -m benchmarks\.\w+[^`]*`", line)
    return [gap for gap, present in (("device", named), ("torch version", torch_version),
                                     ("command", command)) if not present]


def performance_blocks(text: str) -> dict[str, list[str]]:
    """Each generated block of a page: its name and its lines between the markers."""
    return {name: body.strip("\n").splitlines() for name, body in re.findall(
        r"<!-- ([\w.-]+):begin -->(.*?)<!-- \1:end -->", text, re.S)}


def test_every_performance_block_names_device_torch_and_command():
    """Each filled block of docs/performance.md opens with the device by its model, the torch
    build and the command that rewrites it, so that each figure can be traced and rerun."""
    blocks = performance_blocks((REPO / "docs" / "performance.md").read_text())
    assert len(blocks) >= 5
    gaps = {}
    for name, lines in blocks.items():
        if not lines:  # not measured yet: the command's first run fills it
            continue
        missing = header_gaps(lines[0])
        if missing:
            gaps[name] = missing
    assert gaps == {}, f"blocks whose first line does not name these: {gaps}"


@pytest.mark.parametrize("line, gaps", [
    ("Device: cpu: AMD EPYC (2 threads), torch 2.14.1+cu130; 30 steps; "
     "`python -m benchmarks.train_throughput --steps 30`", []),
    ("Device: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130; "
     "`python -m benchmarks.recipe_time --device cuda --presets I3`; one run", []),
    ("Device: cpu (2 threads), torch 2.14.1+cu130; `python -m benchmarks.profile_step`",
     ["device"]),
    ("Device: cpu: unknown (1 thread), torch 2.14.1; `python -m benchmarks.profile_step`",
     ["device"]),
    ("Device: NVIDIA H100 80GB HBM3; seeds 0, 1, 2; `python -m benchmarks.same_recipe`",
     ["torch version"]),
    ("`python -m benchmarks.overheads --epochs 20` on 2 CPU cores, sqlite MLflow store",
     ["device", "torch version"]),
    ("Device: cpu: AMD EPYC (2 threads); 20 epochs", ["torch version", "command"]),
    ("Device: cpu: AMD EPYC (2 threads), torch 2.14.1; 30 steps", ["command"]),
    ("Device: cuda, torch 2.11.0; `python -m benchmarks.profile_step`", ["device"]),
])
def test_a_block_header_is_read_for_device_torch_and_command(line, gaps):
    assert header_gaps(line) == gaps


def test_a_cpu_is_named_with_the_vector_instructions_torch_uses(monkeypatch):
    """Two CPUs that /proc/cpuinfo both calls "AMD EPYC" differ by what torch's kernels use."""
    from mnistlab import runtime

    monkeypatch.setattr(runtime, "cpu_model", lambda: "AMD EPYC")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for isa, name in (("AVX512", "cpu: AMD EPYC, AVX512 (2 threads)"),
                      ("AVX2", "cpu: AMD EPYC, AVX2 (2 threads)"),
                      ("DEFAULT", "cpu: AMD EPYC (2 threads)")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        assert describe(torch.device("cpu")) == name
        assert header_gaps(f"Device: {name}, torch 2.14.1; `python -m benchmarks.x`") == []


def test_the_benchmarks_header_names_device_torch_and_command():
    line = common.header(torch.device("cpu"), "python -m benchmarks.profile_step --steps 4",
                         "model I1, batch 32")
    assert line == (f"Device: {describe(torch.device('cpu'))}, torch {torch.__version__}; "
                    "model I1, batch 32; `python -m benchmarks.profile_step --steps 4`")
    if cpu_model() != "unknown":  # /proc/cpuinfo names the CPU (Linux)
        assert header_gaps(line) == []
    with pytest.raises(ValueError, match="python -m benchmarks.NAME"):
        common.header(torch.device("cpu"), "make profile")


def test_the_overheads_epoch_is_measured_on_the_recipe(tiny_mnist, default_params):
    """The per-epoch writes are divided by an epoch timed in the same run, not a constant."""
    raw = dict(default_params)
    raw["train"] = {**default_params["train"], "device": "cpu", "precision": "fp32",
                    "batch_size": 64, "epochs": 3}
    params = parse_params(raw)
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)
    test = load_split(train=False, root=tiny_mnist, verify_md5=False)
    seconds = overheads.time_epoch(params, train, test, torch.float32)
    assert 0 < seconds < 60


# A measured figure: a number with a unit of time, share, ratio, memory or rate.
MEASURED = re.compile(r"(?<![\w.])\d[\d,.]*\s?(?:ms|s|%|x|pt|MiB|MB|GB|TFLOP/s|images/s|img/s)"
                      r"(?![\w/])")

def figures_outside_blocks(text: str) -> list[str]:
    """Measured figures of a page that stand outside its generated blocks, inline code and
    the targets (the first column of the `## Targets` table, which states them). A code
    block's comments are read as prose."""
    text = re.sub(r"<!-- ([\w.-]+):begin -->.*?<!-- \1:end -->", "", text, flags=re.S)
    targets, found, section = set(), [], ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.strip()
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        if section == "## Targets" and prose.startswith("|"):
            targets.update(MEASURED.findall(prose.split("|")[1]))
            prose = "|".join(prose.split("|")[2:])
        found += [(figure, line.strip()) for figure in MEASURED.findall(prose)]
    return [f"{figure!r} in: {line}" for figure, line in found if figure not in targets]


@pytest.mark.parametrize("page", ["docs/performance.md", "README.md"])
def test_no_measured_figure_stands_outside_a_generated_block(page):
    """A time, share or ratio typed into prose goes stale when its block is rerun: prose
    points at the block instead."""
    assert figures_outside_blocks((REPO / page).read_text()) == []


def test_figures_in_prose_are_found_and_targets_are_not():
    text = ("## Targets\n\n| target | measured |\n| --- | --- |\n| under 3 s | 0.9 s |\n\n"
            "## Overheads\n\n<!-- x:begin -->\n12.5 ms\n<!-- x:end -->\n"
            "The writes take 12.5 ms, `--steps 30` at 2.10x; the target is 3 s.\n"
            "```bash\ndvc exp run -S train.epochs=2   # quick: 22 s\n```\n")
    assert figures_outside_blocks(text) == [
        "'0.9 s' in: | under 3 s | 0.9 s |",
        "'12.5 ms' in: The writes take 12.5 ms, `--steps 30` at 2.10x; the target is 3 s.",
        "'2.10x' in: The writes take 12.5 ms, `--steps 30` at 2.10x; the target is 3 s.",
        "'22 s' in: dvc exp run -S train.epochs=2   # quick: 22 s"]
