"""Classify images of handwritten digits with the champion model (or any MLflow model).

    python -m tools.predict digit.png photo.jpg        (`make predict IMAGES="digit.png ..."`)
    python -m tools.predict --model runs:/<run id>/model digit.png
    python -m tools.predict --url http://127.0.0.1:5001 digit.png     (a `make serve` server)

Any size, white on black or black on white, a scan, a drawing app's PNG (a transparent
background is read as paper) or a phone photo: each image becomes what MNIST is made of. It is
turned grey; the paper's uneven lighting is flattened (a smooth surface fitted to the paper,
the ink left out, is subtracted); the ink is told from the paper by a threshold chosen from the
image (Otsu's); the digit is the largest connected stroke and the pieces of the same digit near
it (specks of noise, and marks far from the digit, are left out); it is cropped, scaled so
that its longer side is 20 pixels, and placed in a 28 x 28 field with its centre of mass in
the middle (how MNIST's digits were prepared). One line per image: the class and its
probability. Every file is read and checked before the model loads; a file that is not an
image, or has no digit in it, is named in one line on stderr, the others are classified, and
the command then exits with status 1. With no files named, the IMAGES environment variable
lists them (quoted as in a shell: IMAGES='"my digits/a.png" b.png').
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnistlab.mnist import IMAGE_SIZE

DEFAULT_MODEL = "models:/mnist-cnn@champion"
DIGIT_BOX = 20  # MNIST's digits fit a 20 x 20 box inside the 28 x 28 image
MIN_CONTRAST = 32  # ink that stands out from the paper by less than this (of 255) is no digit
NOISE_MARGIN = 4  # ... nor is ink that stands out by less than this many times the grain
WORK_SIDE = 1024  # a larger image is shrunk to this longer side first; a digit needs 20 pixels
FIT_SIDE = 64  # the lighting surface is fitted on the image shrunk to at most this side
PIECE_SHARE = 0.05  # a piece of the digit holds at least this share of its main stroke's ink
PIECE_REACH = 0.35  # ... and lies within this share of the digit's longer side of it


class ImageError(ValueError):
    """A file that cannot be turned into a digit image."""


def mnist_like(path: Path) -> np.ndarray:
    """The image at `path` as a float32 28 x 28 array of pixels 0-255, digit white on black."""
    ink = ink_of(read_grey(path), path)
    rows, cols = np.nonzero(ink > 0.2 * ink.max())
    digit = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return centred(digit)


def read_grey(path: Path) -> np.ndarray:
    """The image as float32 grey levels 0-255: turned upright as the camera recorded it, a
    transparent background laid on paper that contrasts with what is drawn on it, and shrunk
    to at most WORK_SIDE pixels a side."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if "A" in image.getbands() or "transparency" in image.info:
                image = over_paper(image.convert("RGBA"))
            image = image.convert("L")
            if max(image.size) > WORK_SIDE:  # a camera's 12 megapixels: seconds for nothing
                scale = WORK_SIDE / max(image.size)
                image = image.resize((max(1, round(image.width * scale)),
                                      max(1, round(image.height * scale))), Image.Resampling.BOX)
            return np.asarray(image, dtype=np.float32)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        kind = "an empty file" if path.is_file() and path.stat().st_size == 0 else "not an image"
        raise ImageError(f"{path}: {kind} (PNG or JPEG expected): {err}") from None


def over_paper(image):
    """An RGBA image laid on white paper, or on black when what is drawn is light: a drawing
    app's black strokes on a transparent background become black on white, not one shade."""
    from PIL import Image

    rgba = np.asarray(image, dtype=np.float32)
    alpha = rgba[..., 3] / 255
    drawn = (rgba[..., :3].mean(axis=2) * alpha).sum() / max(alpha.sum(), 1e-6)
    paper = Image.new("RGBA", image.size, (0, 0, 0, 255) if drawn > 127 else (255,) * 4)
    return Image.alpha_composite(paper, image)


