"""The training loop every stage and benchmark shares: the optimiser and its schedule, one
training epoch, one pass over a test set, and the run (`TrainingRun`) that joins them.

On a GPU a step of these small CNNs is a few microseconds of arithmetic behind a hundred
kernel launches, so the loop is built to keep the host out of the way: the epoch's images
are augmented in a few large chunks before its first step, nothing is read back to the host
before the epoch ends, and on CUDA the forward and backward pass of a full batch are captured
once as CUDA graphs and replayed (`train.cuda_graphs`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mnistlab.data import Split, batch_indices, normalize, random_affine, steps_per_epoch
from mnistlab.mnist import NUM_CLASSES
from mnistlab.model import build_model
from mnistlab.config import Params, Train

Forward = Callable[[torch.Tensor], torch.Tensor]
# Images warped per call when augmenting an epoch: large enough to amortise the launches,
# small enough that the sampling grid (8 bytes a pixel) stays near 50 MB.
AUGMENT_CHUNK = 8192
# The bar the sources report against ("above 99.4 %"): a run's summary says when it first met it.
TARGET_ACCURACY = 0.994
# Guessing uniformly scores a cross-entropy of ln(10) = 2.30. An epoch whose mean loss is ten
# times that (or not a number at all) has diverged: its weights are no longer worth keeping.
DIVERGED_LOSS = 10 * math.log(NUM_CLASSES)
# A quick run (`-S train.epochs=1`, or a few thousand images) keeps its OneCycle shape, so
# it climbs to train.lr within a few dozen steps, and at I1's 0.2 it diverged in epoch 1.
# A OneCycle warm-up shorter than QUICK_WARMUP_STEPS clips the gradients' norm at
# QUICK_GRAD_CLIP when train.grad_clip is 0: the quick run keeps train.lr, the peak its full
# recipe trains at (a lower peak instead trained visibly worse in one epoch). Every preset's
# full recipe warms up for longer (I1's, the shortest, for 588 steps beside a 10,000-image
# validation split), so none of them is clipped (tests/test_train.py checks each).
QUICK_WARMUP_STEPS = 500
QUICK_GRAD_CLIP = 1.0


class TrainingDiverged(RuntimeError):
    """An epoch ended with a non-finite or exploded loss."""


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast runs convs and matmuls in bf16; BatchNorm and the loss stay in fp32.
    The cast-weight cache is off because CUDA graph capture requires it (and these CNNs use
    each weight once per pass, so it saves nothing)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def memory_format(recipe: Train) -> torch.memory_format:
    return torch.channels_last if recipe.channels_last else torch.contiguous_format


def make_optimizer(model: nn.Module, recipe: Train) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                            weight_decay=recipe.weight_decay)


def gradient_clip(recipe: Train, steps: int) -> float:
    """The max gradient norm a run of `steps` steps per epoch trains with (0: no clipping):
    train.grad_clip, or QUICK_GRAD_CLIP for a quick OneCycle run that set none."""
    warmup_steps = recipe.onecycle.pct_start * recipe.epochs * steps
    quick = recipe.scheduler == "onecycle" and warmup_steps < QUICK_WARMUP_STEPS
    if recipe.grad_clip == 0 and quick:
        return QUICK_GRAD_CLIP
    return recipe.grad_clip


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Train, steps: int):
    """OneCycle steps every batch; StepLR and ReduceLROnPlateau step once per epoch."""
    if recipe.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps,
            pct_start=recipe.onecycle.pct_start, div_factor=recipe.onecycle.div_factor,
            final_div_factor=recipe.onecycle.final_div_factor)
    if recipe.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, recipe.step.step_size, recipe.step.gamma)
    if recipe.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=recipe.plateau.factor, patience=recipe.plateau.patience)
    return None


def start_training(params: Params, device: torch.device, steps: int, seed: int):
    """A fresh run: (model, optimizer, scheduler, generator), the model on `device` in the
    training memory format, the schedule spanning `steps` steps per epoch, and both random
    streams seeded with `seed` (torch's for weights and dropout, the CPU generator for
    shuffling and augmentation)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(params.model).to(device, memory_format=memory_format(params.train))
    optimizer = make_optimizer(model, params.train)
    return model, optimizer, make_scheduler(optimizer, params.train, steps), generator


