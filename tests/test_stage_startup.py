"""A stage run as a command does no cyclic garbage collection before its work starts, nor at
exit (stages/train.py says why: seconds a run); imported as a module, it leaves the importer's
collector as it was. The train and evaluate stages end without the interpreter's teardown
(mnistlab.signals.exit_finished), their exit handlers run and their output complete."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import PYTHON, REPO, make_project, stage_env
from mnistlab.timing import TIMELINE

# `python -m stages.<name>`, with every collection's start written down and, once the stage
# is done (in an exit handler, before the exit's own collection, if any), the collector's state.
WATCHED = """
import atexit, gc, json, runpy, sys, time
started = []
gc.callbacks.append(lambda phase, info: phase == "start" and started.append(time.time()))
atexit.register(lambda: print(json.dumps({"collections": started, "enabled": gc.isenabled(),
                                          "frozen": gc.get_freeze_count()})))
runpy.run_module("stages." + sys.argv[1], run_name="__main__", alter_sys=True)
"""

# Where each stage's work begins: no collection may come before it.
WORK_STARTS = {"validate": "checks", "download": "MNIST checked or fetched",
               "train": "training loop (with each epoch's checkpoint and metrics)",
               "evaluate": "test pass"}


def test_importing_a_stage_leaves_the_collector_as_it_was():
    """benchmarks/overheads.py imports the train stage's names: its collector stays on."""
    code = ("import gc, importlib\n"
            "for name in ('validate', 'download', 'train', 'evaluate'):\n"
            "    importlib.import_module('stages.' + name)\n"
            "print(gc.isenabled(), gc.get_freeze_count())")
    result = subprocess.run([str(PYTHON), "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["True", "0"]


@pytest.mark.slow
def test_a_stage_collects_no_garbage_before_its_work_and_freezes_before_exit(tmp_path):
    project = make_project(tmp_path / "project", epochs=1)
    timeline = tmp_path / "timeline.jsonl"
    env = stage_env(**{TIMELINE: str(timeline)})
    for stage, phase in WORK_STARTS.items():
        result = subprocess.run([str(PYTHON), "-c", WATCHED, stage], cwd=project, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        state = json.loads(result.stdout.splitlines()[-1])
        laps = {r["phase"]: r for line in timeline.read_text().splitlines()
                for r in [json.loads(line)] if r["stage"] == stage}
        # From the stage's first import (its first lap's start) to its work's start.
        early = [t for t in state["collections"]
                 if laps["start-up and imports"]["start"] <= t < laps[phase]["start"]]
        assert early == [], f"{stage}: {len(early)} collections before {phase!r}"
        assert state["frozen"] > 10_000, stage  # the exit's collection walks none of it
        # The train and evaluate stages collect again for their loops; the short ones never do.
        assert state["enabled"] == (stage in ("train", "evaluate")), stage


# A finished process that printed without a newline (left in the buffer) and registered an
# exit handler, then ends by exit_finished; the line after it is never reached.
FINISHED = """
import atexit, sys
from mnistlab.signals import exit_finished
atexit.register(lambda: open(sys.argv[1], "w").write("handler ran"))
print("all written", end="")
exit_finished()
print("after the exit")
"""


def test_a_finished_stage_ends_at_once_with_its_exit_handlers_run_and_output_flushed(tmp_path):
    marker = tmp_path / "marker.txt"
    result = subprocess.run([str(PYTHON), "-c", FINISHED, str(marker)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "all written")
    assert marker.read_text() == "handler ran"
