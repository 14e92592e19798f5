"""Which data a run read, recorded in MLflow: the dataset's DVC hash and its files' MD5s."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import mlflow
import yaml

from mnistlab.files import md5_of_file
from mnistlab.mnist import FILES
from mnistlab.tracking import project_root


def log_dataset(raw_dir: Path, verified: bool, lock_file: Path = Path("dvc.lock")) -> None:
    """Which data the active run read: MNIST's raw folder as an MLflow dataset input whose
    digest is the folder's DVC hash (from dvc.lock, as `dvc status` knows it), tagged with
    the MD5 of each of the four files (MNIST's own when the stage `verified` them)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    md5s = dict(FILES) if verified else {name: md5_of_file(raw_dir / name) for name in FILES}
    dvc_hash = None
    if lock_file.is_file():
        outs = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(
            "download", {}).get("outs", [])
        dvc_hash = next((out.get("md5") for out in outs if out.get("path") == raw_dir.as_posix()),
                        None)
    digest = dvc_hash or hashlib.md5("".join(md5s.values()).encode()).hexdigest()
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a local folder
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source((project_root() / raw_dir).as_uri())
    dataset = MetaDataset(source, name="mnist", digest=digest.removesuffix(".dir")[:36])
    mlflow.log_input(dataset, context="training",
                     tags={"dvc_hash": dvc_hash or "none", **{f"md5.{k}": v for k, v in md5s.items()}})
