"""The README's results table and figure, from DVC experiments and their MLflow runs only.

    python -m tools.results_table                # print the table
    python -m tools.results_table --readme       # also record it and rewrite README.md
    python -m tools.results_table --check I1 I3  # re-derive recorded rows from their MLflow runs
    python -m tools.results_table --default-only --readme   # just the default run's line

Reads `dvc exp show --json -A`. Every experiment named `<preset>-s<seed>` (what
`make iterations` / `make readmes` queue, tools/repeats.py) is one repeat of its preset; a
name run twice counts once, its newest run. Each repeat is traced to its MLflow run: the
newest FINISHED run tagged with the experiment's name (`dvc_exp_name`) whose
final_test_accuracy is the one DVC shows, so that a run of the same name from another commit
is not taken. A repeat whose run is not in the store is left out of its group, said in one
line. Each preset's group is summarised and, with `--readme`, recorded in
reports/results.json (committed), where it replaces that preset's earlier group and leaves
every other preset's as it was: groups run in different clones or on different machines (a
GPU box, a CPU) add up to one table. A recorded group keeps, per seed, the final test
accuracy, the best epoch, the MLflow run id, the device, the torch version, the experiment's
baseline commit and the DVC experiment's name; the table and the figure draw only groups with
these records, and compute every number from them (a group without, such as one typed in,
reads as having no recorded runs). A recorded group also keeps a digest of the model and
training params it ran with; when the preset has changed since, its row says so.

Per preset the table gives the final-epoch test accuracy over the repeats (n, mean, sample
standard deviation, min to max), the mean best epoch, and what the source README reports
(conf/reported.yaml) or, for the presets `make search` writes, the accuracy its winner should
reach (benchmarks/search_targets.yaml).

The verdict. A source's figure is read as printed ("99.6%"): a rounded number, it stands for
every accuracy that rounds to it (99.55% to 99.65%). A mean at or above the low end of that
range is "reproduced"; under it by less than two standard errors of the mean (sd / sqrt(n))
is "no difference", with the gap given (the repeats cannot tell the mean from the figure);
further under, "short", by points and standard errors. A search's target is a threshold,
not a rounded figure: "met" when the mean reaches it, "no difference" within two standard
errors under it, else short.
With fewer than two repeats there is no spread, so no verdict. A preset with fewer repeats
than `--repeats` is marked incomplete.

The figure (reports/results.png): mean final accuracy with +-1 sd error bars against
parameters, one point per preset, the reported figures drawn beside them, from the same
groups as the table.

`--check PRESET...` re-derives recorded rows: it reads each stored run back from the MLflow
store this clone points at, compares its final test accuracy and best epoch with the stored
ones, recomputes the group's statistics from the runs and compares them with the stored
ones; one line per seed, a verdict per preset, and a non-zero exit status when anything
differs or a run is not in the store.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from mnistlab.config import echo
from mnistlab.files import write_atomic, write_json
from tools import doc_blocks
from tools.repeat_stats import group_stats

REPORTED_FILE = Path("conf/reported.yaml")
TARGETS_FILE = Path("benchmarks/search_targets.yaml")  # what the search's winners should reach
FIGURE = Path("reports/results.png")
LEDGER = Path("reports/results.json")  # every preset's latest recorded group
REPEAT_NAME = re.compile(r"^(?P<preset>[\w.]+)-s(?P<seed>\d+)$")


# A figure as a README prints it: "99.6%", "99.24%", or ">99.4%" for a bound ("above 99.4%").
PRINTED = re.compile(r"^(?P<bound>>)?(?P<number>\d{1,3}(?:\.(?P<decimals>\d+))?)%$")
# Gaps under this many standard errors of the mean are no difference.
NO_DIFFERENCE_SE = 2.0


def printed_figure(text: str) -> tuple[float, float]:
    """'99.6%' -> (0.996, 0.0005): the accuracy and half its last printed digit, the most
    rounding can have moved it. A bound ('>99.4%') is exact: (0.994, 0.0)."""
    match = PRINTED.match(str(text).strip())
    if not match:
        raise ValueError(f"{REPORTED_FILE}: {text!r} should be a percentage as the README "
                         f"prints it, e.g. \"99.6%\" (or \">99.4%\" for a bound)")
    rounding = 0.0 if match["bound"] else 0.5 * 10 ** -len(match["decimals"] or "") / 100
    return float(match["number"]) / 100, rounding


def reported() -> dict[str, dict]:
    """conf/reported.yaml, each `final` and `best` read as printed: `final` becomes the number,
    `printed` keeps the text and `rounding` its half-width."""
    figures = yaml.safe_load(REPORTED_FILE.read_text())
    for claim in figures.values():
        claim["printed"] = claim["final"]
        claim["final"], claim["rounding"] = printed_figure(claim["final"])
        if "best" in claim:
            claim["best"], _ = printed_figure(claim["best"])
    return figures


def claims() -> dict[str, dict]:
    """Every figure a preset is held to: what its source reports, or a search's target."""
    targets = {name: {**claim, "target": True, "printed": f"{claim['final']:.2%}", "rounding": 0.0}
               for name, claim in yaml.safe_load(TARGETS_FILE.read_text()).items()}
    return {**reported(), **targets}


