"""The batched augmentation (random_affine, what training warps with) warps every image as
torchvision's own affine warps it with the same parameters."""

from __future__ import annotations

import pytest
import torch

import mnistlab.data
from helpers import WARP_TOLERANCE, assert_warped_alike, synthetic_digits, torchvision_affine
from mnistlab.data import random_affine, sample_affine
from mnistlab.config import Augment

NO_AUGMENTATION = {"degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0), "shear": 0.0,
                   "interpolation": "bilinear"}


def affine(**changes) -> Augment:
    """An `train.augment` section: no augmentation, except the given changes."""
    return Augment(**{**NO_AUGMENTATION, **changes})


# (angle, translate x, translate y, scale, shear x) in torchvision's conventions
CASES = [(10, 2, -1, 1.02, 0), (-7, 0, 0, 0.95, 10), (25, -3, 2, 1.1, -15), (0, 0, 0, 1, 0),
         (90, 1, 1, 0.9, 5)]
# Any augmentation at all, so that random_affine warps rather than returning its input.
SOME_AUGMENTATION = {"degrees": 30.0, "translate": 0.1, "scale": (0.9, 1.1), "shear": 15.0}


def given_draws(monkeypatch, cases) -> dict[str, torch.Tensor]:
    """Make random_affine warp image i with cases[i] instead of a random draw."""
    angle, tx, ty, scale, shear = (torch.tensor(column, dtype=torch.float32) for column in zip(*cases))
    params = {"angle": angle, "translate_x": tx, "translate_y": ty, "scale": scale,
              "shear_x": shear, "shear_y": torch.zeros(len(cases))}

    def sample(n, augment, size, generator):
        assert n == len(cases)
        return params

    monkeypatch.setattr(mnistlab.data, "sample_affine", sample)
    return params


def digits(n: int) -> torch.Tensor:
    images, _ = synthetic_digits(n, seed=0)
    return torch.from_numpy(images).float().div(255).unsqueeze(1)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_random_affine_warps_each_image_as_torchvision_affine_does(monkeypatch, mode):
    images = torch.rand(len(CASES), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    params = given_draws(monkeypatch, CASES)
    warped = random_affine(images, affine(**SOME_AUGMENTATION, interpolation=mode), torch.Generator())
    assert_warped_alike(warped, torchvision_affine(images, params, mode), mode)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_random_affine_draws_match_torchvision_affine_per_image(mode):
    """Random parameters, drawn as sample_affine draws them from the same generator state."""
    images = digits(64)
    augment = affine(**SOME_AUGMENTATION, interpolation=mode)
    warped = random_affine(images, augment, torch.Generator().manual_seed(5))
    params = sample_affine(len(images), augment, 28, torch.Generator().manual_seed(5))
    assert_warped_alike(warped, torchvision_affine(images, params, mode), mode)
    assert not torch.allclose(warped, images)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_identity_parameters_give_the_input_back(monkeypatch, mode):
    images = digits(3)
    given_draws(monkeypatch, [(0, 0, 0, 1, 0)] * 3)
    warped = random_affine(images, affine(**SOME_AUGMENTATION, interpolation=mode), torch.Generator())
    torch.testing.assert_close(warped, images, rtol=0, atol=WARP_TOLERANCE)


def mass_centre(images: torch.Tensor) -> torch.Tensor:
    """[N, 2]: each image's (x, y) centre of brightness, in pixels."""
    weights = images[:, 0].double()
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    total = weights.sum((1, 2))
    return torch.stack([(weights * xs).sum((1, 2)) / total, (weights * ys).sum((1, 2)) / total], 1)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_a_pure_translation_moves_the_mass_centre_by_its_pixels(monkeypatch, mode):
    """Positive x moves right, positive y down (torchvision's convention). The blob sits in
    the middle, on black, so nothing is shifted out of the frame."""
    images = torch.zeros(3, 1, 28, 28)
    images[:, :, 10:16, 11:18] = torch.rand(3, 1, 6, 7, generator=torch.Generator().manual_seed(0)) + 0.5
    shifts = [(3, -2), (-4, 0), (0, 5)]
    given_draws(monkeypatch, [(0, tx, ty, 1, 0) for tx, ty in shifts])
    warped = random_affine(images, affine(**SOME_AUGMENTATION, interpolation=mode), torch.Generator())
    moved = mass_centre(warped) - mass_centre(images)
    torch.testing.assert_close(moved, torch.tensor(shifts, dtype=torch.float64), rtol=0, atol=1e-4)


def test_each_image_gets_its_own_warp():
    images = torch.rand(1, 1, 28, 28).expand(8, 1, 28, 28).contiguous()
    out = random_affine(images, affine(degrees=30, translate=0.1), torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert len({round(x.sum().item(), 3) for x in out}) == 8


def test_no_augmentation_is_the_identity():
    images = torch.rand(4, 1, 28, 28)
    assert random_affine(images, affine(), torch.Generator()) is images


def test_sampled_parameters_stay_in_range():
    augment = affine(degrees=10, translate=0.05, scale=(0.98, 1.02), shear=10)
    p = sample_affine(10_000, augment, 28, torch.Generator().manual_seed(0))
    assert p["angle"].abs().max() <= 10 and p["angle"].abs().max() > 9.9
    assert set(p["translate_x"].unique().tolist()) <= {-1.0, 0.0, 1.0}  # round(U(-1.4, 1.4))
    assert 0.98 <= p["scale"].min() and p["scale"].max() <= 1.02
    assert p["shear_x"].abs().max() <= 10 and (p["shear_y"] == 0).all()


def test_same_generator_seed_same_warps():
    images = torch.rand(16, 1, 28, 28)
    augment = affine(degrees=15, translate=0.1, scale=(0.9, 1.1), shear=10)
    a = random_affine(images, augment, torch.Generator().manual_seed(3))
    b = random_affine(images, augment, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
