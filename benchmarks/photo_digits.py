"""Does `make predict` read digits people photograph? Clean MNIST digits against phone-photo-like
ones, through the same preparation (tools.predict.mnist_like) and the same model.

    python -m benchmarks.photo_digits                        # models/model.pt, when there is one
    python -m benchmarks.photo_digits --model models/model.pt
    python -m benchmarks.photo_digits --model runs:/<run id>/model   (or models:/mnist-cnn@champion)
    python -m benchmarks.photo_digits --count 100 --seed 0 --out /tmp/photos

Takes the first `--count` MNIST TEST digits (data/MNIST/raw/t10k-*, read by mnistlab.data) and
writes each twice to `--out` (a new temporary folder by default): as the 28 x 28 MNIST file it
is (`<i>-clean.png`), and as a phone photo of it (`<i>-photo-<label>.jpg`): dark ink on light
paper lit unevenly (a gradient and a vignette), placed off-centre on a 160 x 120 page, blurred
a little, with Gaussian sensor noise, saved as JPEG at quality 70 to 85. Everything random
comes from `--seed`, so a run is repeatable. Both sets go through the preparation `make
predict` applies, then:

- with a model (models/model.pt, or `--model` a checkpoint path or an MLflow model URI): the
  accuracy on the clean digits and on the photo-like ones;
- without one (none is trained here): the preparation's quality without a classifier, as the
  agreement of each prepared photo with the same digit's prepared clean file (correlation and
  mean absolute difference of the 28 x 28 fields) and the accuracy of a nearest-neighbour
  reading (each prepared image labelled as the nearest, in pixels, of the first 10,000 MNIST
  training digits; nothing is fitted).

The test digits are only measured here: nothing is trained or tuned on them, and the
preparation's settings were not chosen by this command's numbers on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mnistlab.paths import MODEL_FILE
from tools.predict import ImageError, mnist_like

PAGE = (120, 160)  # height, width of the photographed page, pixels
NEIGHBOURS = 10_000  # training digits the nearest-neighbour reading compares against


def photo_like(digit: np.ndarray, rng: np.random.Generator):
    """A 28 x 28 MNIST digit (white on black, 0-255) as a phone photo of it written on paper."""
    from PIL import Image, ImageFilter

    height, width = PAGE
    side = int(rng.integers(56, 92))  # the 28 x 28 field, so the digit is about 40 to 66 px
    ink = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC),
                     dtype=np.float32).clip(0, 255) / 255
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    cover = np.zeros(PAGE, dtype=np.float32)
    cover[top:top + side, left:left + side] = ink
    # Reflectance: paper about 0.85, ink 0.1 to 0.3; light: a gradient in a random direction
    # and a vignette around a point near the middle.
    reflect = 0.85 * (1 - cover) + rng.uniform(0.1, 0.3) * cover
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0.15, 0.35) * (np.cos(angle) * xs + np.sin(angle) * ys)
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    vignette = 1 - rng.uniform(0.2, 0.45) * ((ys - cy) ** 2 + (xs - cx) ** 2) / 2
    light = rng.uniform(190, 255) * gradient * vignette
    grey = light * reflect
    tint = np.array([1.0, 0.97, 0.9], dtype=np.float32)  # warm indoor light
    rgb = grey[..., None] * tint
    blurred = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.7, 1.5)))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0, rng.uniform(4, 10), rgb.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), int(rng.integers(70, 86))


def write_images(digits: np.ndarray, labels: np.ndarray, out: Path,
                 seed: int) -> tuple[list[Path], list[Path]]:
    """Each digit as its clean MNIST file and as a photo-like JPEG, in `out`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    clean, photos = [], []
    for i, (digit, label) in enumerate(zip(digits, labels, strict=True)):
        clean.append(out / f"{i:03d}-clean-{label}.png")
        Image.fromarray(digit).save(clean[-1])
        photo, quality = photo_like(digit, rng)
        photos.append(out / f"{i:03d}-photo-{label}.jpg")
        photo.save(photos[-1], quality=quality)
    return clean, photos


