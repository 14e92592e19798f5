"""Training learns, is reproducible on the CPU, and every optimiser/scheduler runs."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from helpers import REPO
from mnistlab import loop
from mnistlab.data import load_split, steps_per_epoch
from mnistlab.loop import TrainingRun, make_optimizer, make_scheduler, time_to_accuracy
from mnistlab.mnist import TRAIN_IMAGES
from mnistlab.model import build_model
from mnistlab.config import compose, parse_params, preset_names


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


# --- quick runs: a short OneCycle warm-up clips the gradients ---------------------------------


@pytest.mark.parametrize("validation", [0, 10_000], ids=["test set", "validation split"])
@pytest.mark.parametrize("preset", preset_names(REPO / "conf" / "preset"))
def test_no_full_recipe_is_clipped_as_a_quick_run(preset, validation):
    """The quick-run rule leaves every preset's full recipe as it was written (and so its
    published results), scored on the test set or beside a validation split."""
    params = parse_params(compose(preset, [f"train.validation={validation}"], REPO / "conf"))
    steps = steps_per_epoch(TRAIN_IMAGES - validation, params.train.batch_size)
    assert loop.gradient_clip(params.train, steps) == params.train.grad_clip


@pytest.mark.parametrize(("overrides", "clip"), [
    (["train.epochs=1"], loop.QUICK_GRAD_CLIP),                     # I1: 70 warm-up steps
    (["train.epochs=2", "train.limit_train=8192"], loop.QUICK_GRAD_CLIP),
    (["train.epochs=1", "train.grad_clip=0.5"], 0.5),               # the user's own wins
    (["train.epochs=1", "train.scheduler=step"], 0.0),              # no warm-up to shorten
    ([], 0.0),                                                      # the default: 705 steps
])
def test_a_quick_onecycle_run_clips_its_gradients(overrides, clip):
    params = parse_params(compose("default", overrides, REPO / "conf"))
    images = params.train.limit_train or TRAIN_IMAGES
    assert loop.gradient_clip(params.train, steps_per_epoch(images, params.train.batch_size)) == clip


def test_the_training_step_clips_at_the_quick_run_norm(default_params, tiny_mnist, monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(loop.nn.utils, "clip_grad_norm_",
                        lambda parameters, max_norm: norms.append(max_norm) or clip(parameters, max_norm))
    fit(tiny_params(default_params, epochs=1), tiny_mnist, epochs=1)
    assert norms and set(norms) == {loop.QUICK_GRAD_CLIP}


# --- resume: the checkpoint's params snapshot --------------------------------------------------


def test_a_checkpoint_resumes_only_with_the_params_it_was_written_with(default_params, capsys):
    """models/checkpoint.pt keeps every param but train.resume under the key "recipe", the key
    checkpoints written before carry too: the same params resume it, other params start afresh
    and the line says why."""
    from mnistlab.checkpoint import load_resumable

    params = tiny_params(default_params, resume=True)
    snapshot = params.model_dump(mode="json")
    del snapshot["train"]["resume"]
    checkpoint = {"recipe": snapshot, "mlflow_run_id": "0123abcd"}
    assert load_resumable(params, checkpoint) is checkpoint
    assert load_resumable(tiny_params(default_params, resume=True, epochs=4), checkpoint) is None
    assert "checkpoint.pt was written with other params; starting afresh" in capsys.readouterr().out
