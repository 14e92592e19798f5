"""Property tests of the architecture builder (mnistlab/model.py) and its validation
(mnistlab/config.py), with hypothesis.

Random layer lists (convs with random channels, kernels, paddings and BatchNorm/ReLU flags;
transitions; max-pools; dropouts) under a random head, padding mode, bias and BatchNorm
setting go into `parse_params` as a full params mapping. For every one of them:

* validation either refuses it with a ParamsError whose lines name `model.`... keys, or
  accepts it; it accepts exactly the architectures that torch can run on a 28x28 image
  and that have at least one convolution (checked against torch's own conv/pool ops, not
  against the pipeline's arithmetic);
* an accepted one builds, maps a (3, 1, 28, 28) batch to (3, 10), reports its parameters
  consistently (`count_parameters` == the report's total == the sum of its rows) and
  `feature_map_size` equals the side of the real last feature map.

A second property throws junk at random keys of params.yaml: the answer is a Params or a
ParamsError, never another exception from inside the error formatting.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from mnistlab.report import parameter_report
from mnistlab import geometry
from mnistlab.mnist import IMAGE_SIZE, NUM_CLASSES
from mnistlab.model import build_model, count_parameters, feature_map_size
from mnistlab.config import Params, ParamsError, parse_params

REPO = Path(__file__).resolve().parents[1]
# Loaded once: hypothesis runs many examples per test, function-scoped fixtures would not reset.
DEFAULT_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- strategies ----------------------------------------------------------------------------

conv_layers = st.fixed_dictionaries(
    {"conv": st.integers(1, 32)},
    optional={"kernel": st.integers(1, 7), "padding": st.none() | st.integers(0, 3),
              "bn": st.booleans(), "relu": st.booleans()})
transition_layers = st.fixed_dictionaries({"transition": st.integers(1, 32)},
                                          optional={"relu": st.booleans()})
maxpool_layers = st.builds(lambda k: {"maxpool": k}, st.integers(2, 4))
dropout_layers = st.builds(lambda kind, p: {kind: p}, st.sampled_from(["dropout", "dropout2d"]),
                           st.floats(0.0, 0.9, allow_nan=False, allow_infinity=False))

model_sections = st.fixed_dictionaries(
    {"layers": st.lists(st.one_of(conv_layers, transition_layers, maxpool_layers,
                                  dropout_layers), min_size=1, max_size=8),
     "head": st.sampled_from(["fc", "gap"]),
     "padding": st.sampled_from(["same", "valid"])},
    optional={"bias": st.booleans(), "batchnorm": st.booleans(),
              "order": st.sampled_from(["bn_relu", "relu_bn"])})


# --- an independent oracle: does torch itself run these layers? ----------------------------


def torch_runs(model: dict) -> bool:
    """Push a 28x28 zero image through torch's own conv and pool ops for these layers;
    False when torch refuses a shape. Uses none of the pipeline's size arithmetic."""
    x, channels = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE), 1
    same = model.get("padding", "same") == "same"
    try:
        for layer in model["layers"]:
            if "conv" in layer:
                kernel = layer.get("kernel", 3)
                padding = layer.get("padding")
                if padding is None:
                    padding = kernel // 2 if same else 0
                x = F.conv2d(x, torch.zeros(layer["conv"], channels, kernel, kernel),
                             padding=padding)
                channels = layer["conv"]
            elif "transition" in layer:
                x = F.max_pool2d(x, 2)
                x = F.conv2d(x, torch.zeros(layer["transition"], channels, 1, 1))
                channels = layer["transition"]
            elif "maxpool" in layer:
                x = F.max_pool2d(x, layer["maxpool"])
    except RuntimeError:
        return False
    return x.shape[-1] >= 1 and x.shape[-2] >= 1


def has_convolution(model: dict) -> bool:
    return any("conv" in layer or "transition" in layer for layer in model["layers"])


