"""tools/predict.py: any digit image becomes an MNIST-like 28 x 28 field; bad files are
refused in one line that names them, before any model loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from tools.predict import ImageError, mnist_like


def draw_seven(width: int, height: int, ink: int, paper: int) -> Image.Image:
    """A thick "7" on a page of the given size and colours."""
    page = np.full((height, width), paper, dtype=np.uint8)
    top, left = height // 5, width // 4
    page[top:top + height // 10, left:width - left] = ink                 # the bar
    for row in range(top, height - height // 6):                          # the stroke
        col = width - left - (row - top) * (width // 2) // (height - top)
        page[row, max(col - width // 20, 0):col] = ink
    return Image.fromarray(page)


@pytest.mark.parametrize("width, height", [(28, 28), (300, 400), (640, 200)])
def test_any_size_becomes_a_centred_20_pixel_digit(tmp_path, width, height):
    path = tmp_path / "seven.png"
    draw_seven(width, height, ink=255, paper=0).save(path)
    field = mnist_like(path)
    assert field.shape == (28, 28) and field.dtype == np.float32
    assert field.max() == pytest.approx(255) and field.min() == 0
    rows, cols = np.nonzero(field > 0.2 * 255)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 in (19, 20, 21)   # the longer side fills the box
    ys, xs = np.indices(field.shape)
    centre = ((ys * field).sum() / field.sum(), (xs * field).sum() / field.sum())
    assert np.allclose(centre, 13.5, atol=1.0), centre


def test_black_on_white_and_white_on_black_give_the_same_field(tmp_path):
    draw_seven(200, 200, ink=255, paper=0).save(tmp_path / "light.png")
    draw_seven(200, 200, ink=0, paper=255).save(tmp_path / "dark.jpg", quality=95)
    light, dark = mnist_like(tmp_path / "light.png"), mnist_like(tmp_path / "dark.jpg")
    assert np.abs(light - dark).mean() < 8  # JPEG blurs a little; the digit is the same


@pytest.mark.bad_input
@pytest.mark.parametrize("content, words", [
    (b"", "an empty file"),
    (b"not a picture at all", "not an image"),
])
def test_bad_files_are_named(tmp_path, content, words):
    path = tmp_path / "digit.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=words) as caught:
        mnist_like(path)
    assert str(path) in str(caught.value)


@pytest.mark.bad_input
def test_a_blank_page_has_no_digit(tmp_path):
    Image.fromarray(np.full((50, 50), 255, dtype=np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="no digit found"):
        mnist_like(tmp_path / "blank.png")


@pytest.mark.bad_input
def test_the_command_stops_before_loading_a_model(tmp_path):
    (tmp_path / "good.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "tools.predict", str(tmp_path / "good.png"),
                             "--model", "models:/no-such-model@champion"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"predict: error: {tmp_path / 'good.png'}: an empty file"), result.stderr
