"""The model users get, as the train stage logs it (mnistlab/served_model.py around `PixelClassifier`):
raw pixels 0..255 in; anything that is not a pixel refused with a message (HTTP 400 from the
server `make serve` starts, MlflowException from `predict`); images scaled to [0, 1] read as
pixels. And `make serve` without a champion: one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import numpy as np
import pytest
import torch
import yaml
from helpers import BIN, REPO, post, serving, synthetic_digits
from mlflow.exceptions import MlflowException
from torch import nn

from mnistlab.model import PixelClassifier
from mnistlab.config import Params
from tools.mlflow_ui import free_port

NOT_PIXELS = [float("nan"), float("inf"), float("-inf"), -1e6, 1e308, 256.0, -1.0]
NOT_PIXELS_IDS = ["NaN", "inf", "-inf", "-1e6", "1e308", "256", "-1"]


def blob_network() -> nn.Module:
    """Right on the synthetic digits (class k: a bright 6 x 6 blob at place k), and only when
    the pixels are scaled as in training: a pixel counts only when it is bright after the
    normalisation (ReLU(x - 1)), and a class's score is the count over its blob's place."""
    network = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(28 * 28, 10))
    with torch.no_grad():
        network[0].weight.fill_(1)
        network[0].bias.fill_(-1)
        template = torch.zeros(10, 28, 28)
        for k in range(10):
            row, col = 3 + 15 * (k // 5), 2 + 5 * (k % 5)
            template[k, row:row + 6, col:col + 6] = 1
        network[3].weight.copy_(template.flatten(1))
        network[3].bias.zero_()
    return network.eval()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The model as `mnistlab.export.log_model` logs it, in a fresh sqlite store, its run
    finished with a test accuracy (so `tools.promote` can make it the champion)."""
    from mnistlab.export import log_model

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = Params.model_validate(yaml.safe_load((REPO / "params.yaml").read_text()))
    images, _ = synthetic_digits(2, seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("mnist-cnn",
                                              artifact_location=(root / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            log_model(blob_network(), params, torch.from_numpy(images).float()[:, None] / 255)
            mlflow.log_metric("final_test_accuracy", 0.99)
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        yield {"uri": uri, "root": root, "run_id": run.info.run_id, "model": model,
               "normalize": params.train.normalize}


def digits(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    images, labels = synthetic_digits(n, seed=1)
    return images.astype(np.float32), labels


def test_pixels_answer_as_the_pixel_classifier(logged):
    images, labels = digits()
    probabilities = np.asarray(logged["model"].predict(images))
    with torch.no_grad():
        expected = PixelClassifier(blob_network(), logged["normalize"].mean,
                                   logged["normalize"].std)(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)
    assert (probabilities.argmax(axis=1) == labels).mean() > 0.9
    info = mlflow.models.get_model_info(f"runs:/{logged['run_id']}/model")
    assert info.signature.inputs.inputs[0].shape == (-1, 28, 28), info.signature
    assert info.saved_input_example_info is not None


def test_images_scaled_to_unit_are_read_as_pixels(logged):
    images, labels = digits()
    pixels = np.asarray(logged["model"].predict(images))
    scaled = np.asarray(logged["model"].predict(images / 255))
    np.testing.assert_array_equal(scaled.argmax(axis=1), pixels.argmax(axis=1))
    np.testing.assert_allclose(scaled, pixels, atol=1e-5)
    # One decision per image: a 0..255 image beside it keeps its own reading.
    mixed = np.concatenate([images[:1], images[1:] / 255])
    np.testing.assert_allclose(np.asarray(logged["model"].predict(mixed)), pixels, atol=1e-5)


@pytest.mark.bad_input
@pytest.mark.parametrize("value", [v for v in NOT_PIXELS if v != 1e308],
                         ids=[i for i in NOT_PIXELS_IDS if i != "1e308"])  # float32 has no 1e308
def test_predict_refuses_values_that_are_not_pixels(logged, value):
    images, _ = digits(3)
    images[2, 10, 11] = value
    with pytest.raises(MlflowException) as refused:
        logged["model"].predict(images)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    message = refused.value.message
    assert f"pixel value {float(np.float32(value))!r} at index [2, 10, 11]" in message, message
    assert "expected raw pixels 0..255" in message and "N x 28 x 28" in message, message


# --- `make serve` (python -m tools.serve): the real scoring server ---------------------------


def serve_env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def server(logged):
    """`make promote --run`, then `make serve`'s command, on a free local port."""
    env = serve_env(logged["uri"])
    promoted = subprocess.run(
        [str(BIN / "python"), "-m", "tools.promote", "--run", logged["run_id"]],
        cwd=logged["root"], env=env, capture_output=True, text=True)
    assert "promoted: first champion" in promoted.stdout, promoted
    with serving(logged["root"], logged["uri"]) as url:
        yield url


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("value", NOT_PIXELS, ids=NOT_PIXELS_IDS)
def test_server_refuses_values_that_are_not_pixels_with_400(server, value):
    images, _ = digits(2)
    images = images.astype(float)
    images[1, 5, 6] = value
    status, answer = post(f"{server}/invocations", json.dumps({"inputs": images.tolist()}).encode())
    assert status == 400, answer
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert "at index [1, 5, 6] is not a number within 0..255" in answer["message"], answer
    assert "expected raw pixels 0..255 (or images scaled to 0..1), N x 28 x 28" in answer["message"]
    good = json.dumps({"inputs": digits(2)[0].tolist()}).encode()
    assert post(f"{server}/invocations", good)[0] == 200


@pytest.mark.slow
def test_server_reads_images_scaled_to_unit_as_pixels(server):
    images, labels = digits()
    answers = []
    for batch in (images, images / 255):
        body = json.dumps({"inputs": batch.tolist()}).encode()
        status, answer = post(f"{server}/invocations", body)
        assert status == 200, answer
        answers.append(np.asarray(answer["predictions"]).argmax(axis=1))
    np.testing.assert_array_equal(answers[1], answers[0])
    assert (answers[0] == labels).mean() > 0.9


@pytest.mark.bad_input
@pytest.mark.parametrize("store", ["none", "no alias"])
def test_serve_without_a_champion_is_one_line(tmp_path, store):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if store == "no alias":  # a registered model, no version has the alias
        mlflow.MlflowClient(tracking_uri=uri).create_registered_model("mnist-cnn")
    result = subprocess.run([str(BIN / "python"), "-m", "tools.serve", "--port", str(free_port())],
                            cwd=tmp_path, env=serve_env(uri), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: error: cannot serve "
                                                   "models:/mnist-cnn@champion"), lines
    assert ("no tracking store" if store == "none" else "alias champion not found") in lines[0]
    assert not (store == "none" and (tmp_path / "mlflow.db").exists())  # no empty store left
