"""Same recipe, both training paths: does the fast path give up accuracy?

    python -m benchmarks.same_recipe [--epochs 0] [--seeds 0] [--readme]

Trains params.yaml's model and recipe (README 004's I1 by default, all its epochs; `--epochs`
shortens it and OneCycle then spans the shorter run, which is no longer the source's recipe:
a 3-epoch OneCycle to I1's peak rate of 0.2 can diverge) once per seed with each path of
benchmarks/train_throughput.py:

  sources' way  torchvision MNIST, per-sample RandomAffine/ToTensor/Normalize, DataLoader,
                fp32, NCHW
  project       mnistlab.loop.train_one_epoch as the train stage runs it (batched affine warps
                on the device, channels_last, autocast per `train.precision`)

and scores both final models with the same test-set evaluation. The noise yardstick is the
binomial standard error of an accuracy measured on 10,000 test images.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import fork_safe, header, sources_loader
from mnistlab.data import load_split, steps_per_epoch
from mnistlab import runtime
from mnistlab.loop import (
    make_optimizer,
    make_scheduler,
    predict_split,
    train_one_epoch,
    training_forward,
)
from mnistlab.model import build_model
from mnistlab.config import load_params
from tools import doc_blocks

PATHS = ("sources' way", "project")


def sources_epoch(model: nn.Module, loader, optimizer, per_batch, recipe, device) -> None:
    """One epoch of the loop the sources' notebooks run."""
    model.train()
    with fork_safe():
        batches = iter(loader)
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        if per_batch is not None:
            per_batch.step()


def train_and_score(path: str, params, device, dtype, seed: int, train, test,
                    workers: int, root: Path | str = "data") -> tuple[float, float]:
    """(final test accuracy, training seconds) of one path trained with `seed`."""
    recipe = params.train
    if path == "sources' way":  # fp32, NCHW: what the notebooks run
        recipe = recipe.model_copy(update={"channels_last": False})
        dtype = torch.float32
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(params.model).to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if path == "sources' way":
        loader = sources_loader(params, device, workers, drop_last=False, root=root)
        steps = len(loader)
    else:
        steps = steps_per_epoch(len(train), recipe.batch_size)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, steps)
    per_batch = scheduler if recipe.scheduler == "onecycle" else None
    started = time.perf_counter()
    forward = training_forward(model, train, recipe, dtype) if path == "project" else model
    for epoch in range(1, recipe.epochs + 1):
        if path == "sources' way":
            sources_epoch(model, loader, optimizer, per_batch, recipe, device)
        else:
            train_one_epoch(model, train, optimizer, per_batch, recipe, generator, dtype, epoch,
                            forward)
        if recipe.scheduler == "plateau":
            scheduler.step(predict_split(model, test, params.evaluate.batch_size, recipe, dtype).loss)
        elif recipe.scheduler == "step":
            scheduler.step()
    seconds = time.perf_counter() - started
    return predict_split(model, test, params.evaluate.batch_size, recipe, dtype).accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs per training run (params.yaml's own count: 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers for the sources' way")
    parser.add_argument("--readme", action="store_true",
                        help="also write the table into its block of docs/performance.md")
    args = parser.parse_args()
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0 (0: params.yaml's count), got {args.epochs}")

    params = load_params()
    if args.epochs:
        params = params.model_copy(update={"train": params.train.model_copy(
            update={"epochs": args.epochs})})
    setup = runtime.setup(params, device=args.device)
    device, dtype = setup.device, setup.dtype
    train = load_split(train=True, device=device)
    test = load_split(train=False, device=device)

    results: dict[str, list[tuple[float, float]]] = {path: [] for path in PATHS}
    for seed in args.seeds:
        for path in PATHS:
            accuracy, seconds = train_and_score(path, params, device, dtype, seed, train,
                                                test, args.workers)
            results[path].append((accuracy, seconds))
            print(f"seed {seed}, {path}: final test accuracy {accuracy:.4f} "
                  f"({seconds:.0f} s)", flush=True)

    means = {path: statistics.mean(a for a, _ in results[path]) for path in PATHS}
    stderr = math.sqrt(means["project"] * (1 - means["project"]) / len(test))
    lines = [
        header(device, f"python -m benchmarks.same_recipe --device {args.device} --epochs "
                       f"{params.train.epochs} --seeds {' '.join(map(str, args.seeds))}",
               f"preset {params.base.preset} ({params.train.epochs} epochs, batch "
               f"{params.train.batch_size}, {params.train.optimizer} + "
               f"{params.train.scheduler}); seeds {', '.join(map(str, args.seeds))}"),
        "",
        "| path | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | train s (mean) |",
        "| --- |" + " ---: |" * (len(args.seeds) + 2),
    ]
    for path in PATHS:
        accs = " | ".join(f"{a:.2%}" for a, _ in results[path])
        lines.append(f"| {path} | {accs} | {means[path]:.2%} | "
                     f"{statistics.mean(s for _, s in results[path]):.0f} |")
    lines += ["", f"Project - sources' way: {(means['project'] - means[PATHS[0]]) * 100:+.2f} pt; "
                  f"one standard error of a 10,000-image test accuracy at this level: "
                  f"{stderr * 100:.2f} pt."]
    print("\n" + "\n".join(lines))
    if args.readme:
        block = "same-recipe" + ("" if device.type == "cpu" else f"-{device.type}")
        doc_blocks.update({block: lines})


if __name__ == "__main__":
    main()
