"""tools/predict.py: any digit image becomes an MNIST-like 28 x 28 field; bad files are
refused in one line that names them, before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
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


def draw_digit(kind: str, width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A thick "1" or a ring "0" drawn in white on black, filling `box` (left, top, right,
    bottom) of a page of the given size: the ink's coverage, 0 to 1."""
    from PIL import ImageDraw

    page = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(page)
    left, top, right, bottom = box
    stroke = max(2, (bottom - top) // 7)
    if kind == "one":
        middle = (left + right) // 2
        draw.line([(middle - (right - left) // 4, top + (bottom - top) // 5), (middle, top)],
                  fill=255, width=stroke)
        draw.line([(middle, top), (middle, bottom)], fill=255, width=stroke)
    else:
        draw.ellipse(box, outline=255, width=stroke)
    return np.asarray(page, dtype=np.float32) / 255


def photographed(ink: np.ndarray, seed: int) -> Image.Image:
    """`ink` as a phone photo of it: dark ink on paper lit from one side with a vignette, a
    little blur, sensor noise (sigma 10 of 255); the caller saves it as JPEG."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    height, width = ink.shape
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    light = 235 * (1 + 0.3 * xs) * (1 - 0.35 * (xs ** 2 + ys ** 2) / 2)
    grey = light * (0.85 - 0.65 * ink)
    blurred = Image.fromarray(grey.clip(0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 10, grey.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def centre_of_mass(field: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(field.shape)
    return (ys * field).sum() / field.sum(), (xs * field).sum() / field.sum()


@pytest.mark.parametrize("kind", ["one", "zero"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_photographed_digit_is_prepared_as_the_clean_one(tmp_path, kind, seed):
    # The clean digit, white on black, centred on its own page.
    Image.fromarray((draw_digit(kind, 200, 200, (60, 30, 140, 170)) * 255).astype(np.uint8)).save(
        tmp_path / "clean.png")
    # The same digit, smaller, off-centre on a 160 x 120 page photographed badly, JPEG.
    photographed(draw_digit(kind, 160, 120, (18, 14, 50, 70)), seed).save(
        tmp_path / "photo.jpg", quality=75)
    clean, photo = mnist_like(tmp_path / "clean.png"), mnist_like(tmp_path / "photo.jpg")
    clean_ink, photo_ink = clean > 0.3 * 255, photo > 0.3 * 255
    iou = (clean_ink & photo_ink).sum() / (clean_ink | photo_ink).sum()
    assert iou > 0.6, f"ink masks overlap by {iou:.2f} (intersection over union)"
    assert np.allclose(centre_of_mass(photo), 13.5, atol=2.0), centre_of_mass(photo)
    rows, cols = np.nonzero(photo_ink)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 >= 18  # the digit fills the box, not a corner


def test_a_transparent_background_is_paper(tmp_path):
    """A drawing app's PNG: black strokes, anti-aliased in the alpha channel, on a background
    whose alpha is 0 (and whose colour, unseen, is black too)."""
    coverage = draw_digit("zero", 200, 200, (50, 30, 150, 170))
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)
    rgba[..., 3] = (coverage * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawn.png")
    Image.fromarray((255 - coverage * 255).astype(np.uint8)).save(tmp_path / "paper.png")
    drawn = mnist_like(tmp_path / "drawn.png")
    assert np.abs(drawn - mnist_like(tmp_path / "paper.png")).mean() < 4


@pytest.mark.bad_input
def test_a_photo_of_blank_paper_has_no_digit(tmp_path):
    photographed(np.zeros((120, 160), dtype=np.float32), seed=0).save(
        tmp_path / "paper.jpg", quality=75)
    with pytest.raises(ImageError, match="no digit found"):
        mnist_like(tmp_path / "paper.jpg")


@pytest.fixture
def model_server():
    """A stand-in for `make serve` on 127.0.0.1: it answers "7" (probability 0.9) for each
    28 x 28 field it is sent, and records how many it was sent."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sent: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the name http.server calls
            fields = np.asarray(json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                                ["inputs"])
            assert fields.shape[1:] == (28, 28)
            sent.append(len(fields))
            row = [0.1 / 9] * 10
            row[7] = 0.9
            body = json.dumps({"predictions": [row] * len(fields)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sent
    server.shutdown()
    server.server_close()


def run_predict(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.predict", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.bad_input
def test_one_bad_file_is_named_and_the_others_are_read(tmp_path, model_server):
    url, sent = model_server
    draw_seven(100, 100, ink=0, paper=255).save(tmp_path / "first.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture at all")
    draw_seven(300, 200, ink=255, paper=0).save(tmp_path / "last.jpg")
    paths = [str(tmp_path / name) for name in ("first.png", "broken.png", "last.jpg")]
    result = run_predict("--url", url, *paths)
    assert result.returncode == 1, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"predict: error: {paths[1]}: not an image")
    assert result.stdout.splitlines() == [f"{paths[0]}: 7 (probability 0.900)",
                                          f"{paths[2]}: 7 (probability 0.900)"]
    assert sent == [2]  # one request, for the two good files


def test_images_listed_in_the_environment_may_hold_spaces(tmp_path, model_server):
    """`make predict IMAGES="my digits/seven.png"` passes IMAGES on in the environment."""
    url, _ = model_server
    folder = tmp_path / "my digits"
    folder.mkdir()
    draw_seven(100, 100, ink=0, paper=255).save(folder / "seven 1.png")
    draw_seven(100, 100, ink=0, paper=255).save(folder / "seven 2.png")
    one = run_predict("--url", url, env={"IMAGES": str(folder / "seven 1.png")})
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == [f"{folder / 'seven 1.png'}: 7 (probability 0.900)"]
    both = run_predict("--url", url,
                       env={"IMAGES": f'"{folder / "seven 1.png"}" "{folder / "seven 2.png"}"'})
    assert both.returncode == 0, both.stderr
    assert len(both.stdout.splitlines()) == 2
