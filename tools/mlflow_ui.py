"""The MLflow UI in a real browser: start it, open its pages in headless Chromium, screenshot.

    python -m tools.mlflow_ui            (`make ui-screenshot`: docs/mlflow_compare.png)

The screenshot is the compare view of the newest training runs of the repo's store (two by
default; the parent runs that group repeats are left out),
as `make ui` serves it. The browser is Debian's `chromium` driven by Playwright (PyPI
`playwright`; its own browser download is never used). The tests drive the same functions
against `make ui` and against `make server`.
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

SCREENSHOT = Path("docs/mlflow_compare.png")


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
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store_uri,
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


def close_side_panel(page) -> None:
    """MLflow 3's assistant panel takes a third of the page; close it when it is there."""
    panel = page.get_by_text("MLflow Assistant")
    if panel.count():
        buttons = page.get_by_role("button").filter(has=page.locator("svg"))
        header = panel.first.locator("xpath=ancestor::div[.//button][1]")
        close = header.get_by_role("button").last if header.count() else buttons.last
        with contextlib.suppress(Exception):  # a cosmetic step: never fail the screenshot
            close.click(timeout=3000)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.mlflow_ui", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="how many of the newest runs to compare")
    parser.add_argument("--out", type=Path, default=SCREENSHOT)
    args = parser.parse_args(argv)
    import mlflow

    from stages import tracking

    store = tracking.tracking_uri()
    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    finished = [] if experiment is None else mlflow.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200, output_format="list")
    # Training runs, not the parents that group repeats (tools.repeats).
    finished = [run for run in finished if tracking.PARENT_TAG not in run.data.tags][:args.runs]
    if len(finished) < 2:
        sys.exit(f"mlflow_ui: error: {args.runs} finished runs needed in {store}, found "
                 f"{len(finished)}: run `dvc repro` and a `dvc exp run` first")
    try:
        with mlflow_ui(store, tracking.project_root() / "mlruns") as url, browser_page() as page:
            page.goto(compare_page(url, experiment.experiment_id, [r.info.run_id for r in finished]))
            page.get_by_text(f"Comparing {len(finished)} Runs").first.wait_for()
            close_side_panel(page)
            page.wait_for_timeout(6000)  # the charts draw again once the panel has gone
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=False)
    except (BrowserMissing, RuntimeError) as err:
        sys.exit(f"mlflow_ui: error: {err}")
    print(f"mlflow_ui: {args.out}: the compare view of {', '.join(r.info.run_name for r in finished)}")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
