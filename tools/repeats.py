"""Repeat presets with several random seeds: DVC experiments, grouped in MLflow.

    python -m tools.repeats --repeats 3 I1 I2 I3        (`make iterations REPEATS=3`)
    python -m tools.repeats --repeats 2 --set train.epochs=1 I1 I3    (a smoke run)

One accuracy figure from one random seed is an anecdote: on a 10,000-image test set two runs
of the same preset differ by a tenth of a point. For every preset this runs one DVC
experiment per random seed 0..N-1, named `<preset>-s<seed>` (`dvc exp run --temp -f -n
I3-s0 -S preset=I3 -S base.seed=0`), `--jobs` at a time, each in its own temporary copy of
the repo, and groups the runs in MLflow: one parent run per preset, named after it, whose
children are its repeats and which carries their aggregates (n, mean, standard deviation,
min and max of the final test accuracy).

Starting a group supersedes the preset's earlier group (tag `superseded_by`); other presets'
groups are not touched. A group cut short (Ctrl-C, a failed run) still gets the aggregates of
the repeats that finished and is tagged `complete: false`; `--resume` reopens the preset's
latest group and runs only the repeats it is missing (`make iterations RESUME=1`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mnistlab import tracking
from mnistlab.executables import child_env
from mnistlab.signals import raise_keyboard_interrupt
from mnistlab.config import PRESETS_DIR, echo, preset_names
from tools.cli import is_whole_number
from tools.repeat_stats import group_stats


# Each repeat is a whole training run (minutes on a CPU), and each job a `dvc exp run` with its
# own copy of the repo and its own trainer: beyond these a typo is far likelier than a plan.
MAX_REPEATS = 1000
MAX_JOBS = 64


# A group is one parent run per preset, its repeats the children. The parent carries these
# two tags: the preset, and the DVC experiment names it expects as children (a JSON list).
# Each repeat's train stage is told its parent through tracking.RUN_TAGS_ENV.
PARENT_TAG = "repeats_group"
MEMBERS_TAG = "repeats_members"


def experiment_name(preset: str, seed: int) -> str:
    return f"{preset}-s{seed}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools.repeats", description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="+", help="names from conf/preset/")
    parser.add_argument("--repeats", default="3", help="random seeds per preset: 0..N-1")
    parser.add_argument("--jobs", default="1", help="experiments run at once")
    parser.add_argument("--resume", action="store_true",
                        help="finish each preset's latest group: run only its missing repeats")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run (dvc exp run -S)")
    args = parser.parse_args(argv)
    # One line naming the bad value and what is allowed, before anything runs.
    for option, most in (("repeats", MAX_REPEATS), ("jobs", MAX_JOBS)):
        value = getattr(args, option)
        if not is_whole_number(value, 1, most):
            parser.exit(2, f"tools.repeats: error: {option.upper()}={echo(value)}: should be a "
                           f"whole number of at least 1 and at most {most}\n")
        setattr(args, option, int(value))
    known = preset_names()
    unknown = [name for name in args.presets if name not in known]
    if unknown:
        parser.exit(2, f"tools.repeats: error: preset {', '.join(map(repr, unknown))} does not "
                       f"exist; the presets are {', '.join(known)} (conf/preset/)\n")
    unstaged = presets_git_lacks(args.presets)
    if unstaged:
        files = " ".join(f"conf/preset/{name}.yaml" for name in unstaged)
        parser.exit(2, f"tools.repeats: error: preset {', '.join(map(repr, unstaged))}: {files} "
                       f"is not in git, and each `dvc exp run --temp` copies only the files git "
                       f"knows; `git add {files}` first\n")
    bad_sets = [item for item in args.set if "=" not in item]
    if bad_sets:
        parser.exit(2, f"tools.repeats: error: --set {bad_sets[0]!r}: should be KEY=VALUE\n")
    return args


def presets_git_lacks(presets: Sequence[str]) -> list[str]:
    """The presets whose file git neither tracks nor has staged. DVC builds each temporary
    copy from git and leaves untracked files out, so their runs would not find the preset
    (a preset `make search` has just written, say). Without git (or outside a repo) there is
    nothing to check: DVC itself then refuses to run experiments."""
    git = shutil.which("git")
    if git is None:
        return []
    listed = subprocess.run([git, "ls-files", "-z", "--", str(PRESETS_DIR)],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        return []
    known = {Path(name).stem for name in listed.stdout.split("\0") if name}
    return [name for name in presets if name not in known]


def open_group(client, experiment_id: str, preset: str, members: list[str]) -> str:
    """A new parent run for `preset`; earlier parents of the same preset are superseded."""
    earlier = client.search_runs([experiment_id], filter_string=f"tags.{PARENT_TAG} = '{preset}'")
    parent = client.create_run(experiment_id, run_name=preset, tags={
        PARENT_TAG: preset, MEMBERS_TAG: json.dumps(members), "preset": preset})
    for run in earlier:
        if "superseded_by" not in run.data.tags:
            client.set_tag(run.info.run_id, "superseded_by", parent.info.run_id)
        if run.info.status == "RUNNING":  # a group that never closed (machine stopped)
            client.set_terminated(run.info.run_id, "KILLED")
    return parent.info.run_id


def finished_repeats(client, experiment_id: str, parent_id: str) -> dict[str, float]:
    """DVC experiment name -> final test accuracy of the group's finished children; a name run
    twice counts once, its last run."""
    children = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    final = {}
    for child in children:
        accuracy = child.data.metrics.get("final_test_accuracy")
        if child.info.status == "FINISHED" and accuracy is not None:
            final[child.data.tags.get("dvc_exp_name", child.info.run_id)] = accuracy
    return final


def reopen_group(client, experiment_id: str, preset: str, members: list[str]) -> str | None:
    """The preset's latest group, running again, or None when it has none."""
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.{PARENT_TAG} = '{preset}'", max_results=1)
    if not runs:
        return None
    earlier = json.loads(runs[0].data.tags[MEMBERS_TAG])
    if earlier != members:
        sys.exit(f"tools.repeats: error: --resume: {preset}'s latest group planned "
                 f"{len(earlier)} repeats ({', '.join(earlier)}), not {len(members)}; "
                 f"pass --repeats {len(earlier)} or start a new group without --resume")
    client.update_run(runs[0].info.run_id, status="RUNNING")
    return runs[0].info.run_id


