"""The README's results table, generated from the DVC experiments (never typed by hand).

    python -m benchmarks.results_table            # print the table
    python -m benchmarks.results_table --readme   # also rewrite it (and the default run) in README.md
    python -m benchmarks.results_table --default-only --readme   # just the default run's line

Reads `dvc exp show --json`: for every experiment named after a preset (I0..I3,
seed000..seed003) it takes the measured parameter count, final and best test accuracy,
epochs, device and training time from the files the pipeline wrote, and sets them beside
what the seed's README reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import readme

# What each seed's README claims: (parameters, test accuracy, where the figure comes from).
REPORTED = {
    "I0": (18_060, 0.980, "seed 004 changelog, I0"),
    "I1": (20_978, 0.996, "seed 004 changelog, I1"),
    "I2": (19_494, 0.996, "seed 004 changelog, I2"),
    "I3": (14_500, 0.996, "seed 004 changelog, I3"),
    "seed000": (16_034, 0.9941, "best epoch (15) of its log"),
    "seed001": (7_776, 0.9944, "best epoch (10) of its log"),
    "seed002": (13_034, 0.994, "\"above 99.4%\", no log"),
    "seed003": (15_440, 0.9954, "best epoch (18) of its log"),
}


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


def rows(found: dict[str, dict]) -> list[str]:
    lines = ["| experiment | parameters (reported) | final test acc | best test acc (epoch) | "
             "reported | final - reported | epochs | random seed | device | train time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, (params, accuracy, source) in REPORTED.items():
        data = found.get(name)
        if data is None:
            lines.append(f"| {name} | ({params:,}) | not run | | {accuracy:.2%} | | | | | |")
            continue
        train = file_data(data, "metrics", "reports/train_metrics.json")
        final = file_data(data, "metrics", "reports/metrics.json").get("test_accuracy")
        gap = (final - accuracy) * 100 if final is not None else None
        seed = file_data(data, "params", "params.yaml").get("base", {}).get("seed", "?")
        lines.append(
            f"| {name} | {train.get('params', 0):,} ({params:,}) | {_pct(final)} | "
            f"{_pct(train.get('best_test_accuracy'))} ({train.get('best_epoch', '?')}) | "
            f"{accuracy:.2%} ({source}) | "
            f"{'' if gap is None else f'{gap:+.2f} pt'} | {train.get('epochs', '?')} | {seed} | "
            f"{train.get('device', '?')} | {train.get('train_seconds', 0):.0f} s |")
    return lines


def default_run() -> list[str]:
    """The workspace's own run (what `make repro` on params.yaml produced)."""
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
        f"{train['train_seconds']:.0f} s ({train['images_per_second']:,} images/s){to_target} "
        f"on {train['device']}.",
    ]


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--default-only", action="store_true",
                        help="only the workspace's own run (needs no DVC experiments)")
    args = parser.parse_args()
    if args.default_only:
        default = default_run()
        print("\n".join(default))
        if args.readme:
            readme.update({"default": default})
        return
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", "-A"]
    show = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    table = rows(experiments(show))
    default = default_run()
    print("\n".join(default + [""] + table))
    if args.readme:
        readme.update({"results": table, "default": default})


if __name__ == "__main__":
    main()