def last_feature_map(model: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """The backbone's output: what enters the head (`flatten` of fc, `gap` of gap)."""
    x = images
    for name, module in model.named_children():
        if name in ("flatten", "gap"):
            return x
        x = module(x)
    raise AssertionError("model has no head")


def full_params(model: dict) -> dict:
    """params.yaml with the generated keys of the model section in place of its own (the keys
    not generated keep params.yaml's values: the schema has no defaults of its own)."""
    params = copy.deepcopy(DEFAULT_PARAMS)
    params["model"] = {**params["model"], **model}
    return params


# --- properties ----------------------------------------------------------------------------


@SETTINGS
@given(model_sections)
def test_random_architecture_is_refused_clearly_or_builds_right(model_section):
    raw = full_params(model_section)
    runnable = torch_runs(model_section) and has_convolution(model_section)
    try:
        params = parse_params(raw)
    except ParamsError as err:
        message = str(err)
        event("refused")
        assert not runnable, f"refused an architecture torch runs: {message}"
        for line in message.splitlines():
            assert line.startswith("model.layers"), message
            assert "Value error" not in line and "{'head'" not in line, message
        assert any(reason in message for reason in
                   ("does not fit", "below 1x1", "at least one conv")), message
        return
    event(f"accepted, {params.model.head} head")
    assert runnable, f"accepted an architecture torch cannot run: {model_section}"

    model = build_model(params.model).eval()
    images = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert model(images).shape == (3, NUM_CLASSES)
        features = last_feature_map(model, images)
    side = feature_map_size(params.model)
    assert features.shape[-2:] == (side, side)

    report = parameter_report(model, params)
    total = count_parameters(model)
    assert report["total_params"] == total
    assert geometry.parameter_count(params.model) == total  # the shape walk counts what torch builds
    assert sum(row["params"] for row in report["layers"]) == total
    assert report["trainable_params"] == total
    assert [row["name"] for row in report["layers"]] == [name for name, _ in model.named_children()]


@SETTINGS
@given(model_sections)
def test_validation_is_deterministic_and_frozen(model_section):
    """Parsing twice gives equal, frozen objects; the raw dict is not modified."""
    raw = full_params(model_section)
    before = copy.deepcopy(raw)
    try:
        first, second = parse_params(raw), parse_params(raw)
    except ParamsError:
        assert raw == before
        return
    assert raw == before
    assert first == second
    with pytest.raises(ValidationError, match="frozen"):
        first.model.head = "gap"  # type: ignore[misc]


# --- junk anywhere in params.yaml ----------------------------------------------------------


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of params.yaml, sections and layers included."""
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            paths += key_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths += key_paths(value, prefix + (index,))
    return paths


PATHS = key_paths(DEFAULT_PARAMS)

# Numbers stay within +-100: a valid but huge count (conv: 17047929) is accepted by the schema
# and then allocates gigabytes in torch, which is a resource limit, not a formatting bug.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 100), st.floats(-100, 100),
    st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=6),
    st.lists(st.integers(-2, 30), max_size=3),
    st.dictionaries(st.sampled_from(["conv", "kernel", "maxpool", "dropout", "x"]),
                    st.integers(-2, 30), max_size=3))


@SETTINGS
@given(path=st.sampled_from(PATHS), value=junk, extra_key=st.booleans())
def test_junk_anywhere_gives_params_or_params_error(path, value, extra_key):
    """Set one key (or add an unknown key beside it) to junk: the result is a Params or a
    ParamsError whose every line leads with a dotted key in the section that changed."""
    raw = copy.deepcopy(DEFAULT_PARAMS)
    node = raw
    for part in path[:-1]:
        node = node[part]
    if extra_key and isinstance(node, dict):
        node[f"{path[-1]}_typo"] = value
    else:
        node[path[-1]] = value
    changed_section = f"{path[0]}_typo" if extra_key and len(path) == 1 else path[0]
    try:
        result = parse_params(raw)
    except ParamsError as err:
        for line in str(err).splitlines():
            key = line.split(" ", 1)[0].rstrip(":")
            assert key.split(".")[0] == changed_section, line
        return
    assert isinstance(result, Params)
    # What got through is still a model the builder can make (when the architecture changed).
    if path[0] == "model":
        model = build_model(result.model).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)).shape == (2, NUM_CLASSES)


def test_oracle_agrees_on_known_cases():
    """The oracle itself: one conv runs; a 5x5 kernel without padding on a 1x1 map and
    pooling a 1x1 map do not."""
    assert torch_runs({"layers": [{"conv": 4}]})
    assert not torch_runs({"layers": [{"conv": 4}, {"maxpool": 4}, {"maxpool": 7},
                                      {"conv": 4, "kernel": 5, "padding": 0}]})
    assert not torch_runs({"layers": [{"conv": 4}, {"maxpool": 4}, {"maxpool": 4},
                                      {"maxpool": 4}]})
