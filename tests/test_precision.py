"""`train.precision`: set values are taken as they are; `auto` on a CPU with bf16 instructions
times the run's model in both precisions once per CPU and torch version, caches the answer
and leaves the run's random streams untouched (mnistlab/precision.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mnistlab import precision, runtime
from mnistlab.config import parse_params

CPU = torch.device("cpu")
CPU_NAME = "cpu: Test CPU, AVX512 (2 threads)"


@pytest.fixture
def params(default_params):
    default_params["train"]["batch_size"] = 32  # a quick measurement
    return parse_params(default_params)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MNISTLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def with_flags(monkeypatch, flags: str) -> None:
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set(flags.split()))


def fake_measurements(monkeypatch, fp32: float, bf16: float) -> list:
    """measure() replaced by one that reports these rates; returns the list of its calls."""
    calls = []

    def measure(params):
        calls.append(params.base.preset)
        return precision.Measurement(precision.faster(fp32, bf16), fp32, bf16, params.base.preset, "2026-01-01T00:00:00Z")

    monkeypatch.setattr(precision, "measure", measure)
    return calls


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_a_set_precision_is_taken_without_measuring(params, cache, monkeypatch, name, dtype):
    with_flags(monkeypatch, "avx512f avx512_bf16")
    calls = fake_measurements(monkeypatch, 1000, 2000)
    chosen = params.model_copy(update={"train": params.train.model_copy(update={"precision": name})})
    assert runtime.resolve_precision(chosen, CPU, CPU_NAME) == (dtype, f"{name}: set by train.precision")
    assert calls == [] and not cache.exists()


def test_auto_without_bf16_instructions_is_fp32_without_measuring(params, cache, monkeypatch):
    with_flags(monkeypatch, "fpu sse2 avx2")
    calls = fake_measurements(monkeypatch, 1000, 2000)
    dtype, why = runtime.resolve_precision(params, CPU, CPU_NAME)
    assert dtype == torch.float32 and "without bf16 instructions" in why
    assert calls == [] and not cache.exists()


@pytest.mark.parametrize("fp32, bf16, expected", [
    (5400, 7500, torch.bfloat16),   # the AMD EPYC with AVX512-BF16: bf16 1.39x faster
    (3900, 3000, torch.float32),    # bf16 slower
    (5000, 5100, torch.float32),    # within MIN_SPEEDUP: the tie goes to fp32
])
def test_auto_takes_the_faster_and_says_why(params, cache, monkeypatch, fp32, bf16, expected):
    with_flags(monkeypatch, "avx512f avx512_bf16")
    fake_measurements(monkeypatch, fp32, bf16)
    dtype, why = runtime.resolve_precision(params, CPU, CPU_NAME)
    assert dtype == expected
    assert why.startswith(f"auto chose {'bf16' if expected == torch.bfloat16 else 'fp32'}")
    assert f"{bf16:,.0f} vs {fp32:,.0f} images/s" in why


def test_auto_measures_once_per_cpu_and_torch_version(params, cache, monkeypatch):
    with_flags(monkeypatch, "avx512f amx_tile amx_bf16")
    calls = fake_measurements(monkeypatch, 1000, 2000)
    first = runtime.resolve_precision(params, CPU, CPU_NAME)
    again = runtime.resolve_precision(params, CPU, CPU_NAME)
    assert calls == ["I1"] and first == again
    stored = json.loads(cache.read_text())
    assert list(stored) == [f"{CPU_NAME}, torch {torch.__version__}"]
    assert stored[f"{CPU_NAME}, torch {torch.__version__}"]["choice"] == "bf16"

    runtime.resolve_precision(params, CPU, "cpu: Test CPU, AVX512 (1 thread)")
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    runtime.resolve_precision(params, CPU, CPU_NAME)
    assert len(calls) == 3 and len(json.loads(cache.read_text())) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"choice": "bf16"}}'])
def test_an_unreadable_cache_is_measured_again(params, cache, monkeypatch, content):
    with_flags(monkeypatch, "avx512f avx512_bf16")
    calls = fake_measurements(monkeypatch, 1000, 900)
    cache.parent.mkdir(parents=True)
    cache.write_text(content.replace("KEY", f"{CPU_NAME}, torch {torch.__version__}"))
    assert runtime.resolve_precision(params, CPU, CPU_NAME)[0] == torch.float32
    assert calls == ["I1"]
    assert json.loads(cache.read_text())[f"{CPU_NAME}, torch {torch.__version__}"]["choice"] == "fp32"


def test_an_unwritable_cache_lets_the_run_go_on(params, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MNISTLAB_CACHE_DIR", str(blocker / "cache"))  # a folder under a file
    with_flags(monkeypatch, "avx512f avx512_bf16")
    fake_measurements(monkeypatch, 1000, 2000)
    assert runtime.resolve_precision(params, CPU, CPU_NAME)[0] == torch.bfloat16
    assert "could not cache the measurement" in capsys.readouterr().out


def test_the_cache_lives_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("MNISTLAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.cache_file() == tmp_path / "mnistlab" / "precision.json"


def test_measuring_times_both_precisions_and_leaves_the_random_streams_alone(params):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    measurement = precision.measure(params)
    assert torch.equal(torch.rand(3), expected)  # the run draws what it would have drawn
    assert measurement.fp32_images_per_second > 0 and measurement.bf16_images_per_second > 0
    assert measurement.choice == precision.faster(measurement.fp32_images_per_second,
                                                  measurement.bf16_images_per_second)
    assert measurement.model == "I1"
