"""The batched augmentation warps exactly like torchvision's RandomAffine family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from stages.data import affine_theta, random_affine, sample_affine
from stages.params import Augment

NO_AUGMENTATION = {"degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0), "shear": 0.0,
                   "interpolation": "bilinear"}


def affine(**changes) -> Augment:
    """An `train.augment` section: no augmentation, except the given changes."""
    return Augment(**{**NO_AUGMENTATION, **changes})

# (angle, translate x, translate y, scale, shear x) in torchvision's conventions
CASES = [(10, 2, -1, 1.02, 0), (-7, 0, 0, 0.95, 10), (25, -3, 2, 1.1, -15), (0, 0, 0, 1, 0),
         (90, 1, 1, 0.9, 5)]
MODES = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}
# Same formula in float64 vs torchvision's float32 grid: a few ulp of difference at most.
TOLERANCE = 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("angle,tx,ty,scale,shear", CASES)
def test_warp_matches_torchvision_affine(angle, tx, ty, scale, shear, mode):
    image = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = TF.affine(image[0], angle=angle, translate=[tx, ty], scale=scale,
                         shear=[float(shear), 0.0], interpolation=MODES[mode])
    theta = affine_theta(*(torch.tensor([float(v)]) for v in (angle, tx, ty, scale, shear, 0)),
                         height=28, width=28)
    grid = F.affine_grid(theta, [1, 1, 28, 28], align_corners=False)
    warped = F.grid_sample(image, grid, mode=mode, align_corners=False)
    assert (warped[0] - expected).abs().max().item() < TOLERANCE


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