def experiments(show: list) -> dict[str, dict]:
    """{experiment name: its params and metrics, newest run of that name}; queued, running
    and failed ones are left out (DVC shows them with their baseline's metrics)."""
    found: dict[str, dict] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            executor = node.get("executor") or {}
            if executor.get("state") not in (None, "success"):
                return
            data = node.get("data")
            name = node.get("name")
            if name and isinstance(data, dict) and data.get("metrics"):
                # A name run again (on a later commit too) shows its newest run.
                if name not in found or data.get("timestamp", "") > found[name].get("timestamp", ""):
                    found[name] = data
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(show)
    return found


def file_data(data: dict, section: str, path: str) -> dict:
    return (data.get(section, {}).get(path) or {}).get("data") or {}


@dataclass(frozen=True)
class Repeat:
    """One finished run of a preset with one random seed: what DVC shows of it, and, once
    traced to its MLflow run (`traced`), which run that is."""

    seed: int
    final: float        # final-epoch test accuracy
    best_epoch: int
    parameters: int
    epochs: int
    device: str
    name: str = ""      # the DVC experiment, `<preset>-s<seed>`
    run_id: str | None = None
    torch_version: str | None = None
    git_commit: str | None = None  # the experiment's baseline commit


def repeats_by_preset(found: dict[str, dict]) -> dict[str, list[Repeat]]:
    groups: dict[str, list[Repeat]] = {}
    for name, data in found.items():
        match = REPEAT_NAME.match(name)
        train = file_data(data, "metrics", "reports/train_metrics.json")
        final = file_data(data, "metrics", "reports/metrics.json").get("test_accuracy")
        if not match or final is None or not train:
            continue
        groups.setdefault(match["preset"], []).append(Repeat(
            seed=int(match["seed"]), final=final, best_epoch=train["best_epoch"],
            parameters=train["params"], epochs=train["epochs"],
            # runs recorded before `describe` said "1 thread" carry "(1 threads)"
            device=train["device"].replace("(1 threads)", "(1 thread)"), name=name))
    return {preset: sorted(runs, key=lambda r: r.seed) for preset, runs in groups.items()}


# --- each repeat's MLflow run --------------------------------------------------------------

FINAL_METRIC = "final_test_accuracy"  # what the evaluate stage logs of the final model


def find_run(client, experiment_id: str, repeat: Repeat):
    """The newest FINISHED run of the repeat's DVC experiment whose final test accuracy is the
    one DVC shows, or None. A run of the same name from another commit (the same name run
    there too) or one stopped before the end is not it."""
    runs = client.search_runs(
        [experiment_id], order_by=["attributes.start_time DESC"],
        filter_string=f"tags.dvc_exp_name = '{repeat.name}' and attributes.status = 'FINISHED'")
    return next((run for run in runs if run.data.metrics.get(FINAL_METRIC) == repeat.final), None)


