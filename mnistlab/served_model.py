"""The model the train stage logs and `make serve` serves: checked pixels in, probabilities out.

MLflow logs this file as the model's code ("model from code"): it copies it into the logged
model and runs it on its own when the model loads (in the scoring server, or
`mlflow.pyfunc.load_model`), so at the top it imports only numpy and mlflow. `PixelModel`
checks a request's pixels, then runs the trained network, logged beside it as an exported
graph of `PixelClassifier` (raw pixels in, class probabilities out). A graph cannot refuse a
request with a message, so the checks come first, here:

- every value must be a finite number within 0..255: anything else is refused, by the server
  with HTTP 400 and by `predict` with an MlflowException (INVALID_PARAMETER_VALUE), naming the
  value and what is expected;
- an image whose pixels all lie within 0..1 was scaled to [0, 1] by its sender, and is read
  as such (times 255). Such an image in 0..255 would be black to the eye either way.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

NETWORK = "network"  # the artifact that holds the exported PixelClassifier
PIXEL_MAX = 255
EXPECTED = "expected raw pixels 0..255 (or images scaled to 0..1), N x 28 x 28"


def check_pixels(model_input) -> np.ndarray:
    """The request's images as float32 pixels 0..255 (an image whose pixels all lie within 0..1
    multiplied by 255); an MlflowException (HTTP 400) naming the first value that is not a
    pixel."""
    pixels = np.asarray(model_input)
    if pixels.dtype.kind not in "iuf":
        raise MlflowException.invalid_parameter_value(
            f"pixels of type {pixels.dtype} are not numbers: {EXPECTED}")
    # Checked before the cast to float32, which would turn a float64 1e308 into inf.
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(pixels) | (pixels < 0) | (pixels > PIXEL_MAX)
    if bad.any():
        where, count = tuple(int(i) for i in np.argwhere(bad)[0]), int(bad.sum())
        raise MlflowException.invalid_parameter_value(
            f"pixel value {pixels[where].item()!r} at index {list(where)} is not a number "
            f"within 0..255 ({count} such value{'s' if count > 1 else ''} in all): {EXPECTED}")
    pixels = pixels.astype(np.float32)  # a copy: the caller's array is not scaled in place
    if pixels.ndim > 1:  # one decision per image, so that no image's answer depends on others
        unit = pixels.reshape(len(pixels), -1).max(axis=1, initial=0) <= 1
        pixels[unit] *= PIXEL_MAX
    return pixels


class PixelModel(PythonModel):
    """Pixels checked (`check_pixels`), then the exported `PixelClassifier`: N x 10
    probabilities."""

    def load_context(self, context) -> None:
        self.network = mlflow.pytorch.load_model(context.artifacts[NETWORK])

    # np.ndarray: a type hint MLflow infers no schema from, so the logged signature rules.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        pixels = check_pixels(model_input)
        with torch.no_grad():
            return self.network(torch.from_numpy(pixels)).numpy()


# Run as the logged model's code, this names the model; imported, it does no harm.
mlflow.models.set_model(PixelModel())
