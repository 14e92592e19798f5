"""`train.precision: auto` on a CPU: time a few training steps of the run's own model in fp32
and under bf16 autocast, and train in the faster.

Whether bf16 pays on a CPU depends on more than its flags. On a 2-core AMD EPYC with
AVX512-BF16 and no AMX, bf16 autocast trained I1 about 1.4x faster than fp32 (`make bench`,
docs/performance.md); on a 2-core Xeon with the same flag, fp32 was faster. So `auto`
measures instead of guessing: a few steps of each, interleaved, once per CPU (its model,
vector instructions and thread count) and torch version. The answer is kept in a small JSON
file outside the repository (`$XDG_CACHE_HOME/mnistlab/precision.json`, by default
`~/.cache/...`; `MNISTLAB_CACHE_DIR` moves it), so that every later run on that CPU, and the
evaluate stage after it, reads the same answer instead of timing again. Delete the file to
measure again.

The measurement draws its random weights and images from torch's generator inside
`torch.random.fork_rng`, so it leaves the run's random streams exactly as it found them:
a run trains the same whether the answer was measured or read back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mnistlab.config import Params
from mnistlab.files import write_json

# Training steps of each precision per round; rounds alternate fp32 and bf16, and each
# precision's fastest round counts (the least disturbed by whatever else the CPU ran).
STEPS, ROUNDS, WARMUP_STEPS = 6, 3, 2
# bf16 must train at least this much faster to be chosen: fp32 is the precision the sources
# trained in, so a tie within the measurement's noise goes to it.
MIN_SPEEDUP = 1.05
# train.precision's names for the two autocast dtypes, and back.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Measurement:
    """What `auto` chose on one CPU and why, as cached and as logged."""
    choice: str                 # "fp32" or "bf16"
    fp32_images_per_second: float
    bf16_images_per_second: float
    model: str                  # the preset whose model was timed, e.g. "I1"
    measured_at: str            # UTC, ISO 8601

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.choice]

    @property
    def reason(self) -> str:
        ratio = self.bf16_images_per_second / self.fp32_images_per_second
        return (f"auto chose {self.choice}: bf16 autocast trained {self.model}'s model at "
                f"{ratio:.2f}x fp32's speed ({self.bf16_images_per_second:,.0f} vs "
                f"{self.fp32_images_per_second:,.0f} images/s, measured {self.measured_at}; "
                f"bf16 needs {MIN_SPEEDUP:.2f}x)")


def cache_file() -> Path:
    root = os.environ.get("MNISTLAB_CACHE_DIR")
    if root:
        return Path(root) / "precision.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnistlab" / "precision.json"


def cpu_key(cpu_name: str) -> str:
    """The cache's key: the CPU as `runtime.describe` names it (model, vector instructions,
    threads) and the torch version, whose kernels are what was timed."""
    return f"{cpu_name}, torch {torch.__version__}"


def auto_on_cpu(params: Params, cpu_name: str) -> Measurement:
    """The cached answer for this CPU, or a new measurement (then cached)."""
    key, path = cpu_key(cpu_name), cache_file()
    cached = read_cache(path)
    if key in cached:
        try:
            return Measurement(**cached[key])
        except TypeError:  # written by another version of this file: measure again
            pass
    measurement = measure(params)
    cached[key] = asdict(measurement)
    try:
        write_json(path, cached)
    except OSError as err:  # a read-only home: the run goes on, and measures again next time
        print(f"precision: could not cache the measurement in {path} ({err.strerror})")
    return measurement


def read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure
        return {}
    return cached if isinstance(cached, dict) else {}


def faster(fp32_rate: float, bf16_rate: float) -> str:
    """"bf16" where it trains at least MIN_SPEEDUP times fp32's images per second."""
    return "bf16" if bf16_rate >= MIN_SPEEDUP * fp32_rate else "fp32"


def measure(params: Params) -> Measurement:
    """Time training steps of `params`' model, at its batch size and memory format, in fp32
    and under bf16 autocast, on random images (the speed of these kernels does not depend
    on the pixels)."""
    # loop imports runtime, which imports this module
    from mnistlab.loop import make_optimizer, memory_format, training_step
    from mnistlab.model import build_model

    recipe = params.train
    best = {torch.float32: 0.0, torch.bfloat16: 0.0}
    with torch.random.fork_rng(devices=[]):
        model = build_model(params.model).to(memory_format=memory_format(recipe))
        optimizer = make_optimizer(model, recipe)
        images = torch.randn(recipe.batch_size, 1, 28, 28).contiguous(
            memory_format=memory_format(recipe))
        labels = torch.randint(0, 10, (recipe.batch_size,))

        def steps(count: int, dtype: torch.dtype) -> None:
            for _ in range(count):
                training_step(model, images, labels, optimizer, dtype)

        model.train()
        for _ in range(ROUNDS):
            for dtype in best:
                steps(WARMUP_STEPS, dtype)
                started = time.perf_counter()
                steps(STEPS, dtype)
                rate = STEPS * recipe.batch_size / (time.perf_counter() - started)
                best[dtype] = max(best[dtype], rate)
    fp32, bf16 = best[torch.float32], best[torch.bfloat16]
    return Measurement(choice=faster(fp32, bf16),
                       fp32_images_per_second=round(fp32), bf16_images_per_second=round(bf16),
                       model=params.base.preset,
                       measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
