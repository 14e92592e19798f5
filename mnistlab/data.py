"""MNIST as tensors on the training device, and augmentation done a whole batch at a time.

Why not a DataLoader: MNIST is 47 MB as uint8, so it fits on any device. Keeping it there
and slicing batches with a permutation removes the per-sample Python, PIL conversions and
worker processes that dominate small-CNN training time (see benchmarks/).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mnistlab import mnist
from mnistlab.files import md5_of_file
from mnistlab.mnist import (
    DATA_ROOT,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    IMAGE_SIZE,
    NUM_CLASSES,
)
from mnistlab.config import Augment, Normalize, Train


class DataError(RuntimeError):
    """The dataset is missing or malformed."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # float32 [N, 1, 28, 28] in [0, 1]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: slice) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class TrainingData:
    """What a training run reads: the images it learns from, and the split it is scored on
    after every epoch, named as its metrics are (`test_accuracy` or `val_accuracy`)."""

    train: Split
    holdout: Split
    holdout_name: str  # "test" or "val"


def load_training_data(recipe: Train, device: torch.device | str, root: Path = DATA_ROOT,
                       verify_md5: bool = True) -> TrainingData:
    """The training split and the split each epoch is scored on.

    With `train.validation: N` the last N training images are held out and score every
    epoch; the test files are not even read, so nothing chosen by these scores (a best
    epoch, a search's winner) has seen a test image. With 0, each epoch is scored on the
    test set, as the source READMEs did. `train.limit_train` then keeps the first images
    of what is left for training; `train.limit_test` the first test images.
    """
    if not recipe.validation:
        return TrainingData(
            load_split(train=True, root=root, limit=recipe.limit_train, device=device,
                       verify_md5=verify_md5),
            load_split(train=False, root=root, limit=recipe.limit_test, device=device,
                       verify_md5=verify_md5),
            "test")
    images = load_split(train=True, root=root, device=device, verify_md5=verify_md5)
    if recipe.validation >= len(images):
        raise DataError(f"train.validation = {recipe.validation}: the training files hold "
                        f"{len(images):,} images; hold out fewer, so that some are left to "
                        f"train on")
    kept = len(images) - recipe.validation
    train = images[: min(kept, recipe.limit_train) if recipe.limit_train else kept]
    return TrainingData(train, images[kept:], "val")


def load_split(train: bool, root: Path = DATA_ROOT, limit: int = 0,
               device: torch.device | str = "cpu", verify_md5: bool = True) -> Split:
    """Read one MNIST split (the two IDX files torchvision's `MNIST` reads, read here without
    importing torchvision, which costs seconds per stage); `limit` keeps the first N images.
    `verify_md5` (the `data.verify_md5` param) checks both files against MNIST's checksums
    first, so a damaged file of the right size is refused instead of trained on."""
    raw = Path(root) / "MNIST" / "raw"
    images_file, labels_file = (raw / name for name in mnist.split_files(train))
    # Headers and sizes first: a bad file is named, never half-read.
    n_images = check_idx(images_file, IDX_IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
    n_labels = check_idx(labels_file, IDX_LABELS_MAGIC, ())
    if verify_md5:
        for path in (images_file, labels_file):
            found, expected = md5_of_file(path), mnist.FILES[path.name]
            if found != expected:
                raise DataError(f"{path} has md5 {found}, not MNIST's {expected}: the file is "
                                f"damaged or not MNIST; run `dvc repro download` to fetch a "
                                f"good copy")
    if n_images != n_labels:
        raise DataError(f"{images_file} holds {n_images} images but {labels_file} holds "
                        f"{n_labels} labels; run `dvc repro download` to fetch a good copy")
    images = read_idx(images_file).view(n_images, IMAGE_SIZE, IMAGE_SIZE)
    labels = read_idx(labels_file).long()
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_file}: labels must lie in 0..{NUM_CLASSES - 1}; "
                        "run `dvc repro download` to fetch a good copy")
    if limit:
        images, labels = images[:limit], labels[:limit]
    # One conversion to float for the whole split, on the device: batches are then slices.
    images = images.to(device).unsqueeze(1).float().div_(255)
    return Split(images=images, labels=labels.to(device))


def read_idx(path: Path) -> torch.Tensor:
    """The uint8 payload of an IDX file whose header `check_idx` accepted, flat."""
    data = path.read_bytes()
    header_size = 4 * (2 + (data[3] - 1))  # byte 3 of the magic: the number of dimensions
    return torch.frombuffer(bytearray(data[header_size:]), dtype=torch.uint8)


