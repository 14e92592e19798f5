"""Bad files on disk give one clear, typed error, never a raw exception from torch or
torchvision.

* models/model.pt: garbage bytes, a truncated real checkpoint, a checkpoint missing a key,
  foreign contents -> `mnistlab.checkpoint.ModelFileError` naming the path.
* MNIST IDX files: a wrong magic number, a wrong declared count, a short file, labels that
  do not match the images, a missing directory -> `mnistlab.data.DataError` naming the data
  directory and saying to run the download stage.

"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mnistlab.data import DataError, load_split
from mnistlab.checkpoint import ModelFileError, load_model
from mnistlab.model import build_model
from mnistlab.config import parse_params
from mnistlab.checkpoint import MODEL_FILE, save_model

REPO = Path(__file__).resolve().parents[1]
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x08 (uint8) then 3 or 1 dimensions

# --- model checkpoints ---------------------------------------------------------------------

TINY_LAYERS = [{"conv": 2}, {"maxpool": 4}]  # 20 + 4 + 490 parameters: a few KB on disk


def tiny_params(layers: list[dict] = TINY_LAYERS) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["layers"] = layers
    return raw


@pytest.fixture
def checkpoint(tmp_path, monkeypatch) -> Path:
    """A real models/model.pt of a tiny model, written by `mnistlab.checkpoint.save_model`."""
    monkeypatch.chdir(tmp_path)  # save_model writes to the relative models/model.pt
    params = parse_params(tiny_params())
    save_model(build_model(params.model), params, run_id="run-0123")
    return tmp_path / MODEL_FILE


def assert_model_file_error(path: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_real_checkpoint_loads(checkpoint):
    model, params, run_id = load_model(checkpoint)
    assert run_id == "run-0123"
    assert params.model.layers[0].conv == 2
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.bad_input
def test_missing_checkpoint(tmp_path):
    path = tmp_path / "models" / "model.pt"
    message = assert_model_file_error(path, "not found", "dvc repro train")
    assert message == f"{path} not found; run `dvc repro train`"


@pytest.mark.bad_input
def test_garbage_checkpoint(tmp_path):
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    path.write_bytes(random.Random(0).randbytes(4096))
    assert_model_file_error(path, "not a readable model checkpoint", "dvc repro train")


@pytest.mark.bad_input
def test_text_file_as_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9000\n")
    assert_model_file_error(path, "not a readable model checkpoint")


@pytest.mark.bad_input
@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.99], ids=["half", "tenth", "last byte cut"])
def test_truncated_checkpoint(checkpoint, fraction):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:int(len(data) * fraction)])
    assert_model_file_error(checkpoint, "not a readable model checkpoint", "dvc repro train")


@pytest.mark.bad_input
def test_empty_checkpoint(checkpoint):
    checkpoint.write_bytes(b"")
    assert_model_file_error(checkpoint, "not a readable model checkpoint")


@pytest.mark.bad_input
@pytest.mark.parametrize("key", ["params", "state_dict", "mlflow_run_id"])
def test_checkpoint_missing_a_key(checkpoint, key):
    contents = torch.load(checkpoint, weights_only=True)
    del contents[key]
    torch.save(contents, checkpoint)
    assert_model_file_error(checkpoint, "KeyError", repr(key))


# name -> what to save instead of the real checkpoint dict `ck`
FOREIGN_CONTENTS: dict[str, Callable[[dict], object]] = {
    "a bare state dict": lambda ck: ck["state_dict"],
    "a tensor": lambda ck: torch.zeros(3),
    "None": lambda ck: None,
    "a list": lambda ck: [ck],
    "weights of another architecture": lambda ck: {
        **ck, "params": tiny_params([{"conv": 3}, {"maxpool": 4}])},
    "invalid params": lambda ck: {**ck, "params": tiny_params([])},
}


@pytest.mark.bad_input
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # indexing a tensor by "params"
@pytest.mark.parametrize("make", FOREIGN_CONTENTS.values(), ids=FOREIGN_CONTENTS.keys())
def test_foreign_checkpoint_contents(checkpoint, make):
    contents = torch.load(checkpoint, weights_only=True)
    torch.save(make(contents), checkpoint)
    assert_model_file_error(checkpoint, "not a readable model checkpoint", "dvc repro train")


@pytest.mark.bad_input
def test_invalid_params_in_checkpoint_are_explained(checkpoint):
    contents = torch.load(checkpoint, weights_only=True)
    contents["params"]["train"]["lr"] = -1
    torch.save(contents, checkpoint)
    assert_model_file_error(checkpoint, "ParamsError", "train.lr = -1")


@pytest.mark.bad_input
def test_checkpoint_is_a_directory(tmp_path):
    assert_model_file_error(tmp_path, "not a readable model checkpoint")


# --- MNIST IDX files -----------------------------------------------------------------------

N_TRAIN, N_TEST = 20, 10


def idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file as tests/conftest.py::write_idx writes it, with any magic and dims."""
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def images_file(n: int, magic: int = IMAGES_MAGIC, declared: int | None = None) -> bytes:
    pixels = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return idx(magic, (n if declared is None else declared, 28, 28), pixels.tobytes())