def ink_of(grey: np.ndarray, path: Path) -> np.ndarray:
    """How much ink each pixel holds, 0-255, on a black background: zero everywhere but on the
    digit (its main stroke and the pieces near it)."""
    from scipy import ndimage

    flat = grey - lighting(grey)
    # The ink is the side the big departures from the paper lie on: dark ink on light paper,
    # or chalk-white strokes on black.
    deep = NOISE_MARGIN * _spread(flat)
    if np.abs(flat[flat < -deep]).sum() > flat[flat > deep].sum():
        flat = -flat
    # The mask is taken on a lightly smoothed copy, so that single noisy pixels neither pass
    # the threshold nor break a stroke in two; the ink levels come from the image itself.
    smooth = ndimage.gaussian_filter(flat, sigma=max(1.0, min(flat.shape) / 200))
    grain, peak = _spread(smooth), float(smooth.max())
    if peak < MIN_CONTRAST:
        raise ImageError(f"{path}: no digit found (the image is one flat shade)")
    if peak < 2 * NOISE_MARGIN * grain:
        raise ImageError(f"{path}: no digit found (nothing stands out from the image's noise)")
    high = max(otsu(np.clip(smooth, 0, None)), 0.2 * peak, NOISE_MARGIN * grain)
    core = digit_mask(smooth > high)
    # Hysteresis: the faint rim of the digit's strokes (anti-aliasing, blur) is what lies above
    # a low level and touches the digit; noise near it stays below that level.
    labels, _ = ndimage.label(smooth > max(0.05 * peak, NOISE_MARGIN * grain / 2),
                              structure=np.ones((3, 3), dtype=bool))
    digit = np.isin(labels, np.unique(labels[core])) & (labels > 0) | core
    # Strokes saturate at 255 as MNIST's do, measured on the ink inside the core.
    ink = np.clip(flat, 0, None)
    level = max(float(np.percentile(ink[core], 90)), 1e-6)
    return np.where(digit, np.clip(ink * (255.0 / level), 0, 255), 0).astype(np.float32)


def _spread(values: np.ndarray) -> float:
    """The standard deviation of the values' bulk (the paper's noise), robust to the ink."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def lighting(grey: np.ndarray) -> np.ndarray:
    """The paper's brightness everywhere: a cubic surface in x and y fitted to the image shrunk
    to FIT_SIDE pixels, refitted with the pixels far from it (the ink) left out. A smooth
    surface follows a lighting gradient and a lens's vignette but not a stroke, which a blur
    would smear into the background, hollowing a bold digit."""
    from PIL import Image

    height, width = grey.shape
    scale = min(1.0, FIT_SIDE / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(grey).resize(small_size, Image.Resampling.BOX),
                       dtype=np.float64)
    basis, values = _cubic_terms(small.shape), small.ravel()
    # A start that leaves the ink out already: the pixels near the image's typical level.
    paper = np.abs(values - np.median(values)) < 2.5 * _spread(values) + 1.0
    if paper.sum() < 3 * basis.shape[1]:  # too small an image to fit a surface to
        return np.full(grey.shape, np.median(values), dtype=np.float32)
    for _ in range(5):
        coef = np.linalg.lstsq(basis[paper], values[paper], rcond=None)[0]
        off = values - basis @ coef
        kept = np.abs(off) < 2.5 * _spread(off[paper]) + 1.0
        if kept.sum() < 3 * basis.shape[1] or (kept == paper).all():
            break
        paper = kept
    return (_cubic_terms(grey.shape) @ coef).reshape(grey.shape).astype(np.float32)


def _cubic_terms(shape: tuple[int, int]) -> np.ndarray:
    """x^i y^j for i + j <= 3 at every pixel of an image of `shape`, x and y from -1 to 1: one
    row per pixel, one column per term."""
    ys, xs = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]),
                         indexing="ij")
    return np.stack([xs.ravel() ** i * ys.ravel() ** j
                     for i in range(4) for j in range(4 - i)], axis=1)


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold: the level that best splits the values' histogram in two classes (the
    largest between-class variance)."""
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mass = np.cumsum(counts * centres)
    below, above = weight[:-1], weight[-1] - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mass[:-1] / below - (mass[-1] - mass[:-1]) / above) ** 2
    return float(edges[1:-1][np.nanargmax(np.nan_to_num(between, nan=-1.0))])