def traced(groups: dict[str, list[Repeat]], client, experiment_id: str,
           store: str) -> dict[str, list[Repeat]]:
    """`groups` with each repeat's run id, torch version and baseline commit from its MLflow
    run; a repeat whose run is not in `store` is left out, said in one line, and a preset
    left with none has no group."""
    found: dict[str, list[Repeat]] = {}
    for preset, repeats in groups.items():
        for repeat in repeats:
            run = find_run(client, experiment_id, repeat)
            if run is None:
                print(f"tools.results_table: {repeat.name} left out of {preset}'s group: no "
                      f"FINISHED run in {store} tagged dvc_exp_name={repeat.name} with "
                      f"{FINAL_METRIC} {repeat.final!r}", file=sys.stderr)
                continue
            tags = run.data.tags
            found.setdefault(preset, []).append(replace(
                repeat, device=with_precision(repeat.device, tags.get("precision")),
                run_id=run.info.run_id, torch_version=tags.get("torch_version"),
                git_commit=tags.get("dvc_exp_baseline_rev") or tags.get("git_commit")))
    return found


def with_precision(device: str, tag: str | None) -> str:
    """The device with the precision the run trained in, from its MLflow tag `precision`
    (mnistlab.runtime: "auto chose bf16: ..." or "fp32: set by train.precision"), e.g.
    "cpu: AMD EPYC, AVX512 (1 thread), bf16"; runs tagged before it existed: the device."""
    match = re.match(r"(?:auto chose )?(fp32|bf16)\b", tag or "")
    return f"{device}, {match[1]}" if match else device


def recorded_repeats(found: dict[str, dict]) -> dict[str, list[Repeat]]:
    """The repeats among DVC's experiments (`experiments()`), each traced to its run in the
    MLflow store this clone points at (mnistlab.tracking)."""
    groups = repeats_by_preset(found)
    if not groups:
        return {}
    from mnistlab import tracking

    experiment_id = tracking.connect()
    return traced(groups, tracking.client(), experiment_id, tracking.redact(tracking.tracking_uri()))


# --- groups: recorded, and drawn from their records ----------------------------------------


def summary(finals: list[float], best_epochs: list[int], devices: list[str]) -> dict:
    """One preset's group: what the table and the figure show of it (its final accuracies'
    statistics as tools.repeats logs them to MLflow)."""
    return {**group_stats(finals), "best_epoch": statistics.fmean(best_epochs),
            "devices": sorted(set(devices))}


def summarize(runs: list[Repeat]) -> dict:
    return {**summary([run.final for run in runs], [run.best_epoch for run in runs],
                      [run.device for run in runs]),
            "parameters": runs[0].parameters, "epochs": runs[0].epochs}


def per_seed(run: Repeat) -> dict:
    """A repeat as its group records it: enough to find the run again and re-derive the row."""
    return {"seed": run.seed, "final_test_accuracy": run.final, "best_epoch": run.best_epoch,
            "run_id": run.run_id, "device": run.device, "torch_version": run.torch_version,
            "git_commit": run.git_commit, "dvc_exp_name": run.name}


def group_record(runs: list[Repeat]) -> dict:
    """A group as reports/results.json keeps it: its summary and its per-seed records."""
    return {**summarize(runs), "runs": [per_seed(run) for run in runs]}


