"""What the test modules share: commands run as a user runs them, the tiny projects the
end-to-end tests work in, the stages as real processes, and what a project holds afterwards.

Two kinds of tiny project:

* `tiny_project`: the whole repo under git and DVC, MNIST already "downloaded" (synthetic,
  `dvc repro download` done). Building one takes seconds of git, Hydra and DVC, so it is built
  once per test run (tests/conftest.py says where) and every caller gets a copy of it.
* `make_project`: stages/, conf/ and params.yaml beside a synthetic MNIST; no git, no DVC.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from mnistlab import mnist
from tools.mlflow_ui import free_port

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PRESETS = sorted(path.stem for path in (CONF / "preset").glob("*.yaml"))  # conf/preset/
PYTHON = Path(sys.executable)
BIN = PYTHON.parent
STARTUP_TIMEOUT_S = 240  # imports + the first epoch, on a loaded 2-core machine


# --- a tiny synthetic MNIST ----------------------------------------------------------------


def write_idx(raw_dir: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (uint8 [N, 28, 28]) and labels as the two IDX files torchvision reads."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / f"{prefix}-images-idx3-ubyte").write_bytes(
        mnist.idx_images(images.astype(np.uint8).tobytes(), len(images)))
    (raw_dir / f"{prefix}-labels-idx1-ubyte").write_bytes(
        mnist.idx_labels(labels.astype(np.uint8).tobytes()))


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable stand-in for MNIST: class k is a bright 6x6 blob at one of ten places,
    jittered by a pixel or two, on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        row, col = 3 + 15 * (k // 5), 2 + 5 * (k % 5)
        dr, dc = rng.integers(-1, 2, 2)
        images[i, row + dr: row + dr + 6, col + dc: col + dc + 6] = 230
    return images, labels


# --- commands, as a user runs them ---------------------------------------------------------


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` on this environment's tools, without MLflow/DVC settings; it must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def post(url: str, body: bytes) -> tuple[int, dict]:
    """POST a JSON body; the HTTP status and the decoded answer, errors included."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


# --- params.yaml, composed as `dvc exp run -S ...` does ------------------------------------


def compose(out: Path, overrides: list[str]) -> dict:
    """params.yaml as `dvc exp run -S ...` would write it from conf/; returned as a dict."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(CONF), None, "config", str(REPO), overrides)
    return yaml.safe_load(out.read_text())


# --- the whole repo under git and DVC, made tiny --------------------------------------------

# Where tiny_project builds the project it copies; tests/conftest.py sets it to a folder of
# this test run (shared by pytest-xdist's workers). Unset, a new temporary folder is used.
TEMPLATE_HOME: Path | None = None
_template: Path | None = None


def build_tiny_project(dest: Path) -> Path:
    """The repo's current files (committed or not) in a fresh git repo, with conf/ made
    tiny: 2 epochs on 1,024 synthetic images, downloads off; `dvc repro download` done."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split()
    for name in files:
        if name.startswith(("data/", "models/", "reports/", "mlruns/")) or not (REPO / name).is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    config = yaml.safe_load((dest / "conf/config.yaml").read_text())
    config["data"] = {"mirrors": [], "pypi_fallback": False, "timeout_s": 1, "verify_md5": False}
    config["train"].update(epochs=2, lr=0.05, batch_size=128, precision="fp32")
    (dest / "conf/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run([str(BIN / "python"), "-c", "from pathlib import Path; from dvc.utils.hydra import "
         "compose_and_dump; compose_and_dump(Path('params.yaml'), str(Path('conf').resolve()), "
         "None, 'config', '.', [])"], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], dest)
    raw = dest / "data/MNIST/raw"
    write_idx(raw, "train", *synthetic_digits(1024, seed=0))
    write_idx(raw, "t10k", *synthetic_digits(256, seed=1))
    # The synthetic files cannot pass MNIST's checksums: with data.verify_md5 off the download
    # stage keeps them (and packs them), so `dvc repro` goes on from train.
    run([str(BIN / "dvc"), "repro", "download"], dest)
    return dest


