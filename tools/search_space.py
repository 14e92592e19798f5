"""The search space of `make search`: what a trial may vary (conf/search/<space>.yaml), and
how a drawn layout becomes a model within the parameter budget.

A space file gives every dimension as a range, a list of choices or one fixed value. A
layout (blocks of 3x3 convs, each ended by a transition and a dropout, then optionally a
few more 3x3 convs, then the head) has no width of its own: `fit` gives it the widest
channels within the budget, or exactly the budget, so a trial never trains a model the
budget does not allow. No torch here: counting is the shape walk of mnistlab.config.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnistlab import geometry
from mnistlab.config import ConvLayer, Model, TransitionLayer, echo

SPACES_DIR = Path("conf/search")
# The narrowest a layout is tried at (channels of its first conv): a layout over the budget
# even at this width is counted and refused without training.
MIN_WIDTH = 2
# With --exact, channels move by at most this much (one or two layers) to hit the budget.
EXACT_REACH = 8


class SearchError(ValueError):
    """A bad option, space file, budget or storage: one line, before any trial starts."""


# --- the search space ---------------------------------------------------------------------

# Every dimension a space file gives, and the type of its values.
DIMENSIONS: dict[str, type] = {
    "blocks": int, "convs_per_block": int, "growth": float, "squeeze": float, "head": str,
    "dropout": float, "lr": float, "batch_size": int, "degrees": float, "translate": float,
}
# The layout's dimensions: a space with `layout: fixed` gives none of them, and every trial
# trains the model of the params it starts from (a preset: `--set preset=I3`).
LAYOUT_DIMENSIONS = ("blocks", "convs_per_block", "growth", "squeeze", "head", "dropout")
# Layout dimensions a space may add. Left out, a trial keeps the params' padding and ends
# with its last transition, as before they existed. `padding: valid` (unpadded convs, each
# shrinking its map by 2) and `tail_convs` (3x3 convs after the last transition) reach the
# shape of README 001's model and of the ERA-style nets: a few convs on a 12x12 map, then GAP.
OPTIONAL_LAYOUT_DIMENSIONS: dict[str, type] = {"padding": str, "tail_convs": int}
PADDINGS = ("same", "valid")
# Settings a space may leave out: a trial then trains with the params' own value.
OPTIONAL_DIMENSIONS: dict[str, type] = {
    **OPTIONAL_LAYOUT_DIMENSIONS,
    "momentum": float, "nesterov": bool, "weight_decay": float,
    "pct_start": float, "div_factor": float, "final_div_factor": float,  # OneCycle's shape
}
LAYOUTS = ("searched", "fixed")


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False


Spec = Any  # a Range, a list of choices, or one fixed value


def load_space(name: str, spaces_dir: Path = SPACES_DIR) -> dict[str, Spec]:
    """conf/search/<name>.yaml as {dimension: Range | list | value}, every entry checked, and
    `layout` ("searched" or "fixed"). A dimension absent from the result is not drawn."""
    path = spaces_dir / f"{name}.yaml"
    known = sorted(p.stem for p in spaces_dir.glob("*.yaml"))
    if not path.is_file():
        raise SearchError(f"SPACE={echo(name)}: no such search space; use one of "
                          f"{', '.join(known)} ({spaces_dir}/)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SearchError(f"{path}: should be a mapping of dimensions")
    layout = raw.pop("layout", "searched")
    if layout not in LAYOUTS:
        raise SearchError(f"{path}: layout = {echo(layout)}: should be one of {', '.join(LAYOUTS)}")
    required = [key for key in DIMENSIONS if layout == "searched" or key not in LAYOUT_DIMENSIONS]
    unknown = sorted(set(raw) - set(DIMENSIONS) - set(OPTIONAL_DIMENSIONS))
    missing = [key for key in required if key not in raw]
    layout_keys = (*LAYOUT_DIMENSIONS, *OPTIONAL_LAYOUT_DIMENSIONS)
    given = [key for key in layout_keys if key in raw] if layout == "fixed" else []
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise SearchError(f"{path}: {what}; a space gives each of {', '.join(required)}, and "
                          f"may give {', '.join(OPTIONAL_DIMENSIONS)}")
    if given:
        raise SearchError(f"{path}: {given[0]!r} is a layout dimension, and layout = fixed "
                          f"trains the model of the params the study starts from; leave out "
                          f"{', '.join(layout_keys)}")
    kinds = {**DIMENSIONS, **OPTIONAL_DIMENSIONS}
    space = {key: _spec(path, key, value, kinds[key]) for key, value in raw.items()}
    if "padding" in space and not set(choices(space["padding"])) <= set(PADDINGS):
        raise SearchError(f"{path}: padding = {echo(raw['padding'])}: should be one or more "
                          f"of {', '.join(PADDINGS)}")
    if "tail_convs" in space and min(choices(space["tail_convs"])) < 0:
        raise SearchError(f"{path}: tail_convs = {echo(raw['tail_convs'])}: should be 0 or more")
    return {"layout": layout, **space}


def _spec(path: Path, key: str, value: Any, kind: type) -> Spec:
    where = f"{path}: {key} = {echo(value)}"

    def typed(item: Any) -> Any:
        if kind is bool:
            ok = isinstance(item, bool)
        elif kind is float:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
        else:
            ok = isinstance(item, kind) and not isinstance(item, bool)
        if not ok:
            names = {float: "numbers", bool: "true or false"}
            raise SearchError(f"{where}: values should be {names.get(kind, kind.__name__ + 's')}")
        return kind(item)

    if isinstance(value, dict):
        if kind in (str, bool) or set(value) - {"low", "high", "log"} or not {"low", "high"} <= set(value):
            raise SearchError(f"{where}: a range is {{low: a, high: b}} with an optional "
                              f"log: true{'; this dimension takes a list of choices' if kind is str else ''}")
        low, high, log = typed(value["low"]), typed(value["high"]), value.get("log", False)
        if low > high or (log and low <= 0):
            raise SearchError(f"{where}: needs low <= high{' and low > 0 on a log scale' if log else ''}")
        return Range(low, high, bool(log))
    if isinstance(value, list):
        if not value:
            raise SearchError(f"{where}: a list of choices needs at least one")
        return [typed(item) for item in value]
    return typed(value)


def choices(spec: Spec) -> list:
    """The values a structural dimension can take (a range: its low end, the cheapest)."""
    return spec if isinstance(spec, list) else [spec.low if isinstance(spec, Range) else spec]


def suggest(trial, name: str, spec: Spec) -> Any:
    """The trial's value for one dimension; a fixed value is not a trial parameter. Floats
    keep three significant digits, so that a preset reads `lr: 0.0522`, and the trial
    trains exactly what its preset will say."""
    if isinstance(spec, Range):
        if isinstance(spec.low, int) and isinstance(spec.high, int):
            return trial.suggest_int(name, spec.low, spec.high, log=spec.log)
        return float(f"{trial.suggest_float(name, spec.low, spec.high, log=spec.log):.3g}")
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    return spec


# --- from a layout to a model within the budget --------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A model's shape without its width: `convs[b]` 3x3 convs in block b, each block ended
    by a transition (MaxPool2d(2), 1x1 conv) and a dropout, then `tail` 3x3 convs, then the
    head. The tail's channels grow once more, as if it began another block."""

    convs: tuple[int, ...]
    growth: float
    squeeze: float
    head: str
    dropout: float
    tail: int = 0
    padding: str | None = None  # "same" or "valid"; None keeps the params' own

    def layers(self, width: float) -> list[dict]:
        layers: list[dict] = []
        for block, convs in enumerate(self.convs):
            channels = max(1, round(width * self.growth ** block))
            layers += [{"conv": channels} for _ in range(convs)]
            layers.append({"transition": max(1, round(self.squeeze * channels))})
            if self.dropout > 0:
                layers.append({"dropout": self.dropout})
        channels = max(1, round(width * self.growth ** len(self.convs)))
        return layers + [{"conv": channels} for _ in range(self.tail)]