def training_forward(model: nn.Module, data: Split, recipe: Train, dtype: torch.dtype) -> Forward:
    """The function a training step calls for its logits: the model itself, or on CUDA with
    `train.cuda_graphs` (and at least one full batch) its CUDA-graphed forward and backward.

    `torch.cuda.make_graphed_callables` records the kernels of one forward and one backward
    pass and replays them with a single launch each, which is what a 15k-parameter CNN needs:
    eager PyTorch spends far longer launching its ~100 kernels than the GPU spends running
    them. The graph is fixed to one input shape and to training mode, so the epoch's last,
    smaller batch and every evaluation run the ordinary (eager) model on the same weights.
    BatchNorm's running statistics are restored after the capture's warm-up passes, so
    capturing leaves the model as it found it.
    """
    device = data.images.device
    if device.type != "cuda" or not recipe.cuda_graphs or len(data) < recipe.batch_size:
        return model
    sample = normalize(data.images[: recipe.batch_size], recipe.normalize)
    sample = sample.contiguous(memory_format=memory_format(recipe))
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.train()
    with autocast(device, dtype):
        torch.cuda.make_graphed_callables(model, (sample,))  # replaces model.forward
    graphed = model.forward
    del model.forward  # the model goes back to its class's forward: eager, exportable
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])

    def forward(images: torch.Tensor) -> torch.Tensor:
        if model.training and images.shape == sample.shape:
            return graphed(images)
        return model(images)

    return forward


def augmented_epoch(data: Split, recipe: Train, generator: torch.Generator) -> torch.Tensor:
    """Every training image warped by its own random affine (`train.augment`), normalised,
    in the training memory format: one epoch's inputs, made in a few large passes rather
    than one small pass per step."""
    with torch.no_grad():
        warped = torch.cat([random_affine(chunk, recipe.augment, generator)
                            for chunk in data.images.split(AUGMENT_CHUNK)])
        return normalize(warped, recipe.normalize).contiguous(memory_format=memory_format(recipe))


