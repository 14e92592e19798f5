"""Tests for mnistlab/config.py: every bad value is refused with a message that names the key,
the value and what is allowed; every shipped preset parses and has its documented size.

The bad-value table starts from the repo's own params.yaml (fixture `default_params`) and
changes one thing per row. Each row says which dotted key the message must lead with and
which words (allowed names, bounds) it must contain, so a message that loses its key path,
its value or its allowed values fails here, not in front of a user.

Presets are composed from conf/ exactly as `dvc exp run -S preset=NAME` does (DVC's Hydra
composition), so these tests also pin that conf/ and params.yaml agree.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dvc.utils.hydra import compose_and_dump
from hydra.errors import HydraException

from mnistlab import geometry
from mnistlab.runtime import resolve_device
from mnistlab.model import build_model, count_parameters
from mnistlab.config import ParamsError, load_params, parse_params

from helpers import CONF, PRESETS, REPO, compose


DELETE = object()  # a table value that removes the key instead of setting it


# --- helpers -------------------------------------------------------------------------------


def with_change(params: dict, dotted: str, value: Any) -> dict:
    """A deep copy of `params` with `dotted` (e.g. `model.layers.3.kernel`) set to `value`
    (or removed, for DELETE). Integer parts index lists."""
    changed = copy.deepcopy(params)
    *parents, last = [int(part) if part.isdigit() else part for part in dotted.split(".")]
    node = changed
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return changed


def error_message(params: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(params)
    return str(caught.value)


# --- the table of bad values ---------------------------------------------------------------
#
# Three kinds of row, one helper each:
#   bad(path, value, *allowed):        message starts `path = repr(value)` and names `allowed`
#   unknown(path, value, *allowed):    message starts `path: unknown key` and lists `allowed`
#   broken(path, value, key, *words):  a whole-architecture (or cross-field) check; the
#                                      message starts with `key` and contains `words`


def bad(path: str, value: Any, *allowed: str, id: str):
    return pytest.param(path, value, f"{path} = {value!r}", allowed, id=id)


def unknown(path: str, value: Any, *allowed: str, id: str, key: str | None = None):
    return pytest.param(path, value, f"{key or path}: unknown key (allowed: ", allowed, id=id)


def broken(path: str, value: Any, key: str, *words: str, id: str):
    return pytest.param(path, value, key, words, id=id)


LAYER_KINDS = ("{conv: C}", "{transition: C}", "{maxpool: K}", "{dropout: p}")

BAD_VALUES = [
    # unknown keys, at every level
    unknown("hyperparams", {"lr": 0.1}, "base, data, evaluate, model, train",
            id="top-level unknown section"),
    unknown("base.sead", 1, "preset, seed", id="base: typo seed"),
    unknown("data.mirror", ["https://example.com/"], "mirrors", "verify_md5", id="data: typo mirrors"),
    unknown("model.heads", "gap", "batchnorm, bias, head, layers, order, padding",
            id="model: typo head"),
    unknown("train.learning_rate", 0.1, "lr", "epochs", "optimizer", id="train: typo lr"),
    unknown("train.augment.rotate", 10, "degrees", "translate",
            id="train.augment: typo degrees"),
    unknown("evaluate.batchsize", 512, "batch_size", id="evaluate: typo batch_size"),
    unknown("model.layers.0", {"conv": 16, "kernal": 3}, "bn, conv, kernel, padding, relu",
            key="model.layers.0.kernal", id="conv layer: typo kernel"),
    unknown("model.layers.2", {"transition": 12, "kernel": 3}, "relu, transition",
            key="model.layers.2.kernel", id="transition layer: no kernel option"),
    # wrong types
    bad("train.epochs", "ten", "whole number", id="string epochs"),
    bad("train.lr", [0.1], "number", id="list lr"),
    bad("base.seed", 1.5, "whole number", id="fractional seed"),
    bad("train.nesterov", "maybe", "boolean", id="non-boolean nesterov"),
    bad("model.layers", "conv", id="layers not a list"),
    bad("model", None, id="model section null"),
    # ranges
    bad("train.lr", 0, "greater than 0", id="zero lr"),
    bad("train.lr", -0.1, "greater than 0", id="negative lr"),
    bad("model.layers.3.dropout", 1, "less than 1", id="dropout 1"),
    bad("model.layers.3.dropout", 1.5, "less than 1", id="dropout 1.5"),
    bad("model.layers", [], "at least 1", id="empty layer list"),
    bad("model.layers.0.conv", 0, "greater than 0", id="zero conv channels"),
    bad("model.layers.2.transition", -4, "greater than 0", id="negative transition channels"),
    bad("model.layers.0.kernel", 0, "greater than 0", id="zero kernel"),
    bad("model.layers.4.padding", -1, "greater than or equal to 0", id="negative conv padding"),
    broken("model.layers.2", {"maxpool": 1}, "model.layers.2.maxpool = 1",
           "greater than or equal to 2", id="maxpool by 1"),
    bad("train.epochs", 0, "greater than 0", id="zero epochs"),
    bad("train.batch_size", 0, "greater than 0", id="zero batch size"),
    bad("evaluate.batch_size", -5, "greater than 0", id="negative eval batch size"),
    bad("train.weight_decay", -1e-4, "greater than or equal to 0", id="negative weight decay"),
    bad("train.momentum", 1.0, "less than 1", id="momentum 1"),
    bad("train.betas.1", 1.0, "less than 1", id="adam beta2 of 1"),
    bad("train.eps", 0, "greater than 0", id="zero adam eps"),
    bad("train.grad_clip", -1.0, "greater than or equal to 0", id="negative grad clip"),
    bad("train.limit_train", -1, "greater than or equal to 0", id="negative limit_train"),
    bad("train.validation", -1, "greater than or equal to 0", id="negative validation"),
    bad("train.validation", 60_000, "less than 60000", id="validation of every training image"),
    bad("train.validation", 0.2, "whole number", id="validation as a fraction"),
    bad("train.onecycle.pct_start", 1.0, "less than 1", id="onecycle pct_start 1"),
    bad("train.step.gamma", 1.5, "less than or equal to 1", id="step gamma above 1"),
    bad("train.plateau.patience", -1, "greater than or equal to 0", id="negative patience"),
    bad("train.augment.degrees", 200, "less than or equal to 180", id="rotation above 180"),
    bad("train.augment.scale", [1.1, 0.9], "low <= high", id="scale [1.1, 0.9]"),
    bad("train.normalize.std", 0, "greater than 0", id="zero normalize std"),
    bad("data.timeout_s", 0, "greater than 0", id="zero download timeout"),
    bad("data.mirrors", ["ftp://example.com/mnist/"], "http(s)://", "file://",
        id="ftp mirror URL"),
    bad("base.seed", -1, "greater than or equal to 0", id="negative seed"),
    # Literal fields: the message lists every allowed name
    bad("train.optimizer", "rmsprop", "'sgd'", "'adam'", id="unknown optimizer"),
    bad("train.scheduler", "cosine", "'onecycle'", "'step'", "'plateau'", "'none'",
        id="unknown scheduler"),
    bad("model.head", "mlp", "'fc'", "'gap'", id="unknown head"),
    bad("train.device", "tpu", "'auto'", "'cpu'", "'cuda'", "'mps'", id="unknown device"),
    bad("train.precision", "fp16", "'auto'", "'fp32'", "'bf16'", id="unknown precision"),
    bad("model.padding", "full", "'same'", "'valid'", id="unknown padding"),
    bad("train.augment.interpolation", "bicubic", "'bilinear'", "'nearest'",
        id="unknown interpolation"),
    # a layer must be exactly one kind
    bad("model.layers.0", {"conv": 16, "maxpool": 2}, *LAYER_KINDS, id="layer of two kinds"),
    bad("model.layers.0", {"kernel": 3}, *LAYER_KINDS, id="layer of no kind"),
    bad("model.layers.0", 16, *LAYER_KINDS, id="layer that is a bare number"),
    # missing required keys
    broken("model.layers", DELETE, "model.layers: required key is missing", id="no layers key"),
    # whole-architecture and cross-field checks
    broken("model.layers.4", {"conv": 24, "kernel": 15, "padding": 0}, "model.layers.4",
           "kernel 15", "14x14", "at most 14", id="kernel larger than its feature map"),
    broken("model.layers", [{"conv": 8}, {"maxpool": 4}, {"maxpool": 4}, {"maxpool": 4}],
           "model.layers.3", "maxpool: 4", "1x1 feature map", "below 1x1",
           id="maxpools shrink below 1x1"),
    broken("model.layers", [{"conv": 8}, {"maxpool": 4}, {"maxpool": 7}, {"transition": 8}],
           "model.layers.3", "transition: 8", "pooling by 2", "below 1x1",
           id="transition pools below 1x1"),
    broken("model.layers", [{"dropout": 0.1}, {"maxpool": 2}], "model.layers",
           "at least one conv or transition", id="no conv layer at all"),
    broken("train.momentum", 0, "train.nesterov", "momentum > 0",
           id="nesterov with momentum 0"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("path", "value", "starts_with", "words"), BAD_VALUES)
def test_bad_value_is_explained(default_params, path, value, starts_with, words):
    message = error_message(with_change(default_params, path, value))
    assert message.startswith(starts_with), message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    # One change, one problem, one line: no dump of a whole section, no pydantic prefixes.
    assert "\n" not in message, message
    assert "Value error" not in message and "validation error" not in message, message


def test_bad_value_table_is_broad():
    """At least 30 rows, and every section of params.yaml is exercised."""
    assert len(BAD_VALUES) >= 30
    sections = {param.values[0].split(".")[0] for param in BAD_VALUES}
    assert {"base", "data", "model", "train", "evaluate"} <= sections


@pytest.mark.bad_input
def test_every_problem_is_reported_at_once(default_params):
    params = with_change(default_params, "train.lr", 0)
    params = with_change(params, "model.head", "mlp")
    params = with_change(params, "evaluate.batch_sise", 1)
    lines = error_message(params).splitlines()
    assert len(lines) == 3, lines
    assert any(line.startswith("train.lr = 0:") for line in lines)
    assert any(line.startswith("model.head = 'mlp':") for line in lines)
    assert any(line.startswith("evaluate.batch_sise: unknown key") for line in lines)


@pytest.mark.bad_input
@pytest.mark.parametrize("raw", [None, [], "model: x", 3], ids=["null", "list", "string", "int"])
def test_params_that_are_not_a_mapping(raw):
    with pytest.raises(ParamsError, match="params must be a mapping of sections, got"):
        parse_params(raw)


# --- the shipped presets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, dict]:
    """Every conf/preset/*.yaml composed with conf/config.yaml, by name."""
    out = tmp_path_factory.mktemp("presets")
    return {name: compose(out / f"{name}.yaml", [f"preset={name}"]) for name in PRESETS}


def test_presets_are_found():
    assert PRESETS == ["I0", "I1", "I2", "I3", "readme000", "readme001", "readme002", "readme003",
                       "search14500_I3_recipe", "search5000", "search5000_unpadded",
                       "search8000", "search8000_unpadded"]


def test_every_preset_has_a_result():
    """A preset earns its place in conf/preset/ by its row in the results (reports/results.json,
    the README's table); a search winner that was never tested waits in conf/candidates/."""
    results = json.loads((REPO / "reports" / "results.json").read_text())
    assert [name for name in PRESETS if name not in results] == []


def test_a_candidate_composes_once_copied_into_the_presets(tmp_path):
    """conf/candidates/ says "copy it into conf/preset/ to train it": that must still work."""
    candidates = sorted(path.stem for path in (CONF / "candidates").glob("*.yaml"))
    assert candidates == ["search14500_unpadded"]
    conf = shutil.copytree(CONF, tmp_path / "conf")
    for name in candidates:
        shutil.copy(conf / "candidates" / f"{name}.yaml", conf / "preset")
        compose_and_dump(tmp_path / f"{name}.yaml", str(conf), None, "config", str(REPO),
                         [f"preset={name}"])
        params = parse_params(yaml.safe_load((tmp_path / f"{name}.yaml").read_text()))
        assert params.base.preset == name


def test_params_yaml_parses():
    """The default params are preset I1 (conf/config.yaml's defaults list), not a copy of it."""
    params = load_params(REPO / "params.yaml")
    assert params.base.preset == "I1"
    assert params.model.head == "fc"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses(presets, name):
    params = parse_params(presets[name])
    assert params.base.preset == name


def test_params_yaml_is_conf_composed_without_overrides(tmp_path):
    """`dvc repro` reads params.yaml; `dvc exp run` regenerates it from conf/ first. They
    must agree, byte for byte, or the two commands train different models."""
    out = tmp_path / "params.yaml"
    compose(out, [])
    assert out.read_text() == (REPO / "params.yaml").read_text(), \
        "params.yaml is stale: regenerate it with `make params`"


@pytest.mark.bad_input
def test_unknown_preset_names_the_choices(tmp_path):
    with pytest.raises(HydraException) as caught:
        compose(tmp_path / "params.yaml", ["preset=nope"])
    message = str(caught.value)
    assert "preset/nope" in message
    for name in PRESETS:
        assert f"\t{name}\n" in message or message.endswith(f"\t{name}"), message
    assert not (tmp_path / "params.yaml").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["../config", "../../tests/evil", "I1/../../config"])
def test_preset_outside_conf_preset_is_refused(tmp_path, name):
    """Hydra would load any YAML file a `..` path reaches; hydra_plugins/ keeps choices in
    conf/preset/ (conf/config.yaml itself is one such file: `preset=../config`)."""
    with pytest.raises(HydraException) as caught:
        compose(tmp_path / "params.yaml", [f"preset={name}"])
    message = str(caught.value)
    assert f"Could not find 'preset/{name}'" in message, message
    for preset in PRESETS:
        assert f"\t{preset}\n" in message or message.endswith(f"\t{preset}"), message
    assert not (tmp_path / "params.yaml").exists()


# --- load_params on bad files --------------------------------------------------------------


@pytest.mark.bad_input
def test_load_params_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path} not found (run from the repository root)"


@pytest.mark.bad_input
def test_load_params_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not valid YAML:"), message
    assert "line" in message  # PyYAML's position of the problem


# A params file that cannot be read as a mapping of sections: how it is made, and the words
# that say what is wrong with it (after the path; every message then says what is expected).
BAD_FILES = {
    "not UTF-8": (lambda path: path.write_bytes(b"base:\n  preset: caf\xe9\n"),
                  "is not UTF-8 text (byte 0xe9 on line 2)"),
    "a directory": (lambda path: path.mkdir(), "is a directory"),
    "empty": (lambda path: path.write_text(""), "holds no values (it is empty, or only comments)"),
    "only comments": (lambda path: path.write_text("# base:\n#   seed: 1\n"), "holds no values"),
    "a list": (lambda path: path.write_text("- base\n- data\n"), "holds a list"),
    "a single value": (lambda path: path.write_text("train\n"), "holds the single value 'train'"),
}
EXPECTED = "a YAML mapping of the sections base, data, model, train, evaluate"


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_params_of_a_file_that_is_no_mapping(tmp_path, kind):
    make, problem = BAD_FILES[kind]
    path = tmp_path / "params.yaml"
    make(path)
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path} {problem}"), message
    assert "; expected " in message and EXPECTED in message and "\n" not in message, message


@pytest.mark.bad_input
def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n\tlr: 0.1\n")  # a tab, which YAML does not indent with
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value) == (f"{path} is not valid YAML: while scanning for the next token: "
                                 f"found character '\\t' that cannot start any token (line 2, "
                                 f"column 1)")


# Every stage reads params.yaml first; run as a command on a bad file, each ends with one line.
STAGES = ["validate", "download", pytest.param("train", marks=pytest.mark.slow),
          pytest.param("evaluate", marks=pytest.mark.slow)]


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["not UTF-8", "a directory", "empty"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_on_a_bad_params_file_ends_with_one_line(tmp_path, stage, kind):
    for folder in ("mnistlab", "stages", "conf"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    make, problem = BAD_FILES[kind]
    make(tmp_path / "params.yaml")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{stage}: error: params.yaml {problem}; expected a"), line
    assert EXPECTED in line, line
    # Nothing written: no MLflow store, no data, no reports.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["conf", "mnistlab", "params.yaml", "stages"]


# --- devices -------------------------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device_is_a_params_error(device):
    present = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    if present:
        pytest.skip(f"{device} is present on this machine")
    with pytest.raises(ParamsError) as caught:
        resolve_device(device)
    message = str(caught.value)
    assert message.startswith(f"train.device = {device!r}: not available"), message
    assert "available here: auto" in message and "cpu" in message


def test_auto_and_cpu_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}


# --- parameter counts ----------------------------------------------------------------------

PRESET_PARAMS = {
    "I0": 18_060, "I1": 20_978, "I2": 19_494, "I3": 14_500,
    "readme000": 16_034, "readme001": 7_776, "readme002": 13_034, "readme003": 15_440,
}


def n_params(raw: dict) -> int:
    return count_parameters(build_model(parse_params(raw).model))


def test_default_parameter_count(default_params):
    assert n_params(default_params) == 20_978


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_preset_parameter_count(presets, name):
    assert n_params(presets[name]) == PRESET_PARAMS[name]


def test_gap_head_parameter_count(default_params):
    """The default backbone with a GAP head, counted by hand (bias and BatchNorm on,
    `same` padding, so the maps go 28 -> 28 -> 14 -> 14 -> 7):

        conv 1->16 3x3   16*9 + 16       =   160   BatchNorm(16)  32
        conv 16->16 3x3  16*16*9 + 16    = 2,320   BatchNorm(16)  32
        transition 16->12 (1x1)  16*12 + 12 = 204
        conv 12->24 3x3  12*24*9 + 24    = 2,616   BatchNorm(24)  48
        conv 24->24 3x3  24*24*9 + 24    = 5,208   BatchNorm(24)  48
        transition 24->20 (1x1)  24*20 + 20 = 500
        backbone                         = 11,168
        fc head:  Linear(20*7*7 -> 10)   = 9,810  -> 20,978 (the default)
        gap head: Conv 1x1 20 -> 10      =   210  -> 11,378
    """
    by_hand = [16 * 9 + 16 + 32, 16 * 16 * 9 + 16 + 32, 16 * 12 + 12, 0,
               12 * 24 * 9 + 24 + 48, 24 * 24 * 9 + 24 + 48, 24 * 20 + 20, 0]
    fc, gap = parse_params(default_params).model, parse_params(
        with_change(default_params, "model.head", "gap")).model
    assert [shape.params for shape in geometry.walk(fc)] == by_hand  # the shape walk, layer by layer
    assert sum(by_hand) == 11_168
    assert (geometry.head_params(fc), geometry.head_params(gap)) == (20 * 7 * 7 * 10 + 10, 20 * 10 + 10)
    assert geometry.parameter_count(fc) == n_params(default_params) == 20_978
    assert geometry.parameter_count(gap) == n_params(with_change(default_params, "model.head", "gap")) == 11_378


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_shape_walk_counts_what_torch_builds(presets, name):
    assert geometry.parameter_count(parse_params(presets[name]).model) == PRESET_PARAMS[name]



# --- the memory estimate -------------------------------------------------------------------

GiB = 2**30


def _memory(raw: dict) -> int:
    from mnistlab.geometry import training_memory_bytes

    return training_memory_bytes(parse_params(raw))


def _changed(raw: dict, changes: dict) -> dict:
    for dotted, value in changes.items():
        raw = with_change(raw, dotted, value)
    return raw


@pytest.mark.parametrize(("changes", "batches"), [
    ({"train.batch_size": 100_000, "train.limit_train": 2_048}, {"train.batch_size": 2_048}),
    ({"train.batch_size": 100_000, "train.validation": 10_000}, {"train.batch_size": 50_000}),
    ({"evaluate.batch_size": 100_000}, {"evaluate.batch_size": 10_000}),  # the test set
    ({"evaluate.batch_size": 100_000, "train.limit_test": 512}, {"evaluate.batch_size": 512}),
    ({"evaluate.batch_size": 100_000, "train.validation": 5_000}, {"evaluate.batch_size": 5_000}),
], ids=["limit_train", "validation split", "test set", "limit_test", "scored on the split"])
def test_a_batch_holds_no_more_images_than_there_are(default_params, changes, batches):
    """A batch_size above the images there are gives one batch of all of them: the estimate is
    that of a batch_size of exactly as many."""
    raw = _changed(default_params, changes)
    assert _memory(raw) == _memory(_changed(raw, batches))


def test_a_large_batch_over_few_images_is_not_refused(default_params, monkeypatch):
    """batch_size 100,000 over 2,048 images trains in batches of 2,048: about 1.9 GiB, not the
    82 GiB of 100,000-image batches."""
    from mnistlab import plan

    monkeypatch.setattr(plan, "host_memory_bytes", lambda: 8 * GiB)
    raw = _changed(default_params, {"train.device": "cpu", "train.batch_size": 100_000,
                                    "train.limit_train": 2_048})
    _, checked = plan.check(raw)
    assert 1_500 < checked["memory_estimate_mib"] < 2_500, checked


@pytest.mark.bad_input
def test_a_batch_over_the_memory_is_still_refused(default_params, monkeypatch):
    """batch_size 100,000 over all 60,000 training images: 60,000 images of 110,152 floats,
    kept twice (output and gradient), 49.6 GiB. Beside the weights and the data (359 MiB),
    0.9 x 8 GiB holds batches of (7,730,941,132 - 376,655,648) // 881,216 = 8,345 images."""
    from mnistlab import plan

    monkeypatch.setattr(plan, "host_memory_bytes", lambda: 8 * GiB)
    raw = _changed(default_params, {"train.device": "cpu", "train.batch_size": 100_000})
    with pytest.raises(ParamsError) as caught:
        plan.check(raw)
    assert str(caught.value) == (
        "model.layers: training this model needs about 49.6 GiB (20,978 parameters, batches of "
        "60,000 images), more than the 8.0 GiB of this machine's memory; use fewer or narrower "
        "layers, less padding, or a smaller train.batch_size (batches of at most 8,345 images fit)")


@pytest.mark.bad_input
def test_a_scoring_batch_over_the_memory_names_evaluate_batch_size(default_params, monkeypatch):
    from mnistlab import plan

    monkeypatch.setattr(plan, "host_memory_bytes", lambda: 8 * GiB)
    raw = _changed(default_params, {"train.device": "cpu", "train.validation": 20_000,
                                    "evaluate.batch_size": 100_000})
    with pytest.raises(ParamsError) as caught:
        plan.check(raw)
    message = str(caught.value)
    assert "batches of 20,000 images" in message, message
    assert message.endswith("or a smaller train.batch_size or evaluate.batch_size (batches of "
                            "at most 8,345 images fit)"), message


# --- a refused `dvc repro` -----------------------------------------------------------------


def _git_project(dest: Path) -> Path:
    """The pipeline's definition, params and code in a fresh git repo (no data: the validate
    stage needs none; downloads off, should a stage after it run)."""
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    for folder in ("mnistlab", "stages", "conf"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(mirrors=[], pypi_fallback=False)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _run(project: Path, *cmd: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "DVC_")) and key != "PYTHONPATH"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", DVC_NO_ANALYTICS="1")
    return subprocess.run(list(cmd), cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("target", [["validate"], []], ids=["dvc repro validate", "dvc repro"])
def test_a_refused_repro_leaves_the_working_tree_as_it_was(tmp_path, target):
    project = _git_project(tmp_path / "project")
    _run(project, "git", "init", "-q")
    assert _run(project, "dvc", "repro", "validate").returncode == 0
    _run(project, "git", "add", "-A")
    _run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "validated")
    plan = (project / "reports/plan.json").read_bytes()
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("\n  lr: 0.2\n", "\n  lr: 0\n"))

    result = _run(project, "dvc", "repro", *target)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "validate: error: train.lr = 0: Input should be greater than 0" in \
        (result.stderr + result.stdout).splitlines(), result.stderr
    status = _run(project, "git", "status", "--porcelain").stdout.splitlines()
    assert status == [" M params.yaml"], status  # plan.json and dvc.lock as they were
    assert (project / "reports/plan.json").read_bytes() == plan

    # Once the value is fixed, the stage writes a new plan and DVC records it, as always.
    params.write_text(params.read_text().replace("\n  lr: 0\n", "\n  lr: 0.1\n")
                      .replace("\n  epochs: 10\n", "\n  epochs: 3\n"))
    assert _run(project, "dvc", "repro", "validate").returncode == 0
    assert json.loads((project / "reports/plan.json").read_text())["epochs"] == 3
    status = _run(project, "git", "status", "--porcelain").stdout.splitlines()
    assert sorted(status) == [" M dvc.lock", " M params.yaml", " M reports/plan.json"], status
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["validate"]
    assert lock["params"]["params.yaml"]["train"]["epochs"] == 3
    assert lock["outs"][0]["md5"] == hashlib.md5((project / "reports/plan.json").read_bytes()).hexdigest()
