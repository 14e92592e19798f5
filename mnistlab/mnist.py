"""What MNIST is, in one place: the image size, the classes, the four raw files and their
checksums, and the IDX format they are written in. No torch here: the download and
validate stages import it and start in a fraction of a second."""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 28  # 1 x 28 x 28 in, 10 classes out
IN_CHANNELS = 1
NUM_CLASSES = 10
TRAIN_IMAGES = 60_000  # in MNIST's training files
TEST_IMAGES = 10_000  # in MNIST's test files

DATA_ROOT = Path("data")  # torchvision's `MNIST(root="data")` reads DATA_ROOT/MNIST/raw
RAW_DIR = DATA_ROOT / "MNIST" / "raw"

# name -> md5 of the uncompressed IDX file, whatever source it came from. The download
# stage accepts nothing else, and the training stages check them before they read.
FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# IDX headers: big-endian uint32 magic (unsigned bytes, 3 or 1 dimensions), then the sizes.
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


def split_files(train: bool) -> tuple[str, str]:
    """The (images, labels) file names of one split."""
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def idx_images(pixels: bytes, count: int) -> bytes:
    """An IDX3 file of `count` 28x28 uint8 images."""
    return _header(IDX_IMAGES_MAGIC, count, IMAGE_SIZE, IMAGE_SIZE) + pixels


def idx_labels(labels: bytes) -> bytes:
    """An IDX1 file of uint8 labels."""
    return _header(IDX_LABELS_MAGIC, len(labels)) + labels


def _header(*fields: int) -> bytes:
    return b"".join(field.to_bytes(4, "big") for field in fields)
