"""A whole experiment, timed as a user waits for it: `dvc exp run` of a preset, end to end,
and where its time goes; with --baseline, the same before and after a change or a series of
changes.

    python -m benchmarks.experiment_time [--preset I1] [--set KEY=VALUE ...]
                                         [--repeats N] [--baseline REV ...] [--readme]
                                                                 (`make bench-experiment`)

It runs `dvc exp run --temp -f -n bench-<preset> -S preset=<preset> ...` with
PIPELINE_TIMELINE set, so that every stage writes down its phases (mnistlab/timing.py), and
reads them back: each stage's start-up and imports, params and data, the training loop,
reports and figures, MLflow logging and log_model. What is left of the wall clock is DVC's
own work: composing params.yaml, hashing, committing the experiment, and starting each
stage's Python. The fixed cost is everything but the training loop and the test pass.

--repeats N runs the experiment N times and reports each phase's median, so that one noisy
run does not decide. --baseline REV also runs it in a temporary git worktree of REV (with
this checkout's MNIST files and DVC cache), baseline and current alternating run by run, so
that both meet the same load on the same CPU, and adds a table of their fixed costs and
ratio. --baseline may be given several times, e.g. one commit before each of a series of
changes: every baseline gets its own worktree, all sides take turns run by run, and the
table has one row per baseline in the order given, then the current checkout's, each with
its fixed cost over the first row's and over the row above's, so that each change's share
and the whole series' can be read. A baseline whose stages write no timeline still gets its
whole wall clock.

Each side's runs go to its own throw-away MLflow store (warmed up first, so its one-time
table creation is not counted) and the benchmark's experiment is removed after each run:
the user's runs and experiments are left as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median
from typing import NamedTuple

from mnistlab.executables import child_env
from mnistlab.fetch import ARCHIVE, RAW_DIR
from mnistlab.timing import TIMELINE
from tools import doc_blocks
from tools.cli import OneLineParser, whole_number

PROG = "benchmarks.experiment_time"
LOOP_PHASES = ("training loop (with each epoch's checkpoint and metrics)", "test pass")
DVC_STAGE = "dvc"
MAX_REPEATS = 20
CURRENT = "current"

Row = tuple[str, str, float]  # (stage, phase, seconds)


class Run(NamedTuple):
    wall: float
    rows: list[Row]  # split(): the stages' phases, then DVC's share


class Summary(NamedTuple):
    """One side's medians. `loop` (training loop and test pass) is None when its stages
    recorded neither; `missing` then says what was not recorded."""
    whole: float
    loop: float | None
    missing: str = ""

    @property
    def fixed(self) -> float | None:
        return None if self.loop is None else self.whole - self.loop


class Revision(NamedTuple):
    name: str    # as typed: the block's header repeats the command as it was given
    commit: str  # the full hash it stands for, which the worktree checks out


# --- the command line ------------------------------------------------------------------------


def revision(text: str) -> Revision:
    """`text` and the commit git resolves it to here, or refused before any run starts."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options",
                            f"{text}^{{commit}}"], capture_output=True, text=True)
    if found.returncode != 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a commit git knows in this "
                                         "repository (give a hash, branch, tag or HEAD~N)")
    return Revision(text, found.stdout.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="I1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a `dvc exp run -S` override, e.g. train.epochs=1")
    parser.add_argument("--repeats", type=whole_number(1, MAX_REPEATS, "runs"), default=1, metavar="N",
                        help=f"runs of each side, 1 to {MAX_REPEATS}; medians are reported")
    parser.add_argument("--baseline", type=revision, action="append", default=[], metavar="REV",
                        help="a git revision to time too, alternating with the current checkout; "
                             "repeat it to time several, one table row each in the order given")
    parser.add_argument("--readme", action="store_true",
                        help="write the tables into docs/performance.md")
    return parser.parse_args(argv)


# --- one run -----------------------------------------------------------------------------------


def run_experiment(preset: str, overrides: list[str], store: str, timeline: Path,
                   checkout: Path | None = None) -> float:
    """Wall seconds of one `dvc exp run --temp` of `preset` in `checkout` (default: the
    current directory); its stages write `timeline`."""
    name = f"bench-{preset}"
    # The stages' `python` (dvc.yaml) is this interpreter's, also outside `make` and in a
    # baseline worktree, which has no environment of its own.
    env = child_env({TIMELINE: str(timeline), "MLFLOW_TRACKING_URI": store})
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-f", "-n", name,
               "-S", f"preset={preset}", *[arg for item in overrides for arg in ("-S", item)]]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=checkout)
    seconds = time.perf_counter() - started
    subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", name], check=True,
                   capture_output=True, env=child_env(), cwd=checkout)
    return seconds


