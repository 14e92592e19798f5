"""The benchmark commands measure what they claim, without touching the project's files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from benchmarks import (
    overheads,
    profile_step,
    same_recipe,
    train_throughput,
)
from mnistlab.data import load_split
from mnistlab.runtime import keep_freed_memory
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


@pytest.mark.parametrize("seconds, expected", [
    (41.7, "99.4% test accuracy first reached after epoch 3, 42 s on cpu"),
    (None, "99.4% test accuracy never reached on cpu"),
])
def test_default_run_line_reports_time_to_target(tmp_path, monkeypatch, seconds, expected):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "train_metrics.json").write_text(json.dumps({
        "best_test_accuracy": 0.995, "best_epoch": 10,
        "epochs": 10, "params": 20978, "train_seconds": 120.0, "epoch_images_per_second": 5000,
        "epoch_to_target": 3 if seconds else None, "seconds_to_target": seconds,
        "target_accuracy": 0.994, "device": "cpu"}))
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