def aggregate(accuracies: Sequence[float]) -> dict[str, float]:
    """n, mean, sample standard deviation (0 for one run: an MLflow metric is a number), min
    and max, as the results table computes them (tools.repeat_stats)."""
    if not accuracies:
        return {"n_runs": 0}
    stats = group_stats(accuracies)
    return {
        "n_runs": stats["n"],
        "final_test_accuracy_mean": stats["mean"],
        "final_test_accuracy_std": stats["sd"] if stats["sd"] is not None else 0.0,
        "final_test_accuracy_min": stats["min"],
        "final_test_accuracy_max": stats["max"],
    }


def close_group(client, experiment_id: str, parent_id: str) -> dict:
    """Log the aggregates of the parent's finished children and end it."""
    members = json.loads(client.get_run(parent_id).data.tags[MEMBERS_TAG])
    final = finished_repeats(client, experiment_id, parent_id)
    stats = aggregate(list(final.values()))
    complete = sorted(final) == sorted(members)
    for name, value in stats.items():
        client.log_metric(parent_id, name, value)
    client.set_tag(parent_id, "complete", str(complete).lower())
    client.set_terminated(parent_id, "FINISHED")
    return {**stats, "complete": complete, "planned": len(members)}


def experiment_command(name: str, overrides: Sequence[str]) -> list[str]:
    """One repeat as its own `dvc exp run --temp`: a throw-away copy of the repo, like a
    queued run, but run by this process, not by DVC's task queue, whose worker can stop
    for good after one experiment (its file-based message broker is read while it is being
    written, celery/kombu#1551) and leave the rest of the queue waiting. Experiments that
    start together take turns at the repo's lock (`--wait-for-lock`) while each makes its
    copy; without it, all but the first fail at once with "Unable to acquire lock"."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", "exp", "run", "--temp", "-f", "-n", name,
            *[arg for item in overrides for arg in ("-S", item)]]


def run_experiments(commands: dict[str, list[str]], jobs: int,
                    envs: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Run the commands, `jobs` at a time, each with its `envs` entry added to the
    environment; the names of those that failed. On Ctrl-C or SIGTERM the ones still
    running are stopped (each marks its MLflow run KILLED)."""
    pending, running, failed = list(commands.items()), {}, []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, command = pending.pop(0)
                # Its own process group, so that a stop reaches the stage DVC runs as well
                # (`dvc exp run` does not pass a SIGTERM on to it).
                running[name] = subprocess.Popen(command, start_new_session=True,
                                                 env=child_env((envs or {}).get(name)))
            time.sleep(0.5)
            for name, process in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    if process.returncode:
                        failed.append(name)
    finally:
        for process in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in running.values():
            process.wait()
    return failed


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        experiment_id = tracking.connect()
    except tracking.TrackingError as err:
        sys.exit(f"tools.repeats: error: {err}")
    client = tracking.client()
    groups, to_run = {}, {}
    for preset in args.presets:
        members = [experiment_name(preset, seed) for seed in range(args.repeats)]
        parent_id = reopen_group(client, experiment_id, preset, members) if args.resume else None
        if parent_id is None:
            parent_id = open_group(client, experiment_id, preset, members)
        done = finished_repeats(client, experiment_id, parent_id)
        groups[preset] = parent_id
        to_run[preset] = [seed for seed in range(args.repeats)
                          if experiment_name(preset, seed) not in done]
        names = [experiment_name(preset, seed) for seed in to_run[preset]]
        print(f"{preset}: MLflow parent run {parent_id}; running {', '.join(names) or 'nothing'}")
    commands = {experiment_name(preset, seed): experiment_command(
                    experiment_name(preset, seed), [f"preset={preset}", f"base.seed={seed}", *args.set])
                for preset in args.presets for seed in to_run[preset]}
    # Each repeat's MLflow run becomes a child of its preset's parent run.
    envs = {experiment_name(preset, seed): {tracking.RUN_TAGS_ENV: json.dumps(
                {"mlflow.parentRunId": groups[preset]})}
            for preset in args.presets for seed in to_run[preset]}
    stopped = None
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        failed = run_experiments(commands, args.jobs, envs)
        if failed:
            stopped = f"tools.repeats: {', '.join(failed)} failed"
    except KeyboardInterrupt as err:
        stopped = f"tools.repeats: {err or 'interrupted by Ctrl-C'}"
    finally:  # also after Ctrl-C or a failed run: what finished is aggregated
        for preset, parent_id in groups.items():
            stats = close_group(client, experiment_id, parent_id)
            line = (f"mean {stats['final_test_accuracy_mean']:.2%}, sd "
                    f"{stats['final_test_accuracy_std'] * 100:.2f} pt" if stats["n_runs"] else "")
            print(f"{preset}: {stats['n_runs']} of {stats['planned']} runs finished {line}"
                  f"{'' if stats['complete'] else ' (incomplete)'}")
    if stopped:
        sys.exit(f"{stopped}; the finished repeats are kept, and the same command with "
                 f"--resume (RESUME=1) runs the missing ones")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