def warmed_store(folder: Path) -> str:
    """A throw-away MLflow store in `folder` whose tables exist before the clock starts."""
    from mnistlab.tracking import connect

    folder.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store
    connect()  # the store's tables, made before the clock starts
    return store


def split(timeline: Path, wall: float) -> list[Row]:
    """(stage, phase, seconds) in the order they ran, then DVC's share of the rest. A
    revision whose stages write no timeline leaves only DVC's row, the whole wall clock."""
    lines = timeline.read_text().splitlines() if timeline.exists() else []
    records = [json.loads(line) for line in lines]
    phases = [(r["stage"], r["phase"], r["end"] - r["start"]) for r in records]
    spans: dict[str, list[float]] = {}
    for r in records:
        spans.setdefault(r["stage"], []).extend([r["start"], r["end"]])
    in_stages = sum(max(times) - min(times) for times in spans.values())
    return phases + [(DVC_STAGE, "DVC's own work and each stage's Python start",
                      wall - in_stages)]


# --- the baseline's checkout -------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def copy_mnist(worktree: Path) -> None:
    """This checkout's MNIST files into `worktree`, where its download stage finds them valid
    and fetches nothing: the raw files it checks by md5, and the packed copy it would
    otherwise pack again (seconds of gzip no user waits for). Copies, not hard links: DVC
    may make a file it caches read-only, which through a hard link would change this
    checkout's file too. A file this checkout lacks stays missing there too."""
    (worktree / RAW_DIR).mkdir(parents=True, exist_ok=True)
    sources = [*RAW_DIR.iterdir()] if RAW_DIR.is_dir() else []
    for source in [*sources, ARCHIVE]:
        if source.is_file():
            shutil.copy2(source, worktree / source)


def share_dvc_cache(worktree: Path) -> None:
    """Point `worktree`'s DVC at this checkout's cache, as a second checkout would be set
    up: the outputs of its dvc.lock are then found, as the current side's are, and neither
    side's DVC skips or adds work the other does not."""
    dvc = [sys.executable, "-m", "dvc", "cache", "dir"]
    cache = subprocess.run(dvc, check=True, capture_output=True, text=True,
                           env=child_env()).stdout.strip()
    subprocess.run([*dvc, "--local", cache], check=True, capture_output=True,
                   env=child_env(), cwd=worktree)


def remove_worktree(folder: Path) -> None:
    removed = subprocess.run(["git", "worktree", "remove", "--force", str(folder)],
                             capture_output=True).returncode == 0
    shutil.rmtree(folder, ignore_errors=True)  # what git did not remove, or never made
    if not removed:  # git still lists the worktree whose folder is now gone
        subprocess.run(["git", "worktree", "prune"], capture_output=True)


@contextmanager
def baseline_worktree(commit: str) -> Iterator[Path]:
    """A temporary worktree of `commit`, ready to run the pipeline, removed afterwards
    whatever ends the runs (a failed run, Ctrl-C)."""
    folder = Path(tempfile.mkdtemp(prefix="experiment-baseline-"))
    try:
        git("worktree", "add", "--detach", str(folder), commit)
        copy_mnist(folder)
        share_dvc_cache(folder)
        yield folder
    finally:
        remove_worktree(folder)


# --- the runs and their medians ----------------------------------------------------------------


def measure(preset: str, overrides: list[str], repeats: int,
            baselines: list[Revision]) -> list[list[Run]]:
    """`repeats` runs of each side: the baselines in the order given, then the current
    checkout, whose runs come last in the list returned. The sides take turns run by run, so
    that a change in the load beside them (other jobs on a shared CPU) falls on all of them
    rather than on whichever side happened to run during it."""
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as cleanup:
        # Every worktree is entered in `cleanup`: all are removed whatever ends the runs.
        sides = [(f"baseline {baseline.name}",
                  cleanup.enter_context(baseline_worktree(baseline.commit)))
                 for baseline in baselines] + [(CURRENT, Path.cwd())]
        # Folders by position, not by name: the same revision may be given twice.
        folders = [Path(scratch) / f"side-{index}" for index in range(len(sides))]
        stores = [warmed_store(folder) for folder in folders]
        runs: list[list[Run]] = [[] for _ in sides]
        for number in range(1, repeats + 1):
            for (side, checkout), folder, store, side_runs in zip(sides, folders, stores, runs):
                timeline = folder / f"timeline-{number}.jsonl"
                try:
                    wall = run_experiment(preset, overrides, store, timeline, checkout)
                except subprocess.CalledProcessError as err:
                    raise SystemExit(f"{PROG}: error: {side}'s run {number} failed: "
                                     f"dvc {' '.join(err.cmd[3:5])} exited with {err.returncode} "
                                     "(DVC's message is above)") from None
                print(f"{side} run {number}/{repeats}: {wall:.1f} s", file=sys.stderr)
                side_runs.append(Run(wall, split(timeline, wall)))
    return runs


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Each (stage, phase)'s median seconds over the runs that recorded it, in the order the
    phases first ran."""
    seconds: dict[tuple[str, str], list[float]] = {}
    for rows in runs:
        for stage, phase, value in rows:
            seconds.setdefault((stage, phase), []).append(value)
    return [(stage, phase, median(values)) for (stage, phase), values in seconds.items()]


def summarize(runs: list[Run]) -> Summary:
    """The median whole run and the sum of the median training-loop and test-pass phases:
    the same figures the phase table's last line gives, so the two tables agree."""
    whole = median(run.wall for run in runs)
    rows = median_rows([run.rows for run in runs])
    if all(stage == DVC_STAGE for stage, _, _ in rows):
        return Summary(whole, None, "no phases recorded")
    loop = [seconds for _, phase, seconds in rows if phase in LOOP_PHASES]
    if not loop:
        return Summary(whole, None, "no training loop or test pass recorded")
    return Summary(whole, sum(loop))


