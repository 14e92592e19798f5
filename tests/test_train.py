"""Training learns, is reproducible on the CPU, and every optimiser/scheduler runs."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from stages.data import load_split
from stages.loop import TrainingRun, make_optimizer, make_scheduler, time_to_accuracy
from stages.model import build_model
from stages.params import parse_params


def tiny_params(default_params: dict, **train) -> object:
    params = dict(default_params)
    params["train"] = {**default_params["train"], "device": "cpu", "precision": "fp32",
                       "batch_size": 64, "lr": 0.05, "epochs": 3, **train}
    return parse_params(params)


def fit(params, data_root, epochs: int) -> tuple[torch.nn.Module, list[dict]]:
    """The first `epochs` epochs of the train stage's loop, on the CPU."""
    train = load_split(train=True, root=data_root, verify_md5=False)
    test = load_split(train=False, root=data_root, verify_md5=False)
    run = TrainingRun.start(params, train, test, torch.float32, eval_batch_size=256)
    history = list(islice(run.epochs(), epochs))
    return run.model, history


def test_loss_falls_and_the_model_learns(default_params, tiny_mnist):
    _, history = fit(tiny_params(default_params), tiny_mnist, epochs=3)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.9  # chance is 0.1


def test_same_seed_same_weights_on_cpu(default_params, tiny_mnist):
    params = tiny_params(default_params)
    first, _ = fit(params, tiny_mnist, epochs=1)
    second, _ = fit(params, tiny_mnist, epochs=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer,scheduler", [
    ("sgd", "onecycle"), ("sgd", "step"), ("adam", "plateau"), ("adam", "none")])
def test_every_optimizer_and_scheduler_trains(default_params, tiny_mnist, optimizer, scheduler):
    lr = 0.05 if optimizer == "sgd" else 0.003
    params = tiny_params(default_params, optimizer=optimizer, scheduler=scheduler, lr=lr,
                         grad_clip=5.0)
    _, history = fit(params, tiny_mnist, epochs=2)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_onecycle_peaks_at_the_configured_lr(default_params):
    params = tiny_params(default_params, lr=0.2, epochs=2)
    model = build_model(params.model)
    optimizer = make_optimizer(model, params.train)
    scheduler = make_scheduler(optimizer, params.train, steps=10)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.2, rel=1e-3)
    assert rates[0] == pytest.approx(0.2 / params.train.onecycle.div_factor)


def test_time_to_accuracy_counts_epochs_until_the_first_hit():
    history = [{"epoch": 1, "test_accuracy": 0.990, "epoch_seconds": 2.0},
               {"epoch": 2, "test_accuracy": 0.994, "epoch_seconds": 3.0},
               {"epoch": 3, "test_accuracy": 0.996, "epoch_seconds": 4.0}]
    assert time_to_accuracy(history, 0.994) == {
        "epoch_to_target": 2, "seconds_to_target": 5.0, "target_accuracy": 0.994}
    assert time_to_accuracy(history, 0.999)["seconds_to_target"] is None
