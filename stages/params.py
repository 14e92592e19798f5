"""The pipeline's parameters: params.yaml loaded into typed, frozen, validated objects.

Every stage calls `load_params()` before it does any work. An unknown key, a value of the
wrong type or range, or an architecture whose layers do not fit a 28x28 image stops the
stage with one message that names the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

PARAMS_FILE = Path("params.yaml")
IMAGE_SIZE = 28  # MNIST: 1 x 28 x 28 in, 10 classes out
IN_CHANNELS = 1
NUM_CLASSES = 10
# IDX file magic numbers (unsigned bytes, 3 or 1 dimensions): written by the download
# stage, checked by the reader.
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


class ParamsError(ValueError):
    """A parameter is missing, unknown or out of range. The message says which and why."""


class Section(BaseModel):
    # Frozen: a stage cannot change its own settings halfway. Forbid: a typo is an error.
    # No inf/nan learning rates; ints must be ints (YAML `true` or `16.5` is not a channel count).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


PositiveInt = Annotated[int, Field(gt=0, strict=True)]
Channels = Annotated[int, Field(gt=0, le=1024, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class Base(Section):
    seed: NonNegativeInt = 42
    preset: str = "default"


class Data(Section):
    mirrors: tuple[str, ...] = ()
    pypi_fallback: bool = True
    timeout_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("mirrors")
    @classmethod
    def _urls(cls, mirrors: tuple[str, ...]) -> tuple[str, ...]:
        for url in mirrors:
            if not url.startswith(("http://", "https://", "file://")):
                raise ValueError(f"{url!r} is not an http(s):// or file:// URL")
        return mirrors


# --- the architecture: a list of layers, each a one-key mapping with options -------------


class ConvLayer(Section):
    """`{conv: C}`: a KxK convolution to C channels, then BatchNorm and ReLU."""

    conv: Channels
    kernel: Annotated[int, Field(gt=0, le=IMAGE_SIZE, strict=True)] = 3
    padding: Annotated[int, Field(ge=0, le=IMAGE_SIZE, strict=True)] | None = None  # None: model.padding
    bn: bool | None = None  # None: model.batchnorm
    relu: bool = True


class TransitionLayer(Section):
    """`{transition: C}`: MaxPool2d(2), then a 1x1 convolution to C channels (no BatchNorm)."""

    transition: Channels
    relu: bool = False


class MaxPoolLayer(Section):
    """`{maxpool: K}`: MaxPool2d(K)."""

    maxpool: Annotated[int, Field(ge=2, le=IMAGE_SIZE, strict=True)]


class DropoutLayer(Section):
    """`{dropout: p}`: Dropout with probability p."""

    dropout: Probability


LAYER_KINDS = ("conv", "transition", "maxpool", "dropout")


def _layer_kind(layer: Any) -> str | None:
    if isinstance(layer, dict):
        kinds = [kind for kind in LAYER_KINDS if kind in layer]
        return kinds[0] if len(kinds) == 1 else None
    return next((kind for kind in LAYER_KINDS if hasattr(layer, kind)), None)


Layer = Annotated[
    Union[
        Annotated[ConvLayer, Tag("conv")],
        Annotated[TransitionLayer, Tag("transition")],
        Annotated[MaxPoolLayer, Tag("maxpool")],
        Annotated[DropoutLayer, Tag("dropout")],
    ],
    Discriminator(
        _layer_kind,
        custom_error_type="layer_kind",
        custom_error_message="a layer is exactly one of {conv: C}, {transition: C}, "
        "{maxpool: K} or {dropout: p}",
    ),
]


class Model(Section):
    head: Literal["fc", "gap"] = "fc"
    batchnorm: bool = True
    bias: bool = True
    padding: Literal["same", "valid"] = "same"
    layers: Annotated[tuple[Layer, ...], Field(min_length=1)]

    def conv_padding(self, layer: ConvLayer) -> int:
        if layer.padding is not None:
            return layer.padding
        return layer.kernel // 2 if self.padding == "same" else 0

    @model_validator(mode="after")
    def _fits_the_image(self) -> Model:
        """Walk the layers over a 28x28 input, so a bad shape fails here and not in torch."""
        size, has_conv = IMAGE_SIZE, False
        for index, layer in enumerate(self.layers):
            where = f"layers.{index} ({_describe(layer)}) on a {size}x{size} feature map"
            if isinstance(layer, ConvLayer):
                has_conv = True
                padding = self.conv_padding(layer)
                if layer.kernel > size + 2 * padding:
                    raise ValueError(
                        f"{where}: kernel {layer.kernel} with padding {padding} does not fit; "
                        f"use a kernel of at most {size + 2 * padding}"
                    )
                size = size + 2 * padding - layer.kernel + 1
            elif isinstance(layer, (TransitionLayer, MaxPoolLayer)):
                has_conv |= isinstance(layer, TransitionLayer)
                pool = 2 if isinstance(layer, TransitionLayer) else layer.maxpool
                if size // pool < 1:
                    raise ValueError(f"{where}: pooling by {pool} shrinks it below 1x1")
                size //= pool
        if not has_conv:
            raise ValueError("layers: at least one conv or transition layer is needed")
        return self


def _describe(layer: BaseModel) -> str:
    return ", ".join(f"{key}: {value}" for key, value in layer.model_dump(exclude_defaults=True).items())


# --- training ----------------------------------------------------------------------------


class OneCycle(Section):
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3
    div_factor: Annotated[float, Field(gt=0)] = 25.0
    final_div_factor: Annotated[float, Field(gt=0)] = 1e4


class Step(Section):
    step_size: PositiveInt = 1
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1


class Plateau(Section):
    factor: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: NonNegativeInt = 2


class Augment(Section):
    degrees: Annotated[float, Field(ge=0, le=180)] = 0.0
    translate: Annotated[float, Field(ge=0, le=1)] = 0.0
    scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1.0, 1.0)
    shear: Annotated[float, Field(ge=0, lt=90)] = 0.0
    interpolation: Literal["bilinear", "nearest"] = "bilinear"

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"scale {list(scale)} must be [low, high] with low <= high")
        return scale


class Normalize(Section):
    mean: float = 0.1307
    std: Annotated[float, Field(gt=0)] = 0.3081


class Train(Section):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 256
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    scheduler: Literal["onecycle", "step", "plateau", "none"] = "none"
    onecycle: OneCycle = OneCycle()
    step: Step = Step()
    plateau: Plateau = Plateau()
    augment: Augment = Augment()
    normalize: Normalize = Normalize()
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    cuda_graphs: bool = True
    cudnn_benchmark: bool = False
    limit_train: NonNegativeInt = 0
    limit_test: NonNegativeInt = 0
    resume: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> Train:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0")
        return self


class Evaluate(Section):
    batch_size: PositiveInt = 1024


class Params(Section):
    base: Base = Base()
    data: Data = Data()
    model: Model
    train: Train = Train()
    evaluate: Evaluate = Evaluate()


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; raise ParamsError listing every problem found."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError("\n".join(_explain(e) for e in err.errors())) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        with path.open() as file:  # an open file lets YAML errors name it
            raw = yaml.safe_load(file)
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    return parse_params(raw)


# Pydantic's wording where it reads like Python rather than like a config file.
_WORDING = {
    "too_short": "needs at least {min_length} item(s), got {actual_length}",
    "too_long": "takes at most {max_length} item(s), got {actual_length}",
    "tuple_type": "should be a list",
    "model_type": "should be a mapping of keys",
    "literal_error": "should be one of {expected}",
    "int_type": "should be a whole number",
    "finite_number": "should be a finite number",
}


def _explain(error: dict) -> str:
    """One line per problem: `key = value: what is allowed`."""
    key = ".".join(str(part) for part in _file_location(error["loc"])) or "params"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (allowed: {', '.join(_allowed_keys(error['loc'][:-1]))})"
    if error["type"] == "missing":
        loc = _file_location(error["loc"])
        if loc and isinstance(loc[-1], int):  # a too-short list, e.g. scale: [1.0]
            return f"{'.'.join(map(str, loc[:-1]))}: item {loc[-1]} is missing"
        return f"{key}: required key is missing"
    template = _WORDING.get(error["type"])
    message = (template.format(**(error.get("ctx") or {})) if template
               else error["msg"].removeprefix("Value error, "))
    if error["type"] == "value_error" and isinstance(error["input"], dict) and error["loc"]:
        return f"{key}.{message}"  # a whole-section check names its own key: model.layers.3 ...
    return f"{key} = {error['input']!r}: {message}"


def _file_location(loc: tuple) -> list:
    """Pydantic puts the union tag into a layer's location (layers.0.conv.kernel); the file
    has no such level (layers.0.kernel)."""
    parts = list(loc)
    for i in range(len(parts) - 2):
        if isinstance(parts[i], int) and parts[i + 1] in LAYER_KINDS:
            del parts[i + 1]
            break
    return parts


_LAYER_CLASSES = {"conv": ConvLayer, "transition": TransitionLayer, "maxpool": MaxPoolLayer,
                  "dropout": DropoutLayer}


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys a section accepts, found by walking the schema along an error's location."""
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):
            continue
        if part in _LAYER_CLASSES and part not in model.model_fields:
            model = _LAYER_CLASSES[part]
            continue
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return sorted(model.model_fields)