def digit_mask(ink: np.ndarray) -> np.ndarray:
    """The digit among the thresholded ink: its largest connected stroke, and each other piece
    of at least PIECE_SHARE of that stroke's size within PIECE_REACH of the digit's longer side
    (a 5's detached bar, a 4's open top), taken nearest first. Specks of noise are smaller;
    a smudge or the paper's edge is further away."""
    from scipy import ndimage

    labels, count = ndimage.label(ink, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = [(rows.start, cols.start, rows.stop, cols.stop)
             for rows, cols in ndimage.find_objects(labels)]
    main = int(np.argmax(sizes))
    box, kept = boxes[main], [main]
    pieces = [i for i in range(count) if i != main and sizes[i] >= PIECE_SHARE * sizes[main]]
    while pieces:
        nearest = min(pieces, key=lambda i: _gap(boxes[i], box))
        if _gap(boxes[nearest], box) > PIECE_REACH * max(box[2] - box[0], box[3] - box[1]):
            break
        pieces.remove(nearest)
        kept.append(nearest)
        other = boxes[nearest]
        box = (min(box[0], other[0]), min(box[1], other[1]),
               max(box[2], other[2]), max(box[3], other[3]))
    return np.isin(labels, np.asarray(kept) + 1)


def _gap(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Pixels between two boxes (top, left, bottom, right; 0 where they touch or overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3], 0)


def centred(digit: np.ndarray) -> np.ndarray:
    """A cropped digit scaled so that its longer side is DIGIT_BOX pixels and placed with its
    centre of mass in the middle of the 28 x 28 field, pixels 0-255."""
    from PIL import Image

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


def predict_local(model_uri: str, images: np.ndarray) -> np.ndarray:
    import mlflow

    from mnistlab import tracking

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


def image_paths(named: Sequence[Path]) -> list[Path]:
    """The files named on the command line or, with none, in the IMAGES environment variable
    (what `make predict IMAGES=...` passes on): split as a shell splits words, so a path with
    spaces is quoted, unless the whole value is one existing file."""
    if named:
        return list(named)
    value = os.environ.get("IMAGES", "").strip()
    if not value:
        return []
    if Path(value).is_file():
        return [Path(value)]
    try:
        return [Path(word) for word in shlex.split(value)]
    except ValueError as err:  # an unclosed quote
        sys.exit(f"predict: error: IMAGES={value!r}: {err}; quote a path with spaces as in a "
                 f"shell, e.g. IMAGES='\"my digits/a.png\" b.png'")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*", type=Path,
                        help="PNG or JPEG files (default: those the IMAGES variable lists)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", default=DEFAULT_MODEL, help=f"MLflow model URI ({DEFAULT_MODEL})")
    where.add_argument("--url", help="a model server's address, e.g. http://127.0.0.1:5001")
    args = parser.parse_args(argv)
    paths = image_paths(args.images)
    if not paths:
        parser.error("name at least one image file (or list them in IMAGES)")
    # Every file is read before the model loads; a bad one is named and the rest go on.
    fields, good, failed = [], [], 0
    for path in paths:
        try:
            fields.append(mnist_like(path))
            good.append(path)
        except ImageError as err:
            print(f"predict: error: {err}", file=sys.stderr)
            failed += 1
    if good:
        try:
            if args.url:
                probabilities = predict_remote(args.url, np.stack(fields))
            else:
                probabilities = predict_local(args.model, np.stack(fields))
        except ImageError as err:
            sys.exit(f"predict: error: {err}")
        except Exception as err:  # noqa: BLE001 - MLflow's errors when the model is missing
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            sys.exit(f"predict: error: cannot load {args.model}: {first} (train one with "
                     f"`dvc repro`, then `make promote`)")
        for path, row in zip(good, probabilities, strict=True):
            digit = int(np.argmax(row))
            print(f"{path}: {digit} (probability {row[digit]:.3f})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
