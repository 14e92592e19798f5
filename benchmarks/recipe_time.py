"""Whole recipes, timed as the train stage runs them: how long, and how accurate.

    python -m benchmarks.recipe_time [--presets I3 I1 ...] [--device auto] [--readme]

Each preset is composed as `dvc exp run -S preset=NAME` composes it (conf/config.yaml, then
conf/preset/NAME.yaml on top) and trained from scratch with the train stage's own epoch loop
(`stages.loop.run_epochs`: every epoch trains on the whole training set and then tests on
the whole test set). The time is the training loop's wall clock, from building the model to
the end of the last epoch's test, CUDA graph capture and cuDNN's kernel search included.
Left out: process start, loading MNIST onto the device, and the stage's per-epoch writes
(checkpoint, MLflow, CSV; `python -m benchmarks.overheads` times those). Needs neither DVC
nor MLflow, so it runs on any machine that has torch, torchvision and pydantic.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from benchmarks import readme
from benchmarks.results_table import reported as reported_figures
from benchmarks.train_throughput import sync
from stages.data import load_split, steps_per_epoch
from stages.device import configure, describe, resolve_device, resolve_precision
from stages.loop import (
    TARGET_ACCURACY,
    run_epochs,
    start_training,
    time_to_accuracy,
    training_forward,
)
from stages.model import count_parameters
from stages.params import Params, parse_params

CONF = Path("conf")


def merge(base: dict, override: dict) -> dict:
    """Hydra's rule for these files: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def compose(preset: str, conf: Path = CONF) -> dict:
    """The params `dvc exp run -S preset=NAME` would write (`default`: no preset)."""
    config = yaml.safe_load((conf / "config.yaml").read_text())
    config.pop("defaults", None)
    if preset != "default":
        path = conf / "preset" / f"{preset}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (conf / "preset").glob("*.yaml"))
            raise SystemExit(f"--presets: no preset {preset!r} (known: default, {', '.join(known)})")
        config = merge(config, yaml.safe_load(path.read_text()))
    return config


def time_recipe(params: Params, device: torch.device, train, test) -> dict:
    """Train `params`' recipe once; its history, loop seconds and summary figures."""
    cfg = params.train
    dtype = resolve_precision(cfg.precision, device)
    sync(device)
    started = time.perf_counter()
    model, optimizer, scheduler, generator = start_training(
        params, device, steps_per_epoch(len(train), cfg.batch_size), params.base.seed)
    forward = training_forward(model, train, cfg, dtype)
    history = []
    for metrics in run_epochs(model, forward, train, test, optimizer, scheduler, cfg,
                              params.evaluate.batch_size, generator, dtype):
        history.append(metrics)
        print(f"  epoch {metrics['epoch']}: {metrics['epoch_seconds']:.2f} s, test accuracy "
              f"{metrics['test_accuracy']:.4f}", flush=True)
    sync(device)
    seconds = time.perf_counter() - started
    best = max(history, key=lambda m: m["test_accuracy"])
    return {"history": history, "seconds": seconds, "params": count_parameters(model),
            "dtype": dtype, "final": history[-1]["test_accuracy"], "best": best,
            **time_to_accuracy(history, TARGET_ACCURACY)}


def row(preset: str, params: Params, result: dict) -> str:
    claim = reported_figures().get(preset)
    reported = f"{claim['final']:.2%}" if claim else "-"
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
    parser.add_argument("--set", nargs="*", default=[], metavar="train.KEY=VALUE",
                        help="override train.* values for every preset (YAML values), "
                             "e.g. train.cuda_graphs=false")
    parser.add_argument("--readme", action="store_true",
                        help="also write the table into README.md's Performance section")
    args = parser.parse_args()

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("train.") or "." in key[len("train."):]:
            parser.error(f"--set {item!r}: expected train.KEY=VALUE")
        overrides[key[len("train."):]] = yaml.safe_load(value)
    # Every preset is validated before any training starts.
    recipes = {name: parse_params(merge(compose(name), {"train": overrides}))
               for name in args.presets}
    device = resolve_device(args.device)
    first = next(iter(recipes.values())).train  # process-wide settings: --set applies to all
    configure(device, first.cudnn_benchmark)
    train = load_split(train=True, limit=first.limit_train, device=device)
    test = load_split(train=False, limit=first.limit_test, device=device)

    lines = [
        f"Device: {describe(device)}, torch {torch.__version__}; "
        f"`python -m benchmarks.recipe_time --device {args.device} --presets "
        f"{' '.join(args.presets)}{' --set ' + ' '.join(args.set) if args.set else ''}`; "
        f"random seed {', '.join(sorted({str(p.base.seed) for p in recipes.values()}))}, "
        "one run each",
        "",
        "| preset | parameters | epochs | batch | dtype | final test acc | best (epoch) | "
        "reported | training loop s | to 99.4% |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, params in recipes.items():
        result = time_recipe(params, device, train, test)
        lines.append(row(name, params, result))
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    if args.readme:
        readme.update({f"recipes-{device.type}": lines})


if __name__ == "__main__":
    main()
