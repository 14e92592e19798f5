"""The CNN, built from `model.*` params, and the per-layer parameter report.

One builder serves every source: the architecture is data (a list of layers in params.yaml),
so a new model is a new preset file, not new code.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from mnistlab import geometry
from mnistlab.mnist import IMAGE_SIZE, IN_CHANNELS, NUM_CLASSES
from mnistlab.config import (
    ConvLayer,
    Dropout2dLayer,
    DropoutLayer,
    MaxPoolLayer,
    Model,
    TransitionLayer,
)


def build_model(spec: Model, inplace_relu: bool = True) -> nn.Sequential:
    """Layers named conv1, bn1, relu1, pool1, ... so reports and state dicts read clearly.
    Shapes come from `geometry.walk(spec)`, the same walk that validated them. Each ReLU overwrites
    its input (no conv or BatchNorm backward reads its own output, so autograd allows it),
    which saves a tensor's allocation and write per ReLU; `inplace_relu=False` builds the
    sources' plain `nn.ReLU()` for the benchmark of their way."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    counts: dict[str, int] = {}

    def add(kind: str, module: nn.Module) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        layers[f"{kind}{counts[kind]}"] = module

    shapes = geometry.walk(spec)
    for shape in shapes:
        layer = shape.layer
        if isinstance(layer, ConvLayer):
            add("conv", nn.Conv2d(shape.in_channels, shape.channels, layer.kernel,
                                  padding=geometry.conv_padding(spec, layer), bias=spec.bias))
            after = {"bn": shape.batchnorm, "relu": layer.relu}
            for kind in ("relu", "bn") if spec.order == "relu_bn" else ("bn", "relu"):
                if after[kind]:
                    add(kind, nn.BatchNorm2d(shape.channels) if kind == "bn"
                        else nn.ReLU(inplace=inplace_relu))
        elif isinstance(layer, TransitionLayer):
            add("pool", nn.MaxPool2d(2))
            add("conv", nn.Conv2d(shape.in_channels, shape.channels, 1, bias=spec.bias))
            if layer.relu:
                add("relu", nn.ReLU(inplace=inplace_relu))
        elif isinstance(layer, MaxPoolLayer):
            add("pool", nn.MaxPool2d(layer.maxpool))
        elif isinstance(layer, DropoutLayer):
            add("dropout", nn.Dropout(layer.dropout))
        elif isinstance(layer, Dropout2dLayer):
            add("dropout", nn.Dropout2d(layer.dropout2d))

    last = shapes[-1]
    if spec.head == "fc":
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(last.channels * last.size ** 2, NUM_CLASSES, bias=spec.bias)
    else:  # gap: a 1x1 conv on the pooled 1x1 map is a linear classifier without flattening first
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["classifier"] = nn.Conv2d(last.channels, NUM_CLASSES, 1, bias=spec.bias)
        layers["flatten"] = nn.Flatten()
    return nn.Sequential(layers)


class PixelClassifier(nn.Module):
    """The trained network behind the input a user has: raw pixels, 0 to 255 (uint8 or float),
    N x 28 x 28 or N x 1 x 28 x 28, in; class probabilities, N x 10, out. The scaling and the
    normalisation that training applied happen inside, so a caller cannot forget them.
    (This is the network of the model logged to MLflow and served, exported as a graph; the
    model around it, tools/serve.py, first refuses what is not a pixel and reads images
    scaled to [0, 1]. models/model.pt keeps the bare network.)"""

    def __init__(self, network: nn.Module, mean: float, std: float):
        super().__init__()
        self.network = network
        # Normalising x / 255 with (mean, std) is normalising x with 255 * (mean, std).
        self.register_buffer("mean", torch.tensor(255.0 * mean))
        self.register_buffer("std", torch.tensor(255.0 * std))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(1)
        images = (pixels.float() - self.mean) / self.std
        return torch.softmax(self.network(images), dim=1)


def feature_map_size(spec: Model) -> int:
    """Side of the last feature map for a 28x28 input."""
    return geometry.walk(spec)[-1].size


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layer_table(model: nn.Sequential) -> list[dict]:
    """One row per layer: name, type, output shape, parameters and receptive field.

    Shapes come from a real forward pass (hooks), so they cannot drift from the model.
    The receptive field (in input pixels, padding included) grows by (kernel - 1) * jump at
    each conv or pool, and the jump is multiplied by the stride.
    """
    shapes: dict[str, list[int]] = {}
    hooks = [module.register_forward_hook(
        lambda _m, _in, out, name=name: shapes.__setitem__(name, list(out.shape[1:])))
        for name, module in model.named_children()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE,
                              device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    rows, receptive_field, jump, side = [], 1, 1, IMAGE_SIZE
    for name, module in model.named_children():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            kernel, stride = _first(module.kernel_size), _first(module.stride)
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.Linear)):
            kernel, stride = side, side  # pools (or weighs) the whole last feature map
        else:
            kernel, stride = 1, 1
        receptive_field += (kernel - 1) * jump
        jump *= stride
        if len(shapes[name]) == 3:
            side = shapes[name][-1]
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "output_shape": shapes[name],
            "params": sum(p.numel() for p in module.parameters()),
            "receptive_field": receptive_field,
        })
    return rows


def _first(value: int | tuple[int, ...]) -> int:
    return value[0] if isinstance(value, tuple) else value