# --- the tables ----------------------------------------------------------------------------


def table(rows: list[Row], wall: float, heading: str) -> list[str]:
    loop = sum(seconds for _, phase, seconds in rows if phase in LOOP_PHASES)
    lines = [heading, "", "| stage | phase | seconds | share |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {stage} | {phase} | {seconds:.2f} | {seconds / wall:.0%} |"
              for stage, phase, seconds in rows]
    lines += ["", f"Whole `dvc exp run`: {wall:.1f} s; training loop and test pass {loop:.1f} s; "
                  f"fixed cost {wall - loop:.1f} s; whole / loop = {wall / loop:.1f}x."]
    return lines


def ratio(after: float | None, before: float | None) -> str:
    """`after` over `before`, or a dash where either side recorded no phases."""
    return "—" if before is None or after is None else f"{after / before:.2f}x"


def before_after(sides: list[tuple[str, Summary]], heading: str) -> list[str]:
    """The compact table: one row per side, by (label, summary), in the order given, with
    its fixed cost over the first row's (the series so far) and over the row above's (the
    last change alone)."""
    lines = [heading, "",
             "| run | whole run s | training loop and test pass s | fixed cost s "
             "| fixed cost / first row's | fixed cost / row above's |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    first = sides[0][1].fixed
    above = None  # the first row has no row above and is not compared with itself
    for index, (label, summary) in enumerate(sides):
        loop = summary.missing or f"{summary.loop:.1f}"
        fixed = "—" if summary.fixed is None else f"{summary.fixed:.1f}"
        to_first = ratio(summary.fixed, first if index else None)
        lines.append(f"| {label} | {summary.whole:.1f} | {loop} | {fixed} "
                     f"| {to_first} | {ratio(summary.fixed, above)} |")
        above = summary.fixed
    return lines


def current_label() -> str:
    dirty = git("status", "--porcelain") != ""
    return f"current ({git('rev-parse', '--short', 'HEAD')}{' + changes' if dirty else ''})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from benchmarks.common import header
    from mnistlab.config import compose, parse_params
    from mnistlab.runtime import resolve_device

    device = resolve_device(parse_params(compose(args.preset, args.set)).train.device)
    # The checkout as it is when the runs start: what the figures measure.
    labels = [f"baseline {baseline.name} ({git('rev-parse', '--short', baseline.commit)})"
              for baseline in args.baseline] + [current_label()]
    runs = measure(args.preset, args.set, args.repeats, args.baseline)
    command = f"python -m {PROG} --preset {args.preset}" + "".join(
        f" --set {item}" for item in args.set) + "".join(
        f" --baseline {baseline.name}" for baseline in args.baseline)
    if args.repeats > 1:
        command += f" --repeats {args.repeats}"
    runs_text = "one run" if args.repeats == 1 else f"median of {args.repeats} runs"
    alternating = ""
    if args.baseline:
        alternating = ", alternating with the baseline" + ("'s" if len(args.baseline) == 1
                                                           else "s'")
    current = runs[-1]
    blocks = {f"experiment-{device.type}": table(
        median_rows([run.rows for run in current]), median(run.wall for run in current),
        header(device, command, runs_text + alternating))}
    if args.baseline:
        blocks[f"experiment-{device.type}-before-after"] = before_after(
            [(label, summarize(side_runs)) for label, side_runs in zip(labels, runs)],
            header(device, command, f"{runs_text} of each side, alternating"))
    print("\n\n".join("\n".join(lines) for lines in blocks.values()))
    if args.readme:
        doc_blocks.update(blocks)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
