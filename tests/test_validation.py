"""The validation split (`train.validation`): the last N training images, held out, score
every epoch instead of the test set, and the test files are never read while training."""

from __future__ import annotations

import shutil
from itertools import islice

import pytest
import torch

from mnistlab.data import DataError, load_split, load_training_data
from mnistlab.loop import TrainingRun
from mnistlab.config import parse_params


def tiny_params(default_params: dict, **train):
    raw = dict(default_params)
    raw["train"] = {**default_params["train"], "device": "cpu", "precision": "fp32",
                    "batch_size": 64, "lr": 0.05, "epochs": 2, **train}
    return parse_params(raw)


@pytest.fixture
def train_files_only(tiny_mnist, tmp_path):
    """A data root with the tiny training files and no test files at all."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        shutil.copy(tiny_mnist / "MNIST" / "raw" / name, raw / name)
    return tmp_path


def test_the_last_n_training_images_are_held_out(default_params, tiny_mnist):
    params = tiny_params(default_params, validation=128)
    data = load_training_data(params.train, "cpu", root=tiny_mnist, verify_md5=False)
    everything = load_split(train=True, root=tiny_mnist, verify_md5=False)  # 512 images
    assert (len(data.train), len(data.holdout), data.holdout_name) == (384, 128, "val")
    assert torch.equal(data.train.images, everything.images[:384])
    assert torch.equal(data.holdout.images, everything.images[384:])
    assert torch.equal(data.holdout.labels, everything.labels[384:])


def test_limit_train_keeps_the_first_images_of_what_is_left(default_params, tiny_mnist):
    params = tiny_params(default_params, validation=128, limit_train=100)
    data = load_training_data(params.train, "cpu", root=tiny_mnist, verify_md5=False)
    everything = load_split(train=True, root=tiny_mnist, verify_md5=False)
    assert (len(data.train), len(data.holdout)) == (100, 128)
    assert torch.equal(data.holdout.images, everything.images[384:])  # the same split


def test_with_a_validation_split_the_test_files_are_never_read(default_params, train_files_only):
    params = tiny_params(default_params, validation=128)
    data = load_training_data(params.train, "cpu", root=train_files_only, verify_md5=False)
    history = list(islice(TrainingRun.start(params, data.train, data.holdout, torch.float32,
                                            holdout_name=data.holdout_name).epochs(), 2))
    assert all("val_accuracy" in epoch and "test_accuracy" not in epoch for epoch in history)
    # The same params without the split scores on the test set, whose files are missing here.
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is missing"):
        load_training_data(tiny_params(default_params).train, "cpu", root=train_files_only,
                           verify_md5=False)


@pytest.mark.bad_input
def test_a_split_as_large_as_the_training_files_is_refused(default_params, tiny_mnist):
    params = tiny_params(default_params, validation=512)
    with pytest.raises(DataError, match=r"train.validation = 512: the training files hold "
                                        r"512 images; hold out fewer"):
        load_training_data(params.train, "cpu", root=tiny_mnist, verify_md5=False)
