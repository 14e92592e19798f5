"""Whole recipes, timed as the train stage runs them: how long, and how accurate.

    python -m benchmarks.recipe_time [--presets I3 I1 ...] [--device auto] [--readme]

Each preset is composed as `dvc exp run -S preset=NAME` composes it (conf/config.yaml, then
conf/preset/NAME.yaml on top) and trained from scratch with the train stage's own epoch loop
(`mnistlab.loop.TrainingRun`: every epoch trains on the whole training set and then tests on
the whole test set). The time is the training loop's wall clock, from building the model to
the end of the last epoch's test, CUDA graph capture and cuDNN's kernel search included.
Left out: process start, loading MNIST onto the device, and the stage's per-epoch writes
(checkpoint, MLflow, CSV; `python -m benchmarks.overheads` times those). Needs neither DVC
nor MLflow, so it runs on any machine that has torch, torchvision and pydantic.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import header, sync
from mnistlab.data import load_split
from mnistlab import runtime
from mnistlab.loop import TARGET_ACCURACY, TrainingRun, time_to_accuracy
from mnistlab.model import count_parameters
from mnistlab.config import Params, ParamsError, compose, parse_params
from tools import doc_blocks
from tools.results_table import reported as reported_figures

def time_recipe(params: Params, device: torch.device, train, test) -> dict:
    """Train `params`' recipe once; its history, loop seconds and summary figures."""
    dtype, _ = runtime.resolve_precision(params, device, runtime.describe(device))
    sync(device)
    started = time.perf_counter()
    run = TrainingRun.start(params, train, test, dtype)  # the train stage's own run
    run.capture()
    for metrics in run.epochs():
        print(f"  epoch {metrics['epoch']}: {metrics['epoch_seconds']:.2f} s, test accuracy "
              f"{metrics['test_accuracy']:.4f}", flush=True)
    sync(device)
    seconds = time.perf_counter() - started
    history = run.history
    best = max(history, key=lambda m: m["test_accuracy"])
    return {"history": history, "seconds": seconds, "params": count_parameters(run.model),
            "dtype": dtype, "final": history[-1]["test_accuracy"], "best": best,
            **time_to_accuracy(history, TARGET_ACCURACY)}


def row(preset: str, params: Params, result: dict) -> str:
    claim = reported_figures().get(preset)
    reported = claim["printed"] if claim else "-"
    target = (f"{result['seconds_to_target']:.1f} s (epoch {result['epoch_to_target']})"
              if result["seconds_to_target"] is not None else "not reached")
    return (f"| {preset} | {result['params']:,} | {params.train.epochs} | "
            f"{params.train.batch_size} | {str(result['dtype']).removeprefix('torch.')} | "
            f"{result['final']:.2%} | {result['best']['test_accuracy']:.2%} "
            f"({result['best']['epoch']}) | {reported} | "
            f"{result['seconds']:.1f} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["I3"],
                        help="conf/preset names, or `default`")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every preset, as `dvc exp run -S` takes them, "
                             "e.g. train.cuda_graphs=false")
    parser.add_argument("--readme", action="store_true",
                        help="also write the table into its block of docs/performance.md")
    args = parser.parse_args()

    # Every preset is composed and validated before any training starts.
    try:
        presets = {name: parse_params(compose(name, overrides=args.set)) for name in args.presets}
    except ParamsError as err:
        raise SystemExit(f"benchmarks.recipe_time: error: {err}") from None
    first = next(iter(presets.values()))  # process-wide settings: --set applies to all
    # Each preset's own precision is resolved when it trains (time_recipe).
    device = runtime.setup(first, device=args.device).device
    train = load_split(train=True, limit=first.train.limit_train, device=device)
    test = load_split(train=False, limit=first.train.limit_test, device=device)

    lines = [
        header(device, f"python -m benchmarks.recipe_time --device {args.device} --presets "
                       f"{' '.join(args.presets)}"
                       f"{' --set ' + ' '.join(args.set) if args.set else ''}",
               f"random seed {', '.join(sorted({str(p.base.seed) for p in presets.values()}))}, "
               "one run each"),
        "",
        "| preset | parameters | epochs | batch | dtype | final test acc | best (epoch) | "
        "reported | training loop s | to 99.4% |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, params in presets.items():
        result = time_recipe(params, device, train, test)
        lines.append(row(name, params, result))
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    if args.readme:
        doc_blocks.update({f"recipes-{device.type}": lines})


if __name__ == "__main__":
    main()