def training_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  optimizer: torch.optim.Optimizer, dtype: torch.dtype, clip: float = 0.0,
                  forward: Forward | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch: logits under autocast (`forward`, default the model),
    the loss in fp32, gradients clipped to `clip` when it is above 0. Returns the loss and
    the logits, still on the device."""
    with autocast(images.device, dtype):
        logits = (forward or model)(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss, logits


def train_one_epoch(model: nn.Module, data: Split, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, recipe: Train,
                    generator: torch.Generator, dtype: torch.dtype, epoch: int,
                    forward: Forward | None = None) -> dict[str, float]:
    """One pass over `data` in shuffled batches; `scheduler` (if given) steps every batch.
    `forward` is what `training_forward` returned (default: the model, eager).

    Loss and accuracy are summed on the device and read once at the end: reading them every
    step (`.item()`) would wait for the GPU each time.
    """
    forward = forward or model
    model.train()
    device = data.images.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    batches = batch_indices(len(data), recipe.batch_size, shuffle=True, generator=generator, device=device)
    clip = gradient_clip(recipe, steps_per_epoch(len(data), recipe.batch_size))
    images = augmented_epoch(data, recipe, generator)
    # tqdm's disable=None: a bar on a terminal, silence in logs and CI.
    with tqdm(batches, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", disable=None,
              leave=False) as bar:
        for step, index in enumerate(bar):
            labels = data.labels[index]
            loss, logits = training_step(model, images[index], labels, optimizer, dtype, clip,
                                         forward)
            if scheduler is not None:
                scheduler.step()
            total_loss += loss.detach() * len(index)
            correct += (logits.argmax(dim=1) == labels).sum()
            if not bar.disable and step % 20 == 0:  # a sync, so only when someone watches
                seen = min((step + 1) * recipe.batch_size, len(data))
                bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}",
                                acc=f"{correct.item() / seen:.4f}")
    return {"train_loss": total_loss.item() / len(data),
            "train_accuracy": correct.item() / len(data)}


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # int64 [N], on the CPU


@torch.no_grad()
def predict_split(model: nn.Module, data: Split, batch_size: int, recipe: Train,
                  dtype: torch.dtype) -> Evaluation:
    """Mean cross-entropy, accuracy and the predicted class of every image."""
    model.eval()
    device = data.images.device
    total_loss = torch.zeros((), device=device)
    predictions = []
    for index in batch_indices(len(data), batch_size, shuffle=False, generator=None, device=device):
        images = normalize(data.images[index], recipe.normalize).contiguous(memory_format=memory_format(recipe))
        with autocast(device, dtype):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), data.labels[index], reduction="sum")
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions)
    accuracy = (predicted == data.labels).sum().item() / len(data)
    return Evaluation(loss=total_loss.item() / len(data), accuracy=accuracy,
                      predictions=predicted.cpu())


@dataclass
class TrainingRun:
    """One training run: the model and everything that moves it forward (optimiser, schedule,
    random streams, data, precision), the finished epochs, and the two routines a run needs:
    `epochs()` trains and scores epoch after epoch, `state()` / `restore()` checkpoint it.
    Each epoch is scored on `holdout`: the test set, or a validation split of the training
    images (`train.validation`), and its metrics are named after it (`test_accuracy`,
    `val_accuracy`).

    The train stage, every benchmark and the tests drive training through this one object,
    so they measure the training that ships, and a change to it is made once.
    """

    params: Params
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler, ReduceLROnPlateau, or None
    generator: torch.Generator
    dtype: torch.dtype
    train: Split
    holdout: Split
    eval_batch_size: int
    holdout_name: str = "test"  # or "val": the prefix of the scores' metric names
    history: list[dict] = field(default_factory=list)
    forward: Forward | None = None  # training_forward's result; the eager model until set

    @classmethod
    def start(cls, params: Params, train: Split, holdout: Split, dtype: torch.dtype,
              eval_batch_size: int | None = None, seed: int | None = None,
              holdout_name: str = "test") -> TrainingRun:
        """A fresh run of `params` on the device the data lives on."""
        model, optimizer, scheduler, generator = start_training(
            params, train.images.device, steps_per_epoch(len(train), params.train.batch_size),
            params.base.seed if seed is None else seed)
        return cls(params, model, optimizer, scheduler, generator, dtype, train, holdout,
                   eval_batch_size or params.evaluate.batch_size, holdout_name)

    @property
    def score_key(self) -> str:
        """The metric a run is judged by each epoch: `test_accuracy` or `val_accuracy`."""
        return f"{self.holdout_name}_accuracy"

    def capture(self) -> None:
        """Replay full batches as CUDA graphs where that applies (see `training_forward`)."""
        self.forward = training_forward(self.model, self.train, self.params.train, self.dtype)

    def epochs(self) -> Iterator[dict[str, float]]:
        """Train the epochs not yet done, scoring each on `holdout`; yield each epoch's
        metrics once it is in `history` (the caller saves them between epochs, outside
        `epoch_seconds`)."""
        recipe = self.params.train
        for epoch in range(len(self.history) + 1, recipe.epochs + 1):
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            per_batch = self.scheduler if recipe.scheduler == "onecycle" else None
            metrics = train_one_epoch(self.model, self.train, self.optimizer, per_batch, recipe,
                                      self.generator, self.dtype, epoch, self.forward)
            result = predict_split(self.model, self.holdout, self.eval_batch_size, recipe,
                                   self.dtype)
            check_converging(epoch, metrics["train_loss"], result.loss, recipe, self.holdout_name)
            self.step_epoch_scheduler(result.loss)
            name = self.holdout_name
            self.history.append({"epoch": epoch, **metrics, f"{name}_loss": result.loss,
                                 f"{name}_accuracy": result.accuracy, "lr": lr,
                                 "epoch_seconds": time.perf_counter() - started})
            yield self.history[-1]

    def step_epoch_scheduler(self, holdout_loss: float) -> None:
        """StepLR and ReduceLROnPlateau step once per epoch (OneCycle steps every batch)."""
        if self.params.train.scheduler == "plateau":
            self.scheduler.step(holdout_loss)
        elif self.params.train.scheduler == "step":
            self.scheduler.step()

    def state(self) -> dict:
        """What `restore` needs to continue exactly where this run is."""
        return {"history": self.history, "model_state": self.model.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "scheduler_state": self.scheduler.state_dict() if self.scheduler else None,
                "torch_rng": torch.get_rng_state(), "generator_rng": self.generator.get_state()}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler_state"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator_rng"])
        self.history = list(state["history"])


def check_converging(epoch: int, train_loss: float, holdout_loss: float, recipe: Train,
                     holdout_name: str = "test") -> None:
    """Stop a run whose epoch ended diverged, before anything of that epoch is saved."""
    for name, loss in (("training", train_loss), (holdout_name, holdout_loss)):
        if not math.isfinite(loss) or loss > DIVERGED_LOSS:
            clip = ("set train.grad_clip (e.g. 1.0)" if recipe.grad_clip == 0
                    else f"lower train.grad_clip (now {recipe.grad_clip:g})")
            raise TrainingDiverged(
                f"training diverged in epoch {epoch}: the mean {name} loss is {loss:.4g} "
                f"(guessing scores {math.log(NUM_CLASSES):.2f}); lower train.lr (now "
                f"{recipe.lr:g}) or {clip}")


def time_to_accuracy(history: list[dict], target: float, key: str = "test_accuracy") -> dict:
    """The first epoch whose score (`key`) reached `target`, and the seconds of training and
    scoring up to its end (bookkeeping between epochs excluded); None for both if none did."""
    elapsed = 0.0
    for metrics in history:
        elapsed += metrics["epoch_seconds"]
        if metrics[key] >= target:
            return {"epoch_to_target": metrics["epoch"], "seconds_to_target": round(elapsed, 2),
                    "target_accuracy": target}
    return {"epoch_to_target": None, "seconds_to_target": None, "target_accuracy": target}
