"""The two files a training run leaves: the final model and the checkpoint it resumes from.

models/model.pt holds plain tensors and the params that rebuild the architecture, so that
`torch.load(..., weights_only=True)` reads it. models/checkpoint.pt holds the last finished
epoch: weights, optimiser, scheduler, random state, history, the MLflow run id, and the
params it was written with, which a resumed run must match.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mnistlab.config import Params, parse_params
from mnistlab.files import write_atomic
from mnistlab.model import build_model
from mnistlab.paths import CHECKPOINT_FILE, MODEL_FILE

# The checkpoint's key for its params snapshot. The name is older than this project's one
# meaning of "recipe" (a preset's training settings) and stays: older checkpoints still resume.
SNAPSHOT_KEY = "recipe"


class ModelFileError(RuntimeError):
    """models/model.pt is missing, truncated or not a model this pipeline wrote."""


def save_model(model: nn.Module, params: Params, run_id: str, path: Path = MODEL_FILE) -> None:
    """The final model: its weights, the params that rebuild it, its MLflow run."""
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    write_atomic(path, lambda f: torch.save({
        "state_dict": state,
        "params": params.model_dump(mode="json"),
        "mlflow_run_id": run_id,
    }, f))


def load_model(path: Path = MODEL_FILE) -> tuple[nn.Module, Params, str]:
    """Rebuild the model from its file; returns (model, training params, MLflow run id)."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        params = parse_params(saved["params"])
        model = build_model(params.model)
        model.load_state_dict(saved["state_dict"])
        return model, params, saved["mlflow_run_id"]
    except FileNotFoundError:
        raise ModelFileError(f"{path} not found; run `dvc repro train`") from None
    except Exception as err:  # noqa: BLE001 - truncated, garbage, or foreign: one clear message
        detail = next((line.strip() for line in str(err).splitlines()
                       if line.strip() and "weights_only" not in line), "")
        raise ModelFileError(f"{path} is not a readable model checkpoint of this pipeline "
                             f"({type(err).__name__}{': ' + detail[:200] if detail else ''}); "
                             f"rerun `dvc repro train`") from None


def params_snapshot(params: Params) -> dict:
    """What a checkpoint must match to be resumed: every param but the resume switch itself."""
    snapshot = params.model_dump(mode="json")
    snapshot["train"].pop("resume")
    return snapshot


def save_checkpoint(params: Params, run_id: str, state: dict) -> None:
    """The last finished epoch (`state`: TrainingRun.state()), written atomically."""
    write_atomic(CHECKPOINT_FILE, lambda f: torch.save(
        {SNAPSHOT_KEY: params_snapshot(params), "mlflow_run_id": run_id, **state}, f))


def load_checkpoint(quiet: bool) -> dict | None:
    """models/checkpoint.pt as the last finished epoch left it; None when there is none or it
    cannot be read (said in one line unless `quiet`)."""
    if not CHECKPOINT_FILE.exists():
        return None
    try:
        return torch.load(CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file: say so, start afresh
        if not quiet:
            print(f"train: {CHECKPOINT_FILE} is unreadable ({type(err).__name__}); starting afresh")
        return None


def load_resumable(params: Params, checkpoint: dict | None) -> dict | None:
    """The checkpoint, if resuming is on and it was written with these same params."""
    if not (params.train.resume and checkpoint is not None):
        return None
    if checkpoint.get(SNAPSHOT_KEY) != params_snapshot(params):
        print(f"train: {CHECKPOINT_FILE} was written with other params; starting afresh")
        return None
    return checkpoint
