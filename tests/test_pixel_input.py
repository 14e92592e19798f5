"""The model users get (MLflow, serving) takes raw pixels: the normalisation is inside it."""

from __future__ import annotations

import torch
from torch import nn

from mnistlab.model import PixelClassifier

MEAN, STD = 0.1307, 0.3081


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()


def test_pixels_in_probabilities_out_like_the_normalised_network():
    net = network()
    pixels = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.softmax(net((pixels[:, None].float() / 255 - MEAN) / STD), dim=1)
        model = PixelClassifier(net, MEAN, STD)
        for given in (pixels, pixels.float(), pixels[:, None], pixels[:, None].float()):
            probabilities = model(given)
            torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(6))


def test_scale_matters():
    """[0, 1] pixels are not 0-255 pixels to the network's wrapper: it does not guess. The
    served model around it reads images scaled to [0, 1] (tests/test_serving.py)."""
    net = network()
    pixels = torch.randint(0, 256, (4, 28, 28)).float()
    with torch.no_grad():
        model = PixelClassifier(net, MEAN, STD)
        assert not torch.allclose(model(pixels), model(pixels / 255))