def tiny_project_template() -> Path:
    """The one tiny project of this test run, built on first use. A file lock makes the first
    caller (of any xdist worker) build it while the others wait; it is never changed after."""
    global _template
    if _template is None:
        home = TEMPLATE_HOME or Path(tempfile.mkdtemp(prefix="tiny-project-"))
        template, built = home / "tiny_project", home / "tiny_project.built"
        with FileLock(home / "tiny_project.lock"):
            if not built.exists():
                shutil.rmtree(template, ignore_errors=True)  # what a failed build left
                template.mkdir()
                build_tiny_project(template)
                built.touch()
        _template = template
    return _template


def tiny_project(dest: Path) -> Path:
    """A copy of the tiny project (build_tiny_project) at `dest`, which may already exist.
    Nothing in it names its own path (git and DVC store relative ones, DVC's cache holds
    copies, not links), so the copy is a repo of its own: `dvc status` is clean there."""
    shutil.copytree(tiny_project_template(), dest, symlinks=True, dirs_exist_ok=True)
    # DVC tells repos apart by path and this file's time (its per-repo cache outside the
    # repo): a fresh one makes the copy a new repo even where an old one's path is reused.
    (dest / ".dvc" / "tmp" / "btime").unlink(missing_ok=True)
    return dest


# --- stages/, conf/ and params.yaml beside a synthetic MNIST --------------------------------


def make_project(dest: Path, n_train: int = 512, n_test: int = 128, **train) -> Path:
    """stages/, conf/ and params.yaml from the repo, a synthetic MNIST, and tiny CPU training params
    (any `train` keyword overrides one of them, even with a value the stage must refuse)."""
    for folder in ("mnistlab", "stages", "conf"):  # conf/preset/ names the presets params.yaml may name
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(mirrors=[], pypi_fallback=False, timeout_s=1, verify_md5=False)
    params["train"].update(device="cpu", precision="fp32", batch_size=64, lr=0.05, epochs=3,
                           limit_train=0, limit_test=0, resume=False)
    params["train"].update(train)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    raw = dest / "data" / "MNIST" / "raw"
    write_idx(raw, "train", *synthetic_digits(n_train, seed=0))
    write_idx(raw, "t10k", *synthetic_digits(n_test, seed=1))
    return dest


# --- the stages as real processes ------------------------------------------------------------


