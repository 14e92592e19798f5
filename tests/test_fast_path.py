"""The fast training path computes what the plain one does: epoch-level augmentation, the
CUDA-graphed forward and backward (on a machine with a CUDA GPU), and the preset
composition the recipe benchmark uses."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import mnistlab.data
import mnistlab.loop
from mnistlab.config import ParamsError, compose
from mnistlab.data import Split, load_split, normalize, sample_affine
from mnistlab.loop import (
    AUGMENT_CHUNK,
    TrainingRun,
    augmented_epoch,
    predict_split,
    start_training,
    training_forward,
)
from mnistlab.config import parse_params
from helpers import WARP_TOLERANCE, assert_warped_alike, torchvision_affine

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "preset").glob("*.yaml"))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_params(default_params: dict, dropout: bool = True, **train):
    raw = copy.deepcopy(default_params)
    if not dropout:  # dropout masks differ between any two runs: leave it out to compare
        raw["model"]["layers"] = [layer for layer in raw["model"]["layers"] if "dropout" not in layer]
    raw["train"] = {**raw["train"], "batch_size": 64, "precision": "fp32", **train}
    return parse_params(raw)


def recorded_draws(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every set of parameters random_affine draws from now on, in order."""
    draws = []

    def sample(*args, **kwargs):
        draws.append(sample_affine(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(mnistlab.data, "sample_affine", sample)
    return draws


def chunked_torchvision_epoch(images: torch.Tensor, recipe, seed: int, chunk: int) -> torch.Tensor:
    """What an epoch must be: one generator, drawn on chunk after chunk (never reset), each
    image warped by torchvision's own affine with its parameters, then normalised."""
    generator = torch.Generator().manual_seed(seed)
    warped = []
    for part in images.split(chunk):
        params = sample_affine(len(part), recipe.augment, part.shape[-1], generator)
        warped.append(torchvision_affine(part, params, recipe.augment.interpolation))
    return normalize(torch.cat(warped), recipe.normalize)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_epoch_augmentation_across_chunks_is_torchvision_affine_per_image(
        default_params, tiny_mnist, monkeypatch, interpolation):
    """12 images in chunks of 5: the second and third chunks draw on where the first left
    the generator, and every image is warped as torchvision warps it with its parameters."""
    monkeypatch.setattr(mnistlab.loop, "AUGMENT_CHUNK", 5)
    augment = {"degrees": 25.0, "translate": 0.1, "scale": [0.9, 1.1], "shear": 15.0,
               "interpolation": interpolation}
    recipe = small_params(default_params, augment=augment).train
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)[:12]
    draws = recorded_draws(monkeypatch)

    epoch = augmented_epoch(train, recipe, torch.Generator().manual_seed(3))

    assert [len(d["angle"]) for d in draws] == [5, 5, 2]
    expected = chunked_torchvision_epoch(train.images, recipe, seed=3, chunk=5)
    assert_warped_alike(epoch, expected, interpolation, WARP_TOLERANCE / recipe.normalize.std)
    assert not torch.allclose(epoch, normalize(train.images, recipe.normalize))  # it did warp


def test_epoch_augmentation_across_a_real_chunk_is_torchvision_affine_per_image(
        default_params, tiny_mnist, monkeypatch):
    """8,200 images at the real AUGMENT_CHUNK (8,192): the last 8 come from a second chunk."""
    recipe = small_params(default_params).train
    tiny = load_split(train=True, root=tiny_mnist, verify_md5=False)
    copies = -(-8200 // len(tiny))
    train = Split(tiny.images.repeat(copies, 1, 1, 1)[:8200], tiny.labels.repeat(copies)[:8200])
    draws = recorded_draws(monkeypatch)

    epoch = augmented_epoch(train, recipe, torch.Generator().manual_seed(3))

    assert [len(d["angle"]) for d in draws] == [AUGMENT_CHUNK, 8200 - AUGMENT_CHUNK]
    expected = chunked_torchvision_epoch(train.images, recipe, seed=3, chunk=AUGMENT_CHUNK)
    assert_warped_alike(epoch, expected, recipe.augment.interpolation,
                        WARP_TOLERANCE / recipe.normalize.std)
    if recipe.channels_last:
        assert epoch.is_contiguous(memory_format=torch.channels_last)


def test_epoch_augmentation_draws_anew_each_epoch(default_params, tiny_mnist):
    params = small_params(default_params)
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)
    generator = torch.Generator().manual_seed(0)
    first = augmented_epoch(train, params.train, generator)
    second = augmented_epoch(train, params.train, generator)
    assert not torch.equal(first, second)


def test_without_cuda_the_training_forward_is_the_model_itself(default_params, tiny_mnist):
    params = small_params(default_params)
    train = load_split(train=True, root=tiny_mnist, verify_md5=False)
    model, *_ = start_training(params, torch.device("cpu"), steps=8, seed=0)
    assert training_forward(model, train, params.train, torch.float32) is model


@pytest.mark.parametrize("preset", ["default", *PRESETS])
def test_recipe_benchmark_composes_presets_as_dvc_does(preset, tmp_path):
    """benchmarks.recipe_time needs no DVC (GPU machines may lack it), so it calls Hydra
    directly; the result must equal what `dvc exp run -S preset=NAME` writes."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    overrides = [] if preset == "default" else [f"preset={preset}"]
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), overrides)
    assert compose(preset, conf=REPO / "conf") == yaml.safe_load(out.read_text())


def test_recipe_benchmark_refuses_an_unknown_preset():
    with pytest.raises(ParamsError, match="preset 'I9': no such preset; use default or a name "
                                          "from .*: I0, I1"):
        compose("I9", conf=REPO / "conf")


# --- on a CUDA GPU ----------------------------------------------------------------------------


@pytest.fixture
def exact_cuda():
    """Plain fp32 matmuls and convolutions (no TF32), so two paths can be compared closely."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@needs_cuda
def test_graphed_forward_and_backward_match_the_eager_model(default_params, tiny_mnist, exact_cuda):
    params = small_params(default_params, dropout=False)
    recipe = params.train
    train = load_split(train=True, root=tiny_mnist, device=exact_cuda, verify_md5=False)
    model, *_ = start_training(params, exact_cuda, steps=8, seed=0)
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    forward = training_forward(model, train, recipe, torch.float32)

    assert forward is not model
    for name, buffer in model.named_buffers():  # the capture's warm-up left no trace
        assert torch.equal(buffer, buffers[name]), name
    eager = copy.deepcopy(model)
    images = augmented_epoch(train, recipe, torch.Generator().manual_seed(1))[64:128]
    graphed_logits, eager_logits = forward(images), eager(images)
    graphed_logits.square().sum().backward()
    eager_logits.square().sum().backward()
    torch.testing.assert_close(graphed_logits, eager_logits, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):  # BatchNorm statistics
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
def test_other_shapes_and_evaluation_run_the_eager_model(default_params, tiny_mnist, exact_cuda):
    params = small_params(default_params, dropout=False)
    train = load_split(train=True, root=tiny_mnist, device=exact_cuda, verify_md5=False)
    model, *_ = start_training(params, exact_cuda, steps=8, seed=0)
    forward = training_forward(model, train, params.train, torch.float32)
    images = augmented_epoch(train, params.train, torch.Generator().manual_seed(1))
    last_batch = images[:17]  # the epoch's smaller last batch
    torch.testing.assert_close(forward(last_batch), model(last_batch))
    model.eval()
    torch.testing.assert_close(forward(images[:64]), model(images[:64]))


@needs_cuda
def test_training_with_cuda_graphs_learns(default_params, tiny_mnist):
    device = torch.device("cuda")
    params = small_params(default_params, lr=0.05, epochs=3)
    train = load_split(train=True, root=tiny_mnist, device=device, verify_md5=False)
    test = load_split(train=False, root=tiny_mnist, device=device, verify_md5=False)
    run = TrainingRun.start(params, train, test, torch.float32, eval_batch_size=256, seed=0)
    run.capture()
    history = list(run.epochs())
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert predict_split(run.model, test, 256, params.train, torch.float32).accuracy > 0.9
