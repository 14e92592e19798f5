"""`make ui-screenshot` (tools.mlflow_ui): a picture of the runs' accuracy per epoch, written
where --out says and by default to a git-ignored file, never over the README's picture."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse

import pytest
from helpers import REPO
from mlflow import MlflowClient
from mlflow.entities import Metric

from tools import mlflow_ui as ui

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """Two finished training runs with 3 epochs of curves (and a system metric, which the
    compare page's own plot would pick): the store's URI and {run name: run id}."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("mnist-cnn")
    ids = {}
    for name, rate in (("I1-s0", 0.9), ("gap-head", 0.6)):
        run = client.create_run(experiment, run_name=name)
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[
            Metric(key, value, now, epoch)
            for epoch in (1, 2, 3)
            for key, value in (("test_accuracy", 1 - rate / epoch / 10),
                               ("val_accuracy", 1 - rate / epoch / 9),
                               ("train_loss", rate / epoch),
                               ("system/cpu_utilization_percentage", 50.0 + epoch))])
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    return uri, ids


@pytest.fixture
def store(runs, tmp_path, monkeypatch) -> dict[str, str]:
    """The tool pointed at the two runs, run from an empty folder; {run name: run id}."""
    uri, ids = runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return ids


class FakePage:
    """Stands in for Chromium's page where no browser is needed: every wait succeeds,
    the screenshot is a few bytes."""

    def __init__(self):
        self.opened: list[str] = []

    def goto(self, url: str) -> None:
        self.opened.append(url)

    def __getattr__(self, name):  # get_by_role(...).first.wait_for(), locator(...).nth(1)...
        return lambda *args, **kwargs: self

    first = property(lambda self: self)

    def count(self) -> int:
        return 0

    def screenshot(self, **kwargs) -> bytes:
        return PNG + b"fake"


@pytest.fixture
def no_browser(monkeypatch) -> FakePage:
    """The UI and the browser replaced: what the tool opens is recorded, nothing starts."""
    page = FakePage()

    @contextlib.contextmanager
    def fake_ui(store_uri, artifact_root):
        yield "http://127.0.0.1:1"

    @contextlib.contextmanager
    def fake_browser():
        yield page

    monkeypatch.setattr(ui, "mlflow_ui", fake_ui)
    monkeypatch.setattr(ui, "browser_page", fake_browser)
    return page


def test_the_default_screenshot_is_git_ignored_and_not_tracked():
    """A plain `make ui-screenshot` leaves `git status` clean (the README's picture is
    rewritten only with --out docs/mlflow_compare.png)."""
    path = str(ui.SCREENSHOT)
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=REPO,
                             capture_output=True)
    assert ignored.returncode == 0, f"{path} is not git-ignored"
    assert tracked.returncode != 0, f"{path} is tracked by git"


def test_out_is_written_exactly_there_with_the_runs_accuracy_per_epoch(store, no_browser,
                                                                        tmp_path, capsys):
    out = tmp_path / "shots" / "two runs.png"
    before = {p for p in tmp_path.rglob("*")}
    ui.main(["--out", str(out)])
    assert out.read_bytes() == PNG + b"fake"
    assert {p for p in tmp_path.rglob("*")} - before == {out, out.parent}  # nothing else
    # The page opened: the compare view's chart of both runs' accuracy against the epoch.
    (url,) = no_browser.opened
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert url.startswith("http://127.0.0.1:1/#/metric?")
    assert query["plot_metric_keys"] == ['["test_accuracy", "val_accuracy"]']
    assert query["x_axis"] == ["step"]
    assert set(json.loads(query["runs"][0])) == set(store.values())
    assert "test_accuracy, val_accuracy per epoch of gap-head, I1-s0" in capsys.readouterr().out


def test_a_named_metric_is_plotted(store, no_browser, tmp_path):
    ui.main(["--out", str(tmp_path / "loss.png"), "--metric", "train_loss"])
    (url,) = no_browser.opened
    assert urllib.parse.parse_qs(url.split("?", 1)[1])["plot_metric_keys"] == ['["train_loss"]']


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--out", "compare.svg"], "--out compare.svg: the file's suffix must be one of .png"),
    (["--out", "."], "--out . is a folder"),
    (["--metric", "accuracy"], "--metric accuracy: not logged by gap-head, I1-s0; they have "
                               "test_accuracy, train_loss, val_accuracy"),
    (["--runs", "1"], "--runs 1: at least 2 runs are compared"),
])
def test_bad_arguments_are_refused_before_the_ui_starts(store, monkeypatch, tmp_path, args,
                                                        message):
    def no_ui(*_):
        raise AssertionError("the UI started")

    monkeypatch.setattr(ui, "mlflow_ui", no_ui)
    with pytest.raises(SystemExit) as refused:
        ui.main(args)
    assert str(refused.value).startswith("mlflow_ui: error: ")
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "compare.svg").exists() and not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_the_browser_shows_both_runs_accuracy_curves(store, tmp_path, monkeypatch):
    """Debian's chromium on the real UI: the picture is the chart of test_accuracy and
    val_accuracy against the step, one curve per run and metric."""
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's package)")
    real_browser = ui.browser_page
    shown = {}

    @contextlib.contextmanager
    def recording_browser():
        with real_browser() as page:
            yield page
            shown["text"] = page.inner_text("body")

    monkeypatch.setattr(ui, "browser_page", recording_browser)
    out = tmp_path / "compare.png"
    ui.main(["--out", str(out)])
    assert out.read_bytes().startswith(PNG)
    for name in store:
        for metric in ("test_accuracy", "val_accuracy"):
            assert f"{name} ({metric})" in shown["text"]  # the chart's legend
    assert "test_accuracy vs val_accuracy" in shown["text"] and "Step" in shown["text"]
    assert "cpu_utilization" not in shown["text"]