def stage_env(**extra: str) -> dict[str, str]:
    """This environment without MLflow/DVC settings (the stage uses the project's own store)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_")) and k != "PYTHONPATH"}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1", **extra)
    return env


def run_stage(project: Path, stage: str, timeout: float = 300,
              **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", f"stages.{stage}"], cwd=project,
                          env=stage_env(**env), capture_output=True, text=True, timeout=timeout)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Training:
    """`python -m stages.train` in the background, its stdout read line by line."""

    def __init__(self, project: Path, log_dir: Path) -> None:
        # stderr goes to a file: an unread pipe could fill up and stall the stage.
        self.stderr_path = log_dir / f"stderr-{project.name}-{time.monotonic_ns()}.log"
        self._stderr = self.stderr_path.open("w")
        # A shell's background job (`make test &`, nohup) starts with SIGINT ignored, and an
        # ignored signal stays ignored across exec: Ctrl-C would then never reach the stage.
        # The child gets the default back, as a stage started from a terminal has it.
        self.proc = subprocess.Popen([str(PYTHON), "-m", "stages.train"], cwd=project,
                                     env=stage_env(), stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1,
                                     preexec_fn=_default_sigint)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = STARTUP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"train ended before printing {prefix!r}:\n{self.output()}")
            if line.startswith(prefix):
                return line
        self.proc.kill()
        pytest.fail(f"no line starting {prefix!r} within {timeout} s:\n{self.output()}")

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"train did not stop within {timeout} s:\n{self.output()}")
        self._reader.join(timeout=10)
        self._stderr.close()
        return code

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def output(self) -> str:
        return f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


def interrupt_after_epoch_1(project: Path, log_dir: Path, sig: int = signal.SIGTERM) -> Training:
    """Start training, stop it with `sig` as soon as it reports epoch 1, wait for it to end."""
    training = Training(project, log_dir)
    training.wait_for("train: epoch 1 ")
    training.proc.send_signal(sig)
    code = training.finish()
    assert code != 0, training.output()
    return training


# --- what a project holds afterwards ---------------------------------------------------------


def client(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def mlflow_runs(project: Path) -> list:
    store = client(project)
    experiment = store.get_experiment_by_name("mnist-cnn")
    assert experiment is not None, f"no MLflow experiment in {project / 'mlflow.db'}"
    return store.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def steps(project: Path, run_id: str, metric: str = "test_accuracy") -> list[int]:
    return sorted(m.step for m in client(project).get_metric_history(run_id, metric))


def curves(project: Path) -> list[dict[str, str]]:
    with (project / "reports" / "training_curves.csv").open() as file:
        return list(csv.DictReader(file))


def temp_files(project: Path) -> list[Path]:
    """What files.write_atomic leaves behind if a write is cut short."""
    return [path for folder in ("models", "reports") for path in (project / folder).rglob(".*.tmp")]


@contextlib.contextmanager
def serving(root: Path, tracking_uri: str):
    """`make serve`'s command (python -m tools.serve: the champion) run in `root` against
    `tracking_uri`, on a free local port; yields its URL and stops it afterwards."""
    from tools.mlflow_ui import wait_until_up

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(REPO))
    port = free_port()
    process = subprocess.Popen([str(BIN / "python"), "-m", "tools.serve", "--port", str(port)],
                               cwd=root, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, path="/ping")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)



# --- torchvision's own affine warp, one image at a time --------------------------------------

# torchvision builds its sampling grid in float32, mnistlab.data.affine_theta in float64: the
# grid points differ by ~1e-6 pixel. Bilinear resampling is continuous in the grid point, so a
# [0, 1] pixel moves by at most that much times its neighbours' difference (<= 1): every pixel
# agrees within WARP_TOLERANCE (measured: 3.4e-6 at most). Nearest resampling rounds the grid
# point, and a point that falls on a half-pixel may round the other way in the other float
# width: there a pixel takes its neighbour's value. At most NEAREST_FLIPS of the pixels may do
# so (measured: 1 in 50,000); all the others agree within WARP_TOLERANCE.
WARP_TOLERANCE = 1e-5
NEAREST_FLIPS = 1e-3


def torchvision_affine(images, params: dict, interpolation: str):
    """images [N, C, H, W], each warped by torchvision.transforms.functional.affine with its
    own parameters from `params` (as mnistlab.data.sample_affine returns them)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return torch.stack([
        TF.affine(image, angle=params["angle"][i].item(),
                  translate=[int(params["translate_x"][i]), int(params["translate_y"][i])],
                  scale=params["scale"][i].item(),
                  shear=[params["shear_x"][i].item(), params["shear_y"][i].item()],
                  interpolation=InterpolationMode(interpolation))
        for i, image in enumerate(images)])


def assert_warped_alike(warped, expected, interpolation: str, tolerance: float = WARP_TOLERANCE) -> None:
    """`warped` is `expected` up to float rounding of the grid (see WARP_TOLERANCE)."""
    assert warped.shape == expected.shape
    off = (warped - expected).abs() > tolerance
    allowed = 0 if interpolation == "bilinear" else NEAREST_FLIPS * off.numel()
    assert off.sum().item() <= allowed, (
        f"{off.sum().item()} of {off.numel()} pixels differ by more than {tolerance} "
        f"(at most {allowed:g} may), the worst by {(warped - expected).abs().max().item():.3g}; "
        f"first such image: {off.flatten(1).any(1).nonzero()[0].item()}")
