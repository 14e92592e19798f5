"""The MLflow UI in a real browser: start it, open its pages in headless Chromium, screenshot.

    python -m tools.mlflow_ui [--out PATH] [--runs N] [--metric NAME ...]
                                 (`make ui-screenshot`: reports/ui/mlflow_compare.png)

The screenshot is the compare view's metric chart of the newest training runs of the repo's
store (two by default; the parent runs that group repeats are left out), as `make ui` serves
it: each run's test_accuracy and val_accuracy (those the runs logged) per epoch, and below
the chart each metric's last, lowest and highest value per run. The default --out is
git-ignored; the README's picture is rewritten only when asked:
`--out docs/mlflow_compare.png`.

The browser is Debian's `chromium` driven by Playwright (PyPI `playwright`; its own browser
download is never used). The tests drive the same functions against `make ui` and against
`make server`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from mnistlab import files
from mnistlab.executables import bin_dir, child_env

SCREENSHOT = Path("reports/ui/mlflow_compare.png")  # git-ignored (.gitignore)
# Plotted when --metric is not given, those of them the runs logged: the per-epoch accuracy
# (the compare page's own plot would pick one metric itself, often a system one).
ACCURACY = ("test_accuracy", "val_accuracy")
# What Chromium's screenshot can write, by the file's suffix.
IMAGE_SUFFIXES = (".png", ".jpeg", ".jpg")


class BrowserMissing(RuntimeError):
    """No chromium on PATH."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120,
                  path: str = "/health") -> None:
    """Wait until an MLflow server (UI, tracking or model server) answers `path`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[1:3]} exited: "
                                   f"{process.stderr.read().decode()[-2000:]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered at {url} in {seconds:.0f} s") from None
            time.sleep(0.5)


@contextlib.contextmanager
def mlflow_ui(store_uri: str, artifact_root: Path) -> Iterator[str]:
    """`make ui`'s command on a free local port, in its own process group (it starts
    workers), stopped with the group; yields its address."""
    port = free_port()
    # No GenAI job runner (five more processes) for a UI that only shows runs.
    env = child_env({"MLFLOW_DISABLE_TELEMETRY": "true"})
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    process = subprocess.Popen(
        [str(bin_dir() / "mlflow"), "ui", "--backend-store-uri", store_uri,
         "--default-artifact-root", str(artifact_root), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@contextlib.contextmanager
def browser_page() -> Iterator:
    """A page of headless Debian chromium, 1400 x 900."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise BrowserMissing("no `chromium` on PATH: install Debian's package "
                             "(`apt-get install chromium`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def runs_page(url: str, experiment_id: str) -> str:
    return f"{url}/#/experiments/{experiment_id}/runs"


def run_page(url: str, experiment_id: str, run_id: str) -> str:
    return f"{url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"