@functools.cache  # record() and changed_since() ask for the same presets: compose each once
def preset_digest(preset: str) -> str:
    """A digest of the model and training params `dvc exp run -S preset=NAME` trains with
    (the random seed, which a group varies, is in `base`, not here)."""
    from mnistlab.config import compose

    params = compose(preset)
    recipe = json.dumps({"model": params["model"], "train": params["train"]}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def load_ledger(path: Path = LEDGER) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def record(ledger: dict[str, dict], groups: dict[str, list[Repeat]]) -> dict[str, dict]:
    """`ledger` with each preset of `groups` replaced by its new group and digest."""
    return {**ledger, **{preset: {**group_record(runs), "digest": preset_digest(preset)}
                         for preset, runs in groups.items()}}


def has_runs(group: dict) -> bool:
    """Whether a recorded group keeps its per-seed records, each naming its MLflow run."""
    runs = group.get("runs")
    return bool(runs) and all(run.get("run_id") for run in runs)


def drawn(ledger: dict[str, dict]) -> dict[str, dict]:
    """The groups the table and the figure show: those with per-seed records, their numbers
    computed from those records alone (whatever the group's own fields say)."""
    return {preset: {**group, **summary([run["final_test_accuracy"] for run in group["runs"]],
                                        [run["best_epoch"] for run in group["runs"]],
                                        [run["device"] for run in group["runs"]])}
            for preset, group in ledger.items() if has_runs(group)}


def changed_since(ledger: dict[str, dict]) -> set[str]:
    """The presets whose params differ from those their recorded group ran with (or that
    are gone)."""
    from mnistlab.config import ParamsError

    def current(preset: str) -> str | None:
        try:
            return preset_digest(preset)
        except ParamsError:
            return None

    return {preset for preset, group in ledger.items() if group.get("digest") != current(preset)}


def verdict(stats: dict, target: float, rounding: float = 0.0, is_target: bool = False) -> str:
    """Reproduced (or met), no difference, or short: see the module's docstring. `rounding`
    is how far the printed figure may sit from the accuracy it rounds."""
    if stats["sem"] is None:
        return "no verdict (n < 2)"
    low = target - rounding
    if stats["mean"] >= low:
        return "met" if is_target else "reproduced"
    gap = low - stats["mean"]
    points = f"{gap * 100:.2f} pt" if gap >= 0.00005 else "less than 0.01 pt"
    under = f"{points} under{' its rounding' if rounding else ''}"
    if not stats["sem"]:
        return f"short: {under}"
    within = f"{under} ({gap / stats['sem']:.1f} SE)"
    if gap < NO_DIFFERENCE_SE * stats["sem"]:
        return f"no difference from the target: {within}" if is_target else f"no difference: {within}"
    return f"short: {within}"


# What a preset's row and point say when none of its runs is drawn: never run, or run only in
# groups that kept no per-seed records.
NO_RUNS = "no recorded runs"


def rows(ledger: dict[str, dict], claims: dict[str, dict], planned: int,
         changed: set[str] = frozenset()) -> list[str]:
    """The table: one row per claim, from its preset's recorded runs (`drawn`), if any."""
    groups = drawn(ledger)
    lines = ["| preset | parameters | epochs | n | final test acc, mean +- sd | min to max | "
             "mean best epoch | reported or target (final) | verdict | device |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for preset, claim in claims.items():
        stats = groups.get(preset)
        target = f"{claim['printed']} ({claim['source']})"
        if not stats:
            lines.append(f"| {preset} | ({claim['parameters']:,}) | | 0 | "
                         f"{NO_RUNS} | | | {target} | | |")
            continue
        n = f"{stats['n']}" if stats["n"] >= planned else f"{stats['n']} of {planned} (incomplete)"
        spread = "" if stats["sd"] is None else f" +- {stats['sd'] * 100:.2f} pt"
        stale = "; the preset has changed since these runs" if preset in changed else ""
        lines.append(
            f"| {preset} | {stats['parameters']:,} | {stats['epochs']} | {n} | "
            f"{stats['mean']:.2%}{spread} | {stats['min']:.2%} to {stats['max']:.2%} | "
            f"{stats['best_epoch']:.1f} | {target} | "
            f"{verdict(stats, claim['final'], claim['rounding'], bool(claim.get('target')))}{stale} | "
            f"{', '.join(stats['devices'])} |")
    return lines


def plot(ledger: dict[str, dict], claims: dict[str, dict], path: Path = FIGURE) -> None:
    """Each claim, and beside it its preset's recorded runs (`drawn`), if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = drawn(ledger)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    labelled: dict[tuple, int] = {}  # presets held to the same figure get stacked labels
    for preset, claim in claims.items():
        ax.scatter(claim["parameters"], claim["final"] * 100, zorder=2,
                   **({"marker": "+", "color": "tab:orange"} if claim.get("target") else
                      {"marker": "x", "color": "grey"}))
        stats = groups.get(preset)
        if stats:
            ax.errorbar(stats["parameters"], stats["mean"] * 100, yerr=(stats["sd"] or 0) * 100,
                        fmt="o", capsize=4, color="tab:blue", zorder=3)
            label = f"{preset} (n={stats['n']})"
        else:
            label = f"{preset} ({NO_RUNS})"
        where = (claim["parameters"], claim["final"])
        labelled[where] = labelled.get(where, -1) + 1
        ax.annotate(label, (claim["parameters"], claim["final"] * 100), fontsize=8,
                    textcoords="offset points", xytext=(6, 4 + 10 * labelled[where]))
    devices = sorted({device for stats in groups.values() for device in stats["devices"]})
    ax.scatter([], [], marker="x", color="grey", label="reported by the source")
    if any(claim.get("target") for claim in claims.values()):
        ax.scatter([], [], marker="+", color="tab:orange", label="a search's target")
    ax.errorbar([], [], yerr=[], fmt="o", capsize=4, color="tab:blue",
                label="measured: mean +- sd of the final epoch")
    ax.set(xlabel="parameters", ylabel="test accuracy (%)",
           title="Measured and reported MNIST test accuracy"
                 + (f"\n{textwrap.fill('measured on ' + ', '.join(devices), 80)}" if devices else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


# --- re-deriving recorded rows from their runs ---------------------------------------------

# The group statistics a recorded row shows; `--check` recomputes each from the runs.
GROUP_STATS = ("n", "mean", "sd", "sem", "min", "max", "best_epoch")


def check_refusal(ledger: dict[str, dict], presets: list[str]) -> str | None:
    """One line refusing the first preset `--check` cannot re-derive, or None."""
    allowed = sorted(preset for preset, group in ledger.items() if has_runs(group))
    choices = (f"the presets with recorded runs are {', '.join(allowed)}" if allowed else
               "no preset there has recorded runs yet (`make results` records them)")
    for preset in presets:
        if preset not in ledger:
            return f"--check {echo(preset)}: no such preset in {LEDGER}; {choices}"
        if not has_runs(ledger[preset]):
            return (f"--check {echo(preset)}: its group in {LEDGER} has no per-seed runs to "
                    f"re-derive; {choices}")
    return None


def best_epoch_of(client, run) -> int | None:
    """The run's best epoch as the train stage picks it (the first epoch with the highest
    held-out accuracy), from its logged `best_epoch` or its per-epoch accuracies; None when
    it has neither."""
    if "best_epoch" in run.data.metrics:
        return int(run.data.metrics["best_epoch"])
    for score in ("val_accuracy", "test_accuracy"):  # the train stage logs one of the two
        if score in run.data.metrics:
            history = sorted(client.get_metric_history(run.info.run_id, score),
                             key=lambda metric: metric.step)
            return max(history, key=lambda metric: metric.value).step
    return None


def check_group(client, preset: str, group: dict) -> bool:
    """Print one line per stored seed and one for the group's statistics; whether every
    stored value is the one its run gives."""
    from mlflow.exceptions import MlflowException

    finals, best_epochs, ok = [], [], True
    for stored in group["runs"]:
        label = f"{preset} seed {stored['seed']} ({stored['dvc_exp_name']}, run {stored['run_id']})"
        try:
            run = client.get_run(stored["run_id"])
        except MlflowException:
            print(f"{label}: run not in this store")
            ok = False
            continue
        final, best = run.data.metrics.get(FINAL_METRIC), best_epoch_of(client, run)
        differs = []
        if final != stored["final_test_accuracy"]:
            differs.append(f"final test accuracy: stored {stored['final_test_accuracy']!r}, "
                           f"run {final!r}")
        if best is not None and best != stored["best_epoch"]:
            differs.append(f"best epoch: stored {stored['best_epoch']!r}, run {best!r}")
        if differs:
            print(f"{label}: differs: {'; '.join(differs)}")
            ok = False
        else:
            print(f"{label}: match (final test accuracy {final!r}, best epoch "
                  f"{best if best is not None else 'not logged by the run'})")
        finals.append(final)
        best_epochs.append(best if best is not None else stored["best_epoch"])
    lacking = len(group["runs"]) - len(finals) + finals.count(None)
    if lacking:
        print(f"{preset} group statistics: not recomputed: {lacking} of {len(group['runs'])} "
              f"runs give no final test accuracy here")
        return False
    recomputed = {**group_stats(finals), "best_epoch": statistics.fmean(best_epochs)}
    differs = [f"{key}: stored {group.get(key)!r}, from the runs {recomputed[key]!r}"
               for key in GROUP_STATS if group.get(key) != recomputed[key]]
    if differs:
        print(f"{preset} group statistics: differ: {'; '.join(differs)}")
        return False
    print(f"{preset} group statistics: match ({', '.join(GROUP_STATS)})")
    return ok


def check(ledger: dict[str, dict], presets: list[str]) -> bool:
    """Re-derive each preset's recorded row from the MLflow store this clone points at;
    whether every one matches."""
    from mnistlab import tracking

    tracking.connect()
    store, client = tracking.redact(tracking.tracking_uri()), tracking.client()
    matched = True
    for preset in presets:
        if check_group(client, preset, ledger[preset]):
            print(f"{preset}: re-derived: every stored value matches its run in {store}")
        else:
            print(f"{preset}: NOT re-derived from {store}: see the lines above")
            matched = False
    return matched


def has_default_run() -> bool:
    return Path("reports/train_metrics.json").exists()


def default_run() -> list[str]:
    """The workspace's own run (what `make repro` on params.yaml produced)."""
    if not has_default_run():
        return ["No default run in this workspace yet (`make repro` makes one)."]
    train = json.loads(Path("reports/train_metrics.json").read_text())
    final = json.loads(Path("reports/metrics.json").read_text())
    preset = json.loads(Path("reports/model_report.json").read_text())["preset"]
    if train.get("target_accuracy") is None:  # reports written before the stage measured it
        to_target = ""
    elif train["seconds_to_target"] is None:
        to_target = f"; {train['target_accuracy']:.1%} test accuracy never reached"
    else:
        to_target = (f"; {train['target_accuracy']:.1%} test accuracy first reached after epoch "
                     f"{train['epoch_to_target']}, {train['seconds_to_target']:.0f} s")
    return [
        f"Default run (`make repro`, params.yaml = preset {preset}): final test accuracy "
        f"**{final['test_accuracy']:.2%}** ({final['test_errors']} errors of 10,000), best "
        f"{train['best_test_accuracy']:.2%} at epoch {train['best_epoch']} of "
        f"{train['epochs']}; {train['params']:,} parameters; training loop "
        f"{train['train_seconds']:.0f} s ({train['epoch_images_per_second']:,} training images/s, "
        f"test passes included){to_target} "
        f"on {train['device']}{', ' + train['precision'] if 'precision' in train else ''}.",
    ]


def with_store(work, *args):
    """`work(*args)`, which reads the MLflow store; a store it cannot reach stops the command
    in one line."""
    from mnistlab.tracking import TrackingError

    try:
        return work(*args)
    except TrackingError as err:
        sys.exit(f"tools.results_table: error: {err}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.results_table", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats a preset should have; fewer is marked incomplete")
    parser.add_argument("--default-only", action="store_true",
                        help="only the workspace's own run (needs no DVC experiments)")
    parser.add_argument("--check", nargs="+", metavar="PRESET",
                        help=f"re-derive these presets' rows in {LEDGER} from their MLflow runs")
    args = parser.parse_args(argv)
    if args.check:
        refusal = ("--check re-derives recorded rows and writes nothing: leave out --readme and "
                   "--default-only" if args.readme or args.default_only
                   else check_refusal(load_ledger(), args.check))
        if refusal:
            parser.exit(2, f"tools.results_table: error: {refusal}\n")
        sys.exit(0 if with_store(check, load_ledger(), args.check) else 1)
    if args.default_only:
        default = default_run()
        print("\n".join(default))
        if args.readme and not has_default_run():
            sys.exit("tools.results_table: no default run here to write (`make repro` makes one); "
                     "README.md is left as it is")
        if args.readme:
            doc_blocks.update({"default": default})
        return
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", "-A"]
    show = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    # This clone's groups on top of those recorded before (here or elsewhere).
    found = with_store(recorded_repeats, experiments(show))
    groups, held_to = record(load_ledger(), found), claims()
    table = rows(groups, held_to, args.repeats, changed_since(groups))
    plot(groups, held_to)
    default = default_run()
    print("\n".join(default + [""] + table + ["", f"figure: {FIGURE}"]))
    if args.readme:
        write_json(LEDGER, groups)
        # A clone without a default run of its own keeps the README's line as it is.
        doc_blocks.update({"results": table, **({"default": default} if has_default_run() else {})})


if __name__ == "__main__":
    main()
