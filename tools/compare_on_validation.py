"""Models compared on the validation split, and the table read back from the runs.

    python -m tools.compare_on_validation I3_layout --jobs 2    (`make compare COMPARISON=I3_layout`)
    python -m tools.compare_on_validation I3_layout --report --readme

A comparison is a file of conf/comparisons/: the random seeds, the number of training images
held out for validation, and the candidates, each a preset plus `dvc exp run -S` overrides.
Every (candidate, seed) is one DVC experiment (`--temp`), trained on the other training
images and scored on the held-out ones, never on the test set, and its MLflow run is tagged
with the comparison, the candidate and a digest of what the candidate was. The table comes
from those runs alone, in any clone whose store holds them: the final validation accuracy
per seed, the mean and standard deviation, and each candidate against the first (the
reference) seed for seed, as the mean of the paired differences and its standard error. A
gap within two standard errors is "no difference". Runs that already exist are not run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mnistlab.config import CONF_DIR, ParamsError, compose, echo, parse_params
from mnistlab.geometry import parameter_count
from mnistlab.signals import raise_keyboard_interrupt
from tools import doc_blocks
from tools.cli import OneLineParser, whole_number
from tools.repeat_stats import group_stats

COMPARISONS_DIR = CONF_DIR / "comparisons"
COMPARISON_TAG, CANDIDATE_TAG, DIGEST_TAG = "comparison", "comparison_candidate", "comparison_digest"
METRIC = "val_accuracy"


class ComparisonError(ValueError):
    """A comparison file that cannot be run: the message names the file and what is wrong."""


@dataclass(frozen=True)
class Candidate:
    name: str
    preset: str
    overrides: tuple[str, ...]  # `-S` overrides, the seed and the validation split included
    parameters: int
    digest: str                 # of the composed params: a changed candidate is a new one


@dataclass(frozen=True)
class Comparison:
    name: str
    path: Path
    seeds: tuple[int, ...]
    validation: int
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class Score:
    """One finished run of a comparison, as MLflow keeps it."""

    candidate: str
    seed: int
    accuracy: float  # the last epoch's validation accuracy
    device: str
    torch_version: str
    run_id: str


def comparison_names(directory: Path = COMPARISONS_DIR) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.yaml"))


def load(name: str, directory: Path = COMPARISONS_DIR) -> Comparison:
    """The comparison `name`, every candidate composed and validated as `dvc exp run` would,
    so that a typo fails here, in one line, before any run starts."""
    known = comparison_names(directory)
    if name not in known:
        raise ComparisonError(f"comparison {echo(name)} does not exist; the comparisons are "
                              f"{', '.join(known) or 'none'} ({directory}/)")
    path = directory / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text()) or {}
    seeds, validation, candidates = spec.get("seeds"), spec.get("validation"), spec.get("candidates")
    if not (isinstance(seeds, list) and seeds and all(type(s) is int and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ComparisonError(f"{path}: seeds = {echo(seeds)}: should be a list of distinct "
                              "whole numbers of at least 0")
    if not (type(validation) is int and validation > 0):
        raise ComparisonError(f"{path}: validation = {echo(validation)}: should be the number "
                              "of training images held out to score the runs (at least 1)")
    if not (isinstance(candidates, dict) and len(candidates) >= 2):
        raise ComparisonError(f"{path}: candidates: should name at least two candidates, each "
                              "with a preset and a list of overrides (set)")
    built = []
    for key, candidate in candidates.items():
        candidate = candidate or {}
        preset, overrides = candidate.get("preset"), candidate.get("set", [])
        if not (isinstance(overrides, list) and all(isinstance(item, str) for item in overrides)):
            raise ComparisonError(f"{path}: candidate {key}: set = {echo(overrides)}: should be "
                                  "a list of KEY=VALUE overrides")
        try:
            composed = compose(str(preset), [*overrides, f"train.validation={validation}"])
            params = parse_params(composed)
        except ParamsError as err:
            raise ComparisonError(f"{path}: candidate {key}: {err}") from None
        # The composed params, not the file's words: an edit to the preset is a new candidate.
        digest = hashlib.sha256(json.dumps(composed, sort_keys=True).encode()).hexdigest()
        built.append(Candidate(str(key), str(preset), (f"preset={preset}", *overrides,
                                                       f"train.validation={validation}"),
                               parameter_count(params.model), digest[:16]))
    return Comparison(name, path, tuple(seeds), validation, tuple(built))


def experiment_name(comparison: Comparison, candidate: Candidate, seed: int) -> str:
    return f"{comparison.name}-{candidate.name}-s{seed}"


def finished_scores(client, experiment_id: str, comparison: Comparison) -> list[Score]:
    """The newest finished run of each (candidate, seed) whose candidate is still the one the
    file describes (its digest); older and changed candidates' runs are left out."""
    digests = {candidate.name: candidate.digest for candidate in comparison.candidates}
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.{COMPARISON_TAG} = '{comparison.name}' "
                                            "and attributes.status = 'FINISHED'")
    scores: dict[tuple[str, int], Score] = {}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        name, seed = tags.get(CANDIDATE_TAG), int(run.data.params.get("base.seed", -1))
        if (digests.get(name) != tags.get(DIGEST_TAG) or seed not in comparison.seeds
                or METRIC not in metrics or (name, seed) in scores):
            continue
        scores[name, seed] = Score(name, seed, metrics[METRIC], tags.get("device", "?"),
                                   tags.get("torch_version", "?"), run.info.run_id)
    return list(scores.values())


