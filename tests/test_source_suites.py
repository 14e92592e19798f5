"""The two sources with public code ship test suites of four assertions each on their `Net()`
(README 000: tests/test_model.py; README 003: test_model.py). They are rewritten here as they
assert, and run against the model of every preset, so "our readme000 is README 000's model" is
checked the way its authors checked their own. The suites differ in one line: README 000
asserts an `nn.Dropout2d`, README 003 an `nn.Dropout` (neither class is the other's subclass).

The readme presets build their sources' layers in their sources' order: README 000's blocks run
conv, ReLU, BatchNorm, Dropout2d (its code, not its README's conv, BN, ReLU); README 003's
1x1 conv is followed by a ReLU.
"""

from __future__ import annotations

import pytest
from helpers import PRESETS, compose
from torch import nn

from mnistlab.report import suite_checks
from mnistlab.model import build_model
from mnistlab.config import parse_params


def readme000_suite(model: nn.Module) -> list[str]:
    """MohammedYaseen97/erav3-assgn06, tests/test_model.py: the failed assertions."""
    failed = []
    total_params = sum(p.numel() for p in model.parameters())
    if not total_params < 20000:
        failed.append("parameters")
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        failed.append("batchnorm")
    if not any(isinstance(m, nn.Dropout2d) for m in model.modules()):
        failed.append("dropout")
    has_gap = any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    has_fc = any(isinstance(m, nn.Linear) for m in model.modules())
    if not (has_gap or has_fc):
        failed.append("gap or fc")
    return failed


def readme003_suite(model: nn.Module) -> list[str]:
    """twitu/mnist-solver-pro-max, test_model.py: the failed assertions."""
    failed = []
    if not sum(p.numel() for p in model.parameters()) < 20000:
        failed.append("parameters")
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        failed.append("batchnorm")
    if not any(isinstance(m, nn.Dropout) for m in model.modules()):
        failed.append("dropout")
    if not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear)) for m in model.modules()):
        failed.append("gap or fc")
    return failed


# preset -> (README 000's failed assertions, README 003's failed assertions)
EXPECTED = {
    "I0": (["batchnorm", "dropout"], ["batchnorm", "dropout"]),   # no BN, no dropout
    "I1": (["parameters", "dropout"], ["parameters"]),            # 20,978 parameters
    "I2": (["dropout"], []),
    "I3": (["dropout"], []),
    "readme000": ([], ["dropout"]),                                  # Dropout2d only
    "readme001": (["dropout"], []),
    "readme002": (["dropout"], []),
    "readme003": (["dropout"], []),
    "search8000": (["dropout"], []),                                 # nn.Dropout, FC head
    "search5000": (["dropout"], []),                                 # nn.Dropout, FC head
    "search14500_I3_recipe": (["dropout"], []),                      # the I3 study's layout
    "search8000_unpadded": (["dropout"], []),                        # nn.Dropout, GAP head
    "search5000_unpadded": (["dropout"], []),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, nn.Module]:
    out = tmp_path_factory.mktemp("suites")
    return {name: build_model(parse_params(compose(out / f"{name}.yaml", [f"preset={name}"])).model)
            for name in PRESETS}


def test_every_preset_is_in_the_table():
    assert sorted(EXPECTED) == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_source_suites_on_every_preset(models, preset):
    model = models[preset]
    assert (readme000_suite(model), readme003_suite(model)) == EXPECTED[preset]
    # The parameter report runs the same checks.
    checks = suite_checks(model)
    assert checks["has nn.Dropout2d (README 000's suite)"] == ("dropout" not in EXPECTED[preset][0])
    assert checks["has nn.Dropout (README 003's suite)"] == ("dropout" not in EXPECTED[preset][1])


def _kinds(model: nn.Module) -> list[str]:
    return [type(module).__name__ for module in model.children()]


def test_readme000_blocks_run_conv_relu_batchnorm_dropout2d(models):
    kinds = _kinds(models["readme000"])
    assert kinds[:8] == ["Conv2d", "ReLU", "BatchNorm2d", "Dropout2d"] * 2
    # the transition (pool, 1x1 conv, ReLU), and the last conv's ReLU before the GAP head
    assert kinds[12:15] == ["MaxPool2d", "Conv2d", "ReLU"]
    assert kinds[-5:] == ["Conv2d", "ReLU", "AdaptiveAvgPool2d", "Conv2d", "Flatten"]


def test_readme003_one_by_one_conv_is_followed_by_relu(models):
    kinds = _kinds(models["readme003"])
    one_by_one = next(i for i, m in enumerate(models["readme003"].children())
                      if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert kinds[one_by_one - 2: one_by_one + 2] == ["MaxPool2d", "Dropout", "Conv2d", "ReLU"]