def compare_page(url: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    runs = urllib.parse.quote(json.dumps(list(run_ids)))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{url}/#/compare-runs?runs={runs}&experiments={experiments}"


def metric_page(url: str, experiment_id: str, run_ids: Sequence[str],
                metrics: Sequence[str]) -> str:
    """The compare view's chart of `metrics` against the step (the epoch) for each run,
    as MLflow links it from a metric's name in the compare table (Routes.getMetricPageRoute)."""
    def quoted(value) -> str:
        return urllib.parse.quote(json.dumps(value))

    return (f"{url}/#/metric?runs={quoted(list(run_ids))}&metric={quoted(metrics[0])}"
            f"&experiments={quoted([experiment_id])}&plot_metric_keys={quoted(list(metrics))}"
            f"&plot_layout={quoted({})}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
            f"&show_point=true&deselected_curves={quoted([])}"
            f"&last_linear_y_axis_range={quoted([])}")


def close_side_panel(page) -> None:
    """MLflow 3's assistant panel takes a third of the page; close it when it is there."""
    panel = page.get_by_text("MLflow Assistant")
    if panel.count():
        buttons = page.get_by_role("button").filter(has=page.locator("svg"))
        header = panel.first.locator("xpath=ancestor::div[.//button][1]")
        close = header.get_by_role("button").last if header.count() else buttons.last
        with contextlib.suppress(Exception):  # a cosmetic step: never fail the screenshot
            close.click(timeout=3000)


def check_out(out: Path) -> None:
    """A screenshot file Chromium can write, refused before the UI starts."""
    if out.is_dir():
        sys.exit(f"mlflow_ui: error: --out {out} is a folder: give a file name, e.g. "
                 f"{out / SCREENSHOT.name}")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        sys.exit(f"mlflow_ui: error: --out {out}: the file's suffix must be one of "
                 f"{', '.join(IMAGE_SUFFIXES)}")


def chosen_metrics(asked: Sequence[str], runs: Sequence) -> list[str]:
    """The metrics to plot: those asked for, or the ACCURACY ones, that the runs logged."""
    logged = sorted({name for run in runs for name in run.data.metrics})
    names = ", ".join(run.info.run_name for run in runs)
    missing = [name for name in asked if name not in logged]
    if missing:
        sys.exit(f"mlflow_ui: error: --metric {missing[0]}: not logged by {names}; they have "
                 f"{', '.join(name for name in logged if not name.startswith('system/'))}")
    chosen = list(dict.fromkeys(asked)) or [name for name in ACCURACY if name in logged]
    if not chosen:
        sys.exit(f"mlflow_ui: error: none of {', '.join(ACCURACY)} logged by {names}: "
                 f"name one with --metric")
    return chosen


def screenshot(url: str, experiment_id: str, runs: Sequence, metrics: Sequence[str],
               out: Path) -> None:
    """The compare view's chart of `metrics` for `runs`, written to `out` whole or not at all."""
    from playwright.sync_api import Error as PageError

    with browser_page() as page:
        try:
            image = drawn_chart(page, url, experiment_id, runs, metrics, out)
        except PageError as err:  # a page that never drew: one line, no traceback
            raise RuntimeError(f"the UI's chart at {url}: {str(err).splitlines()[0]}") from None
    files.write_atomic(out, lambda file: file.write(image))


def drawn_chart(page, url: str, experiment_id: str, runs: Sequence, metrics: Sequence[str],
                out: Path) -> bytes:
    """The picture of the chart, once every run's curve is there."""
    page.goto(metric_page(url, experiment_id, [run.info.run_id for run in runs], metrics))
    for run in runs:  # the table under the chart names each run once per metric
        page.get_by_role("link", name=run.info.run_name, exact=True).first.wait_for()
    # A curve per run at least (a run may lack one of the metrics).
    page.locator(".js-plotly-plot g.trace").nth(len(runs) - 1).wait_for(state="attached")
    close_side_panel(page)
    page.wait_for_timeout(3000)  # the chart draws again once the panel has gone
    return page.screenshot(full_page=False, type="png" if out.suffix.lower() == ".png" else "jpeg")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.mlflow_ui", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="how many of the newest runs to compare")
    parser.add_argument("--out", type=Path, default=SCREENSHOT,
                        help=f"the screenshot's file (default {SCREENSHOT}, git-ignored; "
                             "docs/mlflow_compare.png is the README's)")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help=f"a metric to plot against the epoch, again for more "
                             f"(default: {', '.join(ACCURACY)}, those the runs logged)")
    args = parser.parse_args(argv)
    if args.runs < 2:
        sys.exit(f"mlflow_ui: error: --runs {args.runs}: at least 2 runs are compared")
    check_out(args.out)
    import mlflow

    from mnistlab import tracking
    from tools.repeats import PARENT_TAG

    store = tracking.tracking_uri()
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    finished = [] if experiment is None else mlflow.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200, output_format="list")
    # Training runs, not the parents that group repeats (tools.repeats).
    finished = [run for run in finished if PARENT_TAG not in run.data.tags][:args.runs]
    if len(finished) < 2:
        sys.exit(f"mlflow_ui: error: at least 2 finished runs needed in {store}, found "
                 f"{len(finished)}: run `dvc repro` and a `dvc exp run` first")
    metrics = chosen_metrics(args.metric, finished)
    try:
        with mlflow_ui(store, tracking.project_root() / "mlruns") as url:
            screenshot(url, experiment.experiment_id, finished, metrics, args.out)
    except (BrowserMissing, RuntimeError) as err:
        sys.exit(f"mlflow_ui: error: {err}")
    print(f"mlflow_ui: {args.out}: {', '.join(metrics)} per epoch of "
          f"{', '.join(r.info.run_name for r in finished)}")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
