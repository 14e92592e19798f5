"""The model users call, logged to MLflow: raw 0-255 pixels in, class probabilities out."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.models import infer_signature
from torch import nn

from mnistlab import served_model
from mnistlab.config import Params
from mnistlab.model import PixelClassifier


def log_model(network: nn.Module, params: Params, images: torch.Tensor) -> None:
    """Log the model to the active run, with a signature and an input example of two training
    digits as pixels, N x 28 x 28 float32 (a batch of 1 would freeze the exported batch size
    at 1). The network is `PixelClassifier`, exported as a graph; the model around it
    (mnistlab/served_model.py, logged as code) refuses what is not a pixel with a message and
    reads images scaled to 0..1, which a graph cannot do."""
    network = network.to("cpu", memory_format=torch.contiguous_format).eval().float()
    model = PixelClassifier(network, params.train.normalize.mean, params.train.normalize.std)
    example = (images.detach().cpu().float().squeeze(1) * 255).round().contiguous().numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    with tempfile.TemporaryDirectory() as folder:
        graph = Path(folder) / served_model.NETWORK
        mlflow.pytorch.save_model(model, graph, input_example=example, signature=signature,
                                  pip_requirements=requirements)
        mlflow.pyfunc.log_model(name="model", python_model=served_model.__file__,
                                artifacts={served_model.NETWORK: str(graph)},
                                input_example=example,
                                signature=signature, pip_requirements=requirements)