def labels_file(n: int, magic: int = LABELS_MAGIC, declared: int | None = None,
                labels: np.ndarray | None = None) -> bytes:
    labels = np.arange(n) % 10 if labels is None else labels
    return idx(magic, (n if declared is None else declared,), labels.astype(np.uint8).tobytes())


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A valid data root: MNIST/raw with small training and test IDX files."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(images_file(N_TRAIN))
    (raw / "train-labels-idx1-ubyte").write_bytes(labels_file(N_TRAIN))
    (raw / "t10k-images-idx3-ubyte").write_bytes(images_file(N_TEST))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels_file(N_TEST))
    return tmp_path / "data"


def assert_data_error(root: Path, *words: str, train: bool = True) -> str:
    with pytest.raises(DataError) as caught:
        load_split(train=train, root=root, verify_md5=False)
    message = str(caught.value)
    assert f"{root}/MNIST/raw" in message, message
    for word in words:
        assert word in message, message
    return message


def test_valid_files_load(data_root):
    train = load_split(train=True, root=data_root, verify_md5=False)
    test = load_split(train=False, root=data_root, verify_md5=False)
    assert (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert train.images.shape == (N_TRAIN, 1, 28, 28)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


@pytest.mark.bad_input
def test_missing_data_directory(tmp_path):
    assert_data_error(tmp_path / "nowhere", "missing", "run `dvc repro download`")


@pytest.mark.bad_input
def test_missing_one_file(data_root):
    (data_root / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    assert_data_error(data_root, "missing", "run `dvc repro download`")


# name -> (file to replace, its new bytes); each is refused with the download hint.
BAD_IDX = {
    "images with the labels' magic": ("train-images-idx3-ubyte",
                                      images_file(N_TRAIN, magic=LABELS_MAGIC)),
    "images with a float32 magic": ("train-images-idx3-ubyte", images_file(N_TRAIN, magic=0x0D03)),
    "images with 2 dimensions": ("train-images-idx3-ubyte", images_file(N_TRAIN, magic=0x0802)),
    "labels with the images' magic": ("train-labels-idx1-ubyte",
                                      labels_file(N_TRAIN, magic=IMAGES_MAGIC)),
    "images declare more than they hold": ("train-images-idx3-ubyte",
                                           images_file(N_TRAIN, declared=N_TRAIN + 5)),
    "images declare fewer than they hold": ("train-images-idx3-ubyte",
                                            images_file(N_TRAIN, declared=N_TRAIN - 5)),
    "labels declare more than they hold": ("train-labels-idx1-ubyte",
                                           labels_file(N_TRAIN, declared=1000)),
    "images file cut short": ("train-images-idx3-ubyte", images_file(N_TRAIN)[:1000]),
    "labels file cut short": ("train-labels-idx1-ubyte", labels_file(N_TRAIN)[:12]),
    # torchvision's own reader fails on these with AssertionError, TypeError or ValueError.
    "magic 0xDEADBEEF": ("train-images-idx3-ubyte", images_file(N_TRAIN, magic=0xDEADBEEF)),
    "zeroed magic": ("train-images-idx3-ubyte", images_file(N_TRAIN, magic=0)),
    "int8 magic": ("train-images-idx3-ubyte", images_file(N_TRAIN, magic=0x0903)),
    "empty file": ("train-labels-idx1-ubyte", b""),
    "header cut short": ("train-images-idx3-ubyte", images_file(N_TRAIN)[:10]),
    "zero images": ("train-images-idx3-ubyte", images_file(0)),
}


@pytest.mark.bad_input
@pytest.mark.parametrize(("name", "contents"), BAD_IDX.values(), ids=BAD_IDX.keys())
def test_malformed_idx_file(data_root, name, contents):
    (data_root / "MNIST" / "raw" / name).write_bytes(contents)
    assert_data_error(data_root, name, "run `dvc repro download`")


@pytest.mark.bad_input
def test_malformed_test_split(data_root):
    (data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(
        images_file(N_TEST, declared=N_TEST * 2))
    assert_data_error(data_root, "run `dvc repro download`", train=False)


@pytest.mark.bad_input
def test_images_and_labels_disagree(data_root):
    (data_root / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(
        labels_file(N_TRAIN - 1))
    message = assert_data_error(data_root)
    assert f"holds {N_TRAIN} images but" in message and f"holds {N_TRAIN - 1} labels" in message


@pytest.mark.bad_input
def test_label_out_of_range(data_root):
    (data_root / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(
        labels_file(N_TRAIN, labels=np.full(N_TRAIN, 12)))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9"):
        load_split(train=True, root=data_root, verify_md5=False)
