"""What more than one benchmark uses: the first line of a generated block, the device sync
around a timed region, the notebooks' DataLoader baseline and the guard its forked workers
need, and the train stage's own start of a training run. Benchmarks share code through this
module only, never by importing each other."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnistlab.loop import start_training
from mnistlab.runtime import describe


def header(device: torch.device, command: str, details: str = "") -> str:
    """The first line of a block a benchmark writes into the documentation: the device by its
    model, the torch build, what was measured (`details`) and the command that measured it,
    so that every figure below it can be traced to a device, a version and a rerun."""
    if not command.startswith("python -m benchmarks."):
        raise ValueError(f"command {command!r}: a block names the benchmark that wrote it "
                         "(python -m benchmarks.NAME ...)")
    return (f"Device: {describe(device)}, torch {torch.__version__}; "
            + (f"{details}; " if details else "") + f"`{command}`")


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device`: a clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def fork_safe():
    """Start DataLoader workers (they fork from this process) without the CUDA crash.

    A forked worker inherits every object of this process, CUDA tensors included. If its
    garbage collector frees one (a reference cycle left over from an earlier run), that
    calls into CUDA, which cannot work after a fork, and the worker dies. So collect the
    cycles first and hide what is left from the workers' collector while they start.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def sources_loader(params, device: torch.device, workers: int, drop_last: bool = True,
                 root: Path | str = "data") -> DataLoader:
    """torchvision dataset + per-sample transforms + DataLoader, as the sources' notebooks do."""
    aug = params.train.augment
    transform = transforms.Compose([
        transforms.RandomAffine(degrees=aug.degrees, translate=(aug.translate, aug.translate),
                                scale=aug.scale, shear=aug.shear or None),
        transforms.ToTensor(),
        transforms.Normalize((params.train.normalize.mean,), (params.train.normalize.std,)),
    ])
    dataset = datasets.MNIST(root, train=True, download=False, transform=transform)
    return DataLoader(dataset, batch_size=params.train.batch_size, shuffle=True,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, drop_last=drop_last)


def fresh_training(params, device: torch.device, steps: int):
    """(model, optimizer, scheduler, generator) built as the train stage builds them, seeded
    with 0, the scheduler spanning `steps` plus warm-up."""
    return start_training(params, device, steps + 5, seed=0)
