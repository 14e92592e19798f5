"""The two loops every stage shares: one training epoch, and one pass over a test set."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.data import Split, batch_indices, normalize, random_affine
from stages.params import Train


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast runs convs and matmuls in bf16; BatchNorm and the loss stay in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, data: Split, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, cfg: Train,
                    generator: torch.Generator, dtype: torch.dtype, epoch: int) -> dict[str, float]:
    """One pass over `data` in shuffled batches; `scheduler` (if given) steps every batch.

    Loss and accuracy are summed on the device and read once at the end: reading them every
    step (`.item()`) would wait for the GPU each time.
    """
    model.train()
    device = data.images.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    batches = batch_indices(len(data), cfg.batch_size, shuffle=True, generator=generator, device=device)
    # tqdm's disable=None: a bar on a terminal, silence in logs and CI.
    with tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=None,
              leave=False) as bar:
        for step, index in enumerate(bar):
            images = random_affine(data.images[index], cfg.augment, generator)
            images = normalize(images, cfg.normalize).contiguous(memory_format=memory_format)
            labels = data.labels[index]
            with autocast(device, dtype):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += loss.detach() * len(index)
            correct += (logits.argmax(dim=1) == labels).sum()
            if not bar.disable and step % 20 == 0:  # a sync, so only when someone watches
                seen = min((step + 1) * cfg.batch_size, len(data))
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
def evaluate(model: nn.Module, data: Split, batch_size: int, cfg: Train,
             dtype: torch.dtype) -> Evaluation:
    """Mean cross-entropy, accuracy and the predicted class of every image."""
    model.eval()
    device = data.images.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    total_loss = torch.zeros((), device=device)
    predictions = []
    for index in batch_indices(len(data), batch_size, shuffle=False, generator=None, device=device):
        images = normalize(data.images[index], cfg.normalize).contiguous(memory_format=memory_format)
        with autocast(device, dtype):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), data.labels[index], reduction="sum")
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions)
    accuracy = (predicted == data.labels).sum().item() / len(data)
    return Evaluation(loss=total_loss.item() / len(data), accuracy=accuracy,
                      predictions=predicted.cpu())