def table(comparison: Comparison, scores: Sequence[Score], command: str) -> list[str]:
    """The comparison as markdown: a first line naming what was scored, on which devices and
    torch builds, and the command; one row per candidate."""
    by = {(s.candidate, s.seed): s for s in scores}
    reference = comparison.candidates[0]
    devices = ", ".join(sorted({s.device for s in scores})) or "no runs yet"
    torches = ", ".join(sorted({s.torch_version for s in scores})) or "-"
    lines = [f"Comparison `{comparison.name}` ({comparison.path}): "
             f"final validation accuracy on the last {comparison.validation:,} training images, "
             f"trained on the others; on {devices}, torch {torches} (`{command}`)", "",
             "| candidate | parameters | " + " | ".join(f"seed {s}" for s in comparison.seeds)
             + f" | mean +- sd | against {reference.name}, seed for seed |",
             "| --- | ---: | " + " | ".join("---:" for _ in comparison.seeds) + " | ---: | --- |"]
    for candidate in comparison.candidates:
        values = [by.get((candidate.name, seed)) for seed in comparison.seeds]
        cells = [f"{v.accuracy:.2%}" if v else "-" for v in values]
        done = [v.accuracy for v in values if v]
        stats = group_stats(done) if done else None
        spread = (f"{stats['mean']:.2%} +- {stats['sd'] * 100:.2f} pt" if stats and stats["sd"] is not None
                  else f"{stats['mean']:.2%} (n = 1)" if stats else "-")
        against = ("reference" if candidate is reference
                   else paired(comparison, by, reference.name, candidate.name))
        lines.append(f"| {candidate.name} | {candidate.parameters:,} | {' | '.join(cells)} | "
                     f"{spread} | {against} |")
    return lines


def paired(comparison: Comparison, by: dict, reference: str, name: str) -> str:
    """The mean paired difference (candidate minus reference) over the seeds both have, its
    standard error, and the verdict: ahead or behind beyond two standard errors, else none."""
    differences = [by[name, s].accuracy - by[reference, s].accuracy for s in comparison.seeds
                   if (name, s) in by and (reference, s) in by]
    if len(differences) < 2:
        return f"needs two seeds of both (has {len(differences)})"
    stats = group_stats(differences)
    mean, sem = stats["mean"], stats["sem"]
    verdict = "no difference" if abs(mean) <= 2 * sem else "ahead" if mean > 0 else "behind"
    points = round(mean * 100, 2) or 0.0  # a gap that rounds to zero prints as +0.00, not -0.00
    return f"{points:+.2f} pt +- {sem * 100:.2f} pt: {verdict}"


def run_missing(comparison: Comparison, client, experiment_id: str, jobs: int) -> list[str]:
    """Run every (candidate, seed) the store does not have yet; the names of those that failed."""
    from mnistlab import tracking
    from tools.repeats import experiment_command, run_experiments

    have = {(s.candidate, s.seed) for s in finished_scores(client, experiment_id, comparison)}
    commands, envs = {}, {}
    for candidate in comparison.candidates:
        for seed in comparison.seeds:
            if (candidate.name, seed) in have:
                continue
            name = experiment_name(comparison, candidate, seed)
            commands[name] = experiment_command(name, [*candidate.overrides, f"base.seed={seed}"])
            envs[name] = {tracking.RUN_TAGS_ENV: json.dumps({
                COMPARISON_TAG: comparison.name, CANDIDATE_TAG: candidate.name,
                DIGEST_TAG: candidate.digest})}
    print(f"{comparison.name}: running {', '.join(commands) or 'nothing (every run exists)'}")
    return run_experiments(commands, jobs, envs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="tools.compare_on_validation", description=__doc__.split("\n")[0])
    parser.add_argument("comparison", help="a name from conf/comparisons/")
    parser.add_argument("--jobs", type=whole_number(1, 64), default=1, help="experiments run at once (1 to 64)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: print the table from the runs the store has")
    parser.add_argument("--readme", action="store_true",
                        help="also write the table into its block validation-<comparison>")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        comparison = load(args.comparison)
    except ComparisonError as err:
        sys.exit(f"tools.compare_on_validation: error: {err}")
    from mnistlab import tracking

    try:
        experiment_id = tracking.connect()
    except tracking.TrackingError as err:
        sys.exit(f"tools.compare_on_validation: error: {err}")
    client = tracking.client()
    if not args.report:
        signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
        try:
            failed = run_missing(comparison, client, experiment_id, args.jobs)
        except KeyboardInterrupt as err:
            sys.exit(f"tools.compare_on_validation: {err or 'interrupted by Ctrl-C'}; finished "
                     "runs are kept and the same command runs only the missing ones")
        if failed:
            sys.exit(f"tools.compare_on_validation: {', '.join(failed)} failed; the same "
                     "command runs only the missing ones")
    lines = table(comparison, finished_scores(client, experiment_id, comparison),
                  f"python -m tools.compare_on_validation {comparison.name} --report")
    print("\n".join(lines))
    if args.readme:
        doc_blocks.update({f"validation-{comparison.name}": lines})


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