def check_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> int:
    """Check an IDX file's header and size; return its item count."""
    hint = "; run `dvc repro download` to fetch a good copy"
    header_size = 4 * (2 + len(item_shape))
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            header = struct.unpack(f">{2 + len(item_shape)}I", file.read(header_size))
    except FileNotFoundError:
        raise DataError(f"{path} is missing{hint}") from None
    except struct.error:
        raise DataError(f"{path} is too short for an IDX header ({size} bytes){hint}") from None
    found_magic, count, *dims = header
    if found_magic != magic:
        raise DataError(f"{path}: IDX magic number {found_magic}, expected {magic}{hint}")
    if tuple(dims) != item_shape:
        raise DataError(f"{path}: items of shape {tuple(dims)}, expected {item_shape}{hint}")
    expected = header_size + count * math.prod(item_shape)
    if count == 0 or size != expected:
        raise DataError(f"{path}: header says {count} items ({expected} bytes), "
                        f"the file has {size} bytes{hint}")
    return count


def normalize(images: torch.Tensor, stats: Normalize) -> torch.Tensor:
    return (images - stats.mean) / stats.std


# --- batched RandomAffine -------------------------------------------------------------------


def sample_affine(n: int, augment: Augment, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw n sets of RandomAffine parameters, as torchvision's RandomAffine.get_params does:
    angle ~ U(-degrees, degrees), integer pixel shifts ~ round(U(-t*size, t*size)),
    scale ~ U(low, high), x-shear ~ U(-shear, shear), no y-shear."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    max_shift = augment.translate * size
    return {
        "angle": uniform(-augment.degrees, augment.degrees),
        "translate_x": uniform(-max_shift, max_shift).round(),
        "translate_y": uniform(-max_shift, max_shift).round(),
        "scale": uniform(*augment.scale),
        "shear_x": uniform(-augment.shear, augment.shear),
        "shear_y": torch.zeros(n),
    }


def affine_theta(angle: torch.Tensor, translate_x: torch.Tensor, translate_y: torch.Tensor,
                 scale: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor,
                 height: int, width: int) -> torch.Tensor:
    """[N, 2, 3] matrices for `F.affine_grid` that warp like torchvision's `F.affine`.

    This is torchvision's `_get_inverse_affine_matrix` (center at the image centre) computed
    for a whole batch at once, then rescaled from pixels to affine_grid's [-1, 1] coordinates.
    """
    rot, sx, sy = (torch.deg2rad(t.double()) for t in (angle, shear_x, shear_y))
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    scale, tx, ty = scale.double(), translate_x.double(), translate_y.double()
    # The inverse of the rotate-scale-shear matrix (its determinant is 1), divided by scale,
    # with the inverse translation folded in: output pixel -> input pixel.
    m00, m01, m10, m11 = d / scale, -b / scale, -c / scale, a / scale
    m02 = -(m00 * tx + m01 * ty)
    m12 = -(m10 * tx + m11 * ty)
    theta = torch.stack([
        torch.stack([m00, m01 * height / width, m02 * 2 / width], dim=-1),
        torch.stack([m10 * width / height, m11, m12 * 2 / height], dim=-1),
    ], dim=1)
    return theta.float()


def random_affine(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply an independent random affine warp to every image of a [N, C, H, W] batch.

    Parameters are drawn on the CPU generator (so CPU runs are reproducible and the RNG state
    can be checkpointed); the warp itself runs on the images' device. Pixels shifted in from
    outside are 0 (black), as with torchvision's default fill.
    """
    if augment.degrees == 0 and augment.translate == 0 and augment.scale == (1.0, 1.0) and augment.shear == 0:
        return images
    n, _, height, width = images.shape
    params = sample_affine(n, augment, width, generator)
    theta = affine_theta(**params, height=height, width=width).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode=augment.interpolation,
                         padding_mode="zeros", align_corners=False)


def batch_indices(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                  device: torch.device | str) -> list[torch.Tensor]:
    """Index slices that cover 0..n-1 once; the last batch may be smaller, but never a
    batch of one image after others: that one joins the batch before it (BatchNorm cannot
    train on a single value per channel, which one image on a 1x1 map gives it)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.to(device).split(batch_size))
    if batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def steps_per_epoch(n: int, batch_size: int) -> int:
    """len(batch_indices(n, batch_size, ...))."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if batch_size > 1 and steps > 1 and n % batch_size == 1 else steps
