"""What an architecture weighs before torch builds it: the shape walk over a 28x28 image, the
parameter count, and the memory a training run of it needs.

One walk serves everyone: params validation (a layer that does not fit fails here, with the
layer named, not deep inside torch), `build_model`, the parameter report, the search's
budget and the validate stage's memory check. No torch and no pydantic here: the layers are
read by their one key (`conv`, `transition`, `maxpool`, `dropout`, `dropout2d`), so that
mnistlab.config can call this module without this module needing config's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mnistlab.mnist import IMAGE_SIZE, IN_CHANNELS, NUM_CLASSES, TEST_IMAGES, TRAIN_IMAGES

# The architecture (`model`) and the whole params (`params`) are mnistlab.config's Model and
# Params; they stay unnamed here, because config calls this module to validate them.
Model = Params = Any


@dataclass(frozen=True)
class LayerShape:
    """One layer as it meets a 28x28 image: what comes in, what goes out, what it weighs."""

    index: int
    layer: Any         # a layer of mnistlab.config: ConvLayer, TransitionLayer, ...
    in_channels: int
    channels: int      # out
    size: int          # side of the output map
    batchnorm: bool    # a conv followed by BatchNorm
    params: int


def conv_padding(model: Model, layer: Any) -> int:
    """A conv layer's own padding, else the model's: "same" keeps the map's size."""
    if layer.padding is not None:
        return layer.padding
    return layer.kernel // 2 if model.padding == "same" else 0


def walk(model: Model) -> list[LayerShape]:
    """Every layer's shapes and parameters over a 28x28 input. A layer that does not fit
    raises ValueError naming it (pydantic reports it as an error of `model.layers`)."""
    shapes, size, channels = [], IMAGE_SIZE, IN_CHANNELS
    for index, layer in enumerate(model.layers):
        where = f"layers.{index} ({_describe(layer)}) on a {size}x{size} feature map"
        out, batchnorm, params = channels, False, 0
        if hasattr(layer, "conv"):
            padding = conv_padding(model, layer)
            if layer.kernel > size + 2 * padding:
                raise ValueError(
                    f"{where}: kernel {layer.kernel} with padding {padding} does not fit; "
                    f"use a kernel of at most {size + 2 * padding}"
                )
            size = size + 2 * padding - layer.kernel + 1
            out = layer.conv
            batchnorm = model.batchnorm if layer.bn is None else layer.bn
            params = channels * out * layer.kernel ** 2 + out * model.bias + 2 * out * batchnorm
        elif hasattr(layer, "transition") or hasattr(layer, "maxpool"):
            pool = 2 if hasattr(layer, "transition") else layer.maxpool
            if size // pool < 1:
                raise ValueError(f"{where}: pooling by {pool} shrinks it below 1x1")
            size //= pool
            if hasattr(layer, "transition"):
                out = layer.transition
                params = channels * out + out * model.bias
        shapes.append(LayerShape(index, layer, channels, out, size, batchnorm, params))
        channels = out
    return shapes


def head_params(model: Model) -> int:
    """The classifier head's parameters: a linear layer over the last map ("fc") or over
    its channel means ("gap")."""
    last = walk(model)[-1]
    features = last.channels * (last.size ** 2 if model.head == "fc" else 1)
    return features * NUM_CLASSES + NUM_CLASSES * model.bias


def parameter_count(model: Model) -> int:
    """What `count_parameters(build_model(model))` gives, without torch."""
    return sum(shape.params for shape in walk(model)) + head_params(model)


def batch_images(params: Params, train_images: int = TRAIN_IMAGES) -> tuple[int, int]:
    """The most images one training batch and one scoring batch hold: never more than the
    images there are (batch_size 100,000 over train.limit_train 2,048 trains in batches of
    2,048). Scoring is of the validation split, or of train.limit_test test images."""
    trained = train_images - params.train.validation
    if params.train.limit_train:
        trained = min(trained, params.train.limit_train)
    scored = params.train.validation or min(params.train.limit_test or TEST_IMAGES, TEST_IMAGES)
    return (min(params.train.batch_size, trained), min(params.evaluate.batch_size, scored))


def training_memory_bytes(params: Params, train_images: int = TRAIN_IMAGES,
                          batch: int | None = None) -> int:
    """A generous estimate of the memory one training run of `params` takes on its device
    (with `batch`: in batches of that many images, instead of the params' own).

    Weights, gradients and two optimiser buffers (4 copies of every parameter); every
    layer's output kept for the backward pass and its gradient (conv, BatchNorm and ReLU
    each keep one map: 3 per conv, 1 per pool or dropout) for the larger of a training and
    a scoring batch; the training set and one augmented epoch of it, as float32. It errs
    high: its job is to refuse a model that cannot fit (hundreds of GB) before any work
    starts, not to plan to the megabyte.
    """
    float_bytes = 4
    per_image = 0
    for shape in walk(params.model):
        maps = 3 if hasattr(shape.layer, "conv") else 1
        per_image += maps * shape.channels * shape.size ** 2
    if batch is None:
        batch = max(batch_images(params, train_images))
    images = train_images if not params.train.limit_train else min(params.train.limit_train, train_images)
    dataset = 2 * images * IMAGE_SIZE ** 2
    return float_bytes * (4 * parameter_count(params.model) + 2 * batch * per_image + dataset)


def _describe(layer: Any) -> str:
    return ", ".join(f"{key}: {value}" for key, value in layer.model_dump(exclude_defaults=True).items())