def build_section(layout: Layout, width: float, model_base: dict) -> Model:
    """The model section of `layout` at `width`; a ValueError (pydantic's ValidationError is
    one) names the layer when unpadded convs shrink a map below their kernel."""
    padding = {"padding": layout.padding} if layout.padding else {}
    return Model.model_validate({**model_base, **padding, "head": layout.head,
                                 "layers": layout.layers(width)})


def unbuildable(layout: Layout, model_base: dict) -> str | None:
    """Why `layout` cannot be built at any width (its shapes do not depend on the width), in
    one line, or None when it can."""
    try:
        build_section(layout, MIN_WIDTH, model_base)
    except ValueError as err:
        return error_line(err)
    return None


def error_line(err: ValueError) -> str:
    """The message of a ValueError or of pydantic's first validation error, on one line."""
    errors = getattr(err, "errors", None)
    message = errors()[0]["msg"] if callable(errors) else str(err)
    return message.removeprefix("Value error, ")


def widest(layout: Layout, budget: int, model_base: dict) -> float | None:
    """The widest `layout` with at most `budget` parameters, as a width, or None when even the
    narrowest is over. Every layer's channels are the width times its block's growth,
    rounded, so the count never falls as the width grows, and a bisection over a fractional
    width finds the widest fit layer by layer: a budget of 3,000 is not cut to the 2,300 a
    whole-number width would stop at."""
    def fits(width: float) -> bool:
        try:
            return geometry.parameter_count(build_section(layout, width, model_base)) <= budget
        except ValueError:  # channels past what a layer may have (1,024): too wide anyway
            return False

    if not fits(MIN_WIDTH):
        return None
    low = float(MIN_WIDTH)  # invariant: low fits, high does not
    high = next(2.0 ** k * MIN_WIDTH for k in range(1, 20) if not fits(2.0 ** k * MIN_WIDTH))
    while high - low > 0.01:
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fit(layout: Layout, budget: int, model_base: dict, exact: bool) -> Model | None:
    """The model a trial of `layout` trains: the widest within the budget or, with `exact`,
    the widest (or a little narrower) whose count a small move makes exactly `budget`. A
    layout that cannot be built at all (see `unbuildable`) is the caller's to rule out."""
    width = widest(layout, budget, model_base)
    if width is None:
        return None
    if not exact:
        return build_section(layout, width, model_base)
    for narrower in range(12):  # some counts are out of one or two moves' reach
        moved = fill_exactly(build_section(layout, width * 0.97 ** narrower, model_base), budget)
        if moved is not None:
            return moved
    return None


