"""Where a training step's time goes: the train stage's path under torch.profiler.

    python -m benchmarks.profile_step [--device auto] [--steps 20] [--readme]

Runs params.yaml's model and recipe through mnistlab.loop.train_one_epoch (as the train stage
does) for a few warm-up steps, then profiles `--steps` more and sums the operators' own
time into a few kinds (convolutions, BatchNorm, dropout masks, ...). The profiler adds its
own overhead, so read the shares, not the absolute milliseconds.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import fresh_training, header
from mnistlab.data import Split, load_split
from mnistlab import runtime
from mnistlab.loop import train_one_epoch, training_forward
from mnistlab.config import load_params
from tools import doc_blocks

# Operator-name fragments -> the kind of work they are; the first match wins.
KINDS = [
    ("convolution", "convolutions (forward + backward)"),
    ("batch_norm", "BatchNorm (forward + backward)"),
    ("bernoulli", "dropout masks (random draws)"),
    ("max_pool", "max pooling (forward + backward)"),
    ("clamp_min", "ReLU (forward + backward)"),
    ("threshold_backward", "ReLU (forward + backward)"),
    ("relu", "ReLU (forward + backward)"),
    ("grid_sampler", "augmentation (batched affine warps)"),
    ("affine_grid", "augmentation (batched affine warps)"),
    ("Optimizer", "optimizer step and zero_grad"),
    ("_foreach", "optimizer step and zero_grad"),
]
OTHER = "everything else (casts, copies, loss, small ops)"


def kind_of(name: str) -> str:
    return next((kind for fragment, kind in KINDS if fragment in name), OTHER)


def profile_steps(params, device: torch.device, train: Split, steps: int,
                  dtype: torch.dtype) -> dict[str, float]:
    """Self time in seconds of each kind of work over `steps` profiled training steps."""
    bs = params.train.batch_size
    model, optimizer, scheduler, generator = fresh_training(params, device, steps)
    warmup = Split(images=train.images[: 3 * bs], labels=train.labels[: 3 * bs])
    forward = training_forward(model, warmup, params.train, dtype)  # CUDA graphs, on CUDA
    train_one_epoch(model, warmup, optimizer, scheduler, params.train, generator, dtype, 0,
                    forward)
    profiled = Split(images=train.images[3 * bs:(3 + steps) * bs],
                     labels=train.labels[3 * bs:(3 + steps) * bs])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        train_one_epoch(model, profiled, optimizer, scheduler, params.train, generator, dtype, 1,
                        forward)
    seconds: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        # On a GPU the kernels' device time is the work; on a CPU, the operators' own time.
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        seconds[kind_of(event.key)] += own / 1e6
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--steps", type=int, default=20, help="profiled training steps")
    parser.add_argument("--readme", action="store_true",
                        help="also write the table into its block of docs/performance.md")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    params = load_params()
    setup = runtime.setup(params, device=args.device)
    device, dtype = setup.device, setup.dtype
    train = load_split(train=True, device=device)
    if (args.steps + 3) * params.train.batch_size > len(train):
        parser.error(f"--steps {args.steps}: the training set holds only "
                     f"{len(train) // params.train.batch_size - 3} steps after warm-up")
    seconds = profile_steps(params, device, train, args.steps, dtype)

    total = sum(seconds.values())
    lines = [
        header(device, f"python -m benchmarks.profile_step --device {args.device} "
                       f"--steps {args.steps}",
               f"model {params.base.preset}, batch {params.train.batch_size}, "
               f"{'fp32' if dtype == torch.float32 else str(dtype).removeprefix('torch.') + ' autocast'}; "
               f"{args.steps} steps of the train stage's path under torch.profiler"),
        "",
        "| work | ms per step | share |",
        "| --- | ---: | ---: |",
    ]
    for kind, own in sorted(seconds.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {own / args.steps * 1e3:.1f} | {own / total:.0%} |")
    print("\n".join(lines))
    if args.readme:
        doc_blocks.update({f"profile-{device.type}": lines})


if __name__ == "__main__":
    main()
