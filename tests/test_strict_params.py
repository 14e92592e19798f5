"""Strict parsing of params.yaml: a value keeps the type YAML gave it. A quoted "false" is a
string, not a boolean; `true` is not a number of seconds; `1` is not a boolean; a quoted
"0.1" is not a learning rate. Each is refused in one line that names the key, the value and
what is allowed, and says how to write what was likely meant.

What YAML itself writes still parses as before: a whole number where a float is wanted
(`timeout_s: 30`), lists where the params keep tuples (mirrors, layers, betas, scale), and
the names of the choice fields (`head: fc`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mnistlab.config import ParamsError, compose, load_params, parse_params, preset_names

REPO = Path(__file__).resolve().parents[1]


def changed(params: dict, dotted: str, value: Any) -> dict:
    """A deep copy of `params` with `dotted` (integer parts index lists) set to `value`."""
    params = copy.deepcopy(params)
    *parents, last = [int(part) if part.isdigit() else part for part in dotted.split(".")]
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    return params


NUMBER, WHOLE, BOOLEAN = "should be a number", "should be a whole number", "should be a boolean (true or false)"

WRONG_TYPES = [
    # (key, value, the whole message after `key = value: `)
    ("model.batchnorm", "false", f"{BOOLEAN}, not a string; write false without quotes"),
    ("data.timeout_s", True, f"{NUMBER}, not true/false"),
    ("train.lr", "0.1", f"{NUMBER}, not a string; write 0.1 without quotes"),
    ("data.verify_md5", 1, f"{BOOLEAN}, not a number"),
    ("data.pypi_fallback", "yes", f"{BOOLEAN}, not a string"),
    # a string for a whole number, for a number in a list, for a layer's option
    ("train.epochs", "10", f"{WHOLE}, not a string; write 10 without quotes"),
    ("model.layers.0.conv", "16", f"{WHOLE}, not a string; write 16 without quotes"),
    ("train.betas.1", "0.999", f"{NUMBER}, not a string; write 0.999 without quotes"),
    ("model.layers.1.bn", "true", f"{BOOLEAN}, not a string; write true without quotes"),
    # YAML 1.1 (PyYAML) reads an exponent without a '.' as a string
    ("train.eps", "1e-8", f"{NUMBER}, not a string; write 1.0e-08 without quotes"),
    ("train.lr", "nan", f"{NUMBER}, not a string"),
    # a number for a boolean
    ("train.nesterov", 1.0, f"{BOOLEAN}, not a number"),
    ("train.resume", 0, f"{BOOLEAN}, not a number"),
    ("model.layers.0.relu", 0, f"{BOOLEAN}, not a number"),
    # a boolean for a number
    ("model.layers.3.dropout", True, f"{NUMBER}, not true/false"),
    ("train.augment.scale.0", False, f"{NUMBER}, not true/false"),
    ("train.batch_size", True, f"{WHOLE}, not true/false"),
    ("base.seed", False, f"{WHOLE}, not true/false"),
    # a number for a string
    ("data.mirrors.0", 7, "should be a string"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("key", "value", "allowed"), WRONG_TYPES,
                         ids=[f"{key}={value!r}" for key, value, _ in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_refused(default_params, key, value, allowed):
    with pytest.raises(ParamsError) as caught:
        parse_params(changed(default_params, key, value))
    assert str(caught.value) == f"{key} = {value!r}: {allowed}"


@pytest.mark.bad_input
def test_a_quoted_value_in_params_yaml_is_refused(tmp_path):
    """The same from the file, as a user edits it."""
    text = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  batchnorm: true\n", "  batchnorm: 'false'\n")
                    .replace("  timeout_s: 30\n", "  timeout_s: true\n"))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value).splitlines() == [
        "data.timeout_s = True: should be a number, not true/false",
        "model.batchnorm = 'false': should be a boolean (true or false), not a string; "
        "write false without quotes"]


@pytest.mark.bad_input
@pytest.mark.parametrize(("key", "value"), [
    ("train.augment.scale", {0.9, 1.1}),        # a YAML !!set: no order, so not a [low, high]
    ("data.mirrors", "https://example.com/"),   # one string, not a list of them
])
def test_only_a_list_is_taken_for_a_list(default_params, key, value):
    with pytest.raises(ParamsError) as caught:
        parse_params(changed(default_params, key, value))
    assert str(caught.value) == f"{key} = {value!r}: should be a list"


# --- what YAML writes still parses ------------------------------------------------------------


def test_whole_numbers_are_numbers(default_params):
    params = parse_params(changed(changed(default_params, "train.lr", 1), "data.timeout_s", 30))
    assert (params.train.lr, params.data.timeout_s) == (1.0, 30.0)
    assert isinstance(params.train.lr, float) and isinstance(params.data.timeout_s, float)


def test_yaml_lists_become_tuples_and_choices_stay_names():
    params = load_params(REPO / "params.yaml")
    assert params.data.mirrors == ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                                   "http://yann.lecun.com/exdb/mnist/")
    assert params.train.betas == (0.9, 0.999) and params.train.augment.scale == (0.98, 1.02)
    assert len(params.model.layers) == 8 and params.model.layers[0].conv == 16
    assert (params.model.head, params.model.padding, params.train.scheduler) == ("fc", "same", "onecycle")
    assert params.data.timeout_s == 30.0 and params.data.verify_md5 is True


PRESETS = ["default", *preset_names(REPO / "conf/preset")]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_round_trips(preset):
    """Every preset of conf/ parses, and so do the params a checkpoint stores (JSON: lists)
    and those a search rebuilds from a dump (Python: tuples): the same params each time."""
    params = parse_params(compose(preset, conf=REPO / "conf"))
    assert params.base.preset == ("I1" if preset == "default" else preset)  # conf/config.yaml's
    assert parse_params(params.model_dump(mode="json")) == params
    assert parse_params(params.model_dump()) == params
    assert parse_params(yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json")))) == params
