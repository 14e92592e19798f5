"""Classify images of handwritten digits with the champion model (or any MLflow model).

    python -m tools.predict digit.png photo.jpg        (`make predict IMAGES="digit.png ..."`)
    python -m tools.predict --model runs:/<run id>/model digit.png
    python -m tools.predict --url http://127.0.0.1:5001 digit.png     (a `make serve` server)

Any size, white on black or black on white: each image becomes what MNIST is made of. It is
turned grey, inverted when its background is light, cropped to the digit, scaled so that its
longer side is 20 pixels, and placed in a 28 x 28 field with its centre of mass in the middle
(how MNIST's digits were prepared). One line per image: the class and its probability.
Every file is read and checked before the model loads; a file that is not an image, or has
no digit in it, stops the command with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stages.mnist import IMAGE_SIZE

DEFAULT_MODEL = "models:/mnist-cnn@champion"
DIGIT_BOX = 20  # MNIST's digits fit a 20 x 20 box inside the 28 x 28 image


class ImageError(ValueError):
    """A file that cannot be turned into a digit image."""


def mnist_like(path: Path) -> np.ndarray:
    """The image at `path` as a float32 28 x 28 array of pixels 0-255, digit white on black."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float32)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        kind = "an empty file" if path.is_file() and path.stat().st_size == 0 else "not an image"
        raise ImageError(f"{path}: {kind} (PNG or JPEG expected): {err}") from None
    if np.median(_border(grey)) > 127:  # a light background: dark ink on paper
        grey = 255 - grey
    grey = np.clip(grey - np.median(_border(grey)), 0, None)  # the background to 0
    if grey.max() < 32:
        raise ImageError(f"{path}: no digit found (the image is one flat shade)")
    rows, cols = np.nonzero(grey > 0.2 * grey.max())
    digit = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = DIGIT_BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS))
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    top, left = (IMAGE_SIZE - digit.shape[0]) // 2, (IMAGE_SIZE - digit.shape[1]) // 2
    field[top:top + digit.shape[0], left:left + digit.shape[1]] = np.clip(digit, 0, None)
    # Centre of mass to the middle, as MNIST did, without pushing ink off the field.
    ys, xs = np.indices(field.shape)
    total = field.sum()
    shift_y = round(float(IMAGE_SIZE / 2 - 0.5 - (ys * field).sum() / total))
    shift_x = round(float(IMAGE_SIZE / 2 - 0.5 - (xs * field).sum() / total))
    shift_y = int(np.clip(shift_y, -top, IMAGE_SIZE - top - digit.shape[0]))
    shift_x = int(np.clip(shift_x, -left, IMAGE_SIZE - left - digit.shape[1]))
    field = np.roll(field, (shift_y, shift_x), axis=(0, 1))
    return (field * (255.0 / field.max())).astype(np.float32)


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def predict_local(model_uri: str, images: np.ndarray) -> np.ndarray:
    import mlflow

    from stages import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images))


def predict_remote(url: str, images: np.ndarray) -> np.ndarray:
    """POST to a `mlflow models serve` server's /invocations."""
    body = json.dumps({"inputs": images.tolist()}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return np.asarray(json.load(response)["predictions"])
    except urllib.error.HTTPError as err:
        raise ImageError(f"{url} refused the images ({err.code}): "
                         f"{err.read().decode(errors='replace')[:300]}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ImageError(f"{url} cannot be reached: {err}") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", default=DEFAULT_MODEL, help=f"MLflow model URI ({DEFAULT_MODEL})")
    where.add_argument("--url", help="a model server's address, e.g. http://127.0.0.1:5001")
    args = parser.parse_args(argv)
    try:
        images = np.stack([mnist_like(path) for path in args.images])
        if args.url:
            probabilities = predict_remote(args.url, images)
        else:
            probabilities = predict_local(args.model, images)
    except ImageError as err:
        sys.exit(f"predict: error: {err}")
    except Exception as err:  # noqa: BLE001 - MLflow's errors when the model is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.exit(f"predict: error: cannot load {args.model}: {first} (train one with `dvc repro`, "
                 f"then `make promote`)")
    for path, row in zip(args.images, probabilities, strict=True):
        digit = int(np.argmax(row))
        print(f"{path}: {digit} (probability {row[digit]:.3f})")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