def prepared(paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """The fields `make predict` would classify (a zero field where the file is refused), and
    the refusals."""
    fields, refused = [], []
    for path in paths:
        try:
            fields.append(mnist_like(path))
        except ImageError as err:
            fields.append(np.zeros((28, 28), dtype=np.float32))
            refused.append(str(err))
    return np.stack(fields), refused


def classifier(model: str | None):
    """Probabilities of a batch of fields, from a checkpoint file or an MLflow model URI; None
    when there is no model to use."""
    if model is None:
        if not MODEL_FILE.is_file():
            return None
        model = str(MODEL_FILE)
    if Path(model).is_file():
        import torch

        from mnistlab.checkpoint import ModelFileError, load_model
        from mnistlab.model import PixelClassifier

        try:
            network, params, _ = load_model(Path(model))
        except ModelFileError as err:
            sys.exit(f"photo_digits: error: {err}")
        normalize = params.train.normalize
        pixels = PixelClassifier(network.eval(), normalize.mean, normalize.std).eval()

        def run(fields: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return pixels(torch.from_numpy(fields)).numpy()
        return run

    import mlflow

    from mnistlab import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except Exception as err:  # noqa: BLE001 - MLflow's errors when the model is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.exit(f"photo_digits: error: cannot load {model}: {first}")
    return lambda fields: np.asarray(loaded.predict(fields))


def nearest_labels(fields: np.ndarray, references: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The label of each field's nearest reference digit (Euclidean distance in pixels)."""
    a = fields.reshape(len(fields), -1).astype(np.float64)
    b = references.reshape(len(references), -1).astype(np.float64)
    distances = (a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None, :]
    return labels[np.argmin(distances, axis=1)]


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of fields."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.maximum(np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1)), 1e-9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.photo_digits",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", help=f"a checkpoint (default {MODEL_FILE}, when present) or "
                                        f"an MLflow model URI")
    parser.add_argument("--count", type=int, default=100, help="test digits (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the photos' random seed (0)")
    parser.add_argument("--out", type=Path, help="folder for the images (default: a new "
                                                 "temporary folder)")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 10_000:
        parser.error(f"--count {args.count}: the test files hold 10,000 digits; ask for 1 to "
                     f"10000")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: the folder is not empty; name a new or empty one")
    if args.model is not None and not Path(args.model).is_file() and ":" not in args.model:
        parser.error(f"--model {args.model}: no such file; give a checkpoint such as "
                     f"{MODEL_FILE} or an MLflow model URI (runs:/<id>/model, "
                     f"models:/<name>@<alias>)")

    from mnistlab.data import DataError, load_split

    run = classifier(args.model)  # a bad model is refused before any image is written
    try:
        test = load_split(train=False, limit=args.count)
    except (DataError, OSError) as err:
        sys.exit(f"photo_digits: error: {err} (fetch MNIST with `dvc repro download`)")
    digits = (test.images[:, 0] * 255).round().byte().numpy()
    labels = test.labels.numpy()
    out = args.out or Path(tempfile.mkdtemp(prefix="photo_digits-"))
    out.mkdir(parents=True, exist_ok=True)
    clean_paths, photo_paths = write_images(digits, labels, out, args.seed)
    clean, clean_refused = prepared(clean_paths)
    photos, photo_refused = prepared(photo_paths)
    n = len(labels)
    print(f"photo_digits: {n} MNIST test digits, seed {args.seed}; images in {out}")
    for what, refused in (("clean", clean_refused), ("photo-like", photo_refused)):
        if refused:
            print(f"  {what}: {len(refused)} refused by the preparation, e.g. {refused[0]}")
    if run is not None:
        right_clean = int((run(clean).argmax(1) == labels).sum())
        right_photo = int((run(photos).argmax(1) == labels).sum())
        print(f"  model {args.model or MODEL_FILE}")
        print(f"  accuracy, clean 28x28 digits:  {right_clean}/{n} = {right_clean / n:.1%}")
        print(f"  accuracy, photo-like digits:   {right_photo}/{n} = {right_photo / n:.1%}")
        return

    train = load_split(train=True, limit=NEIGHBOURS)
    references = (train.images[:, 0] * 255).numpy()
    known = train.labels.numpy()
    near_clean = int((nearest_labels(clean, references, known) == labels).sum())
    near_photo = int((nearest_labels(photos, references, known) == labels).sum())
    agree = correlation(photos, clean)
    difference = np.abs(photos - clean).mean(axis=(1, 2))
    print(f"  no model: {MODEL_FILE} is missing and no --model was given, so no accuracy; "
          f"once one is trained (`dvc repro`), run: python -m benchmarks.photo_digits "
          f"--model {MODEL_FILE}")
    print(f"  nearest-neighbour reading (of {len(known):,} training digits, nothing fitted):")
    print(f"    clean 28x28 digits:  {near_clean}/{n} = {near_clean / n:.1%}")
    print(f"    photo-like digits:   {near_photo}/{n} = {near_photo / n:.1%}")
    print(f"  prepared photo against prepared clean digit: correlation median "
          f"{np.median(agree):.3f} (worst {agree.min():.3f}), mean absolute difference "
          f"{difference.mean():.1f} of 255")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