def fill_exactly(model: Model, budget: int) -> Model | None:
    """`model` with one or two layers' channels moved by the least amount (at most
    EXACT_REACH each) that makes its count exactly `budget`; None when no such move exists."""
    sized = [i for i, layer in enumerate(model.layers) if isinstance(layer, (ConvLayer, TransitionLayer))]
    steps = range(-EXACT_REACH, EXACT_REACH + 1)
    moves = [((i, d),) for i in sized for d in steps] + [
        ((i, di), (j, dj)) for i, j in itertools.combinations(sized, 2) for di in steps for dj in steps]
    for move in sorted(moves, key=lambda m: sum(abs(d) for _, d in m)):
        layers = list(model.layers)
        for index, delta in move:
            key = "conv" if isinstance(layers[index], ConvLayer) else "transition"
            channels = getattr(layers[index], key) + delta
            if channels < 1:
                break
            layers[index] = layers[index].model_copy(update={key: channels})
        else:
            moved = model.model_copy(update={"layers": tuple(layers)})
            if geometry.parameter_count(moved) == budget:
                return Model.model_validate(moved.model_dump())
    return None


def smallest_model(space: dict[str, Spec], model_base: dict) -> tuple[int, Layout | None]:
    """The fewest parameters any trial of `space` can have, and its layout (None where the
    layout is fixed: every trial trains `model_base`)."""
    if space["layout"] == "fixed":
        return geometry.parameter_count(Model.model_validate(model_base)), None
    tail = min(choices(space["tail_convs"])) if "tail_convs" in space else 0
    paddings = choices(space["padding"]) if "padding" in space else [None]
    layouts = [Layout((min(choices(space["convs_per_block"])),) * blocks,
                      min(choices(space["growth"])), min(choices(space["squeeze"])), head, 0.0,
                      tail, padding)
               for blocks in choices(space["blocks"]) for head in choices(space["head"])
               for padding in paddings]
    # Unpadded convs can shrink some layouts' maps below a kernel; such layouts are pruned
    # when drawn, and a space is refused only when none of its smallest layouts builds.
    why = {layout: unbuildable(layout, model_base) for layout in layouts}
    counted = [(geometry.parameter_count(build_section(layout, MIN_WIDTH, model_base)), layout)
               for layout in layouts if why[layout] is None]
    if not counted:
        raise SearchError(f"the space's layout {layouts[0]} cannot be built: {why[layouts[0]]}")
    return min(counted, key=lambda pair: pair[0])
