"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half.

`write_atomic` does it for one file; `all_or_nothing` for a set of files (a stage's reports),
which end up all new or, when anything fails, all as they were.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """JSON has no NaN or Infinity: a non-finite number is a bug upstream, refused here
    (ValueError) rather than written as a file other tools cannot parse."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    def write(file: IO[bytes]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        file.write(text.getvalue().encode())

    write_atomic(path, write)


def md5_of_file(path: Path) -> str | None:
    """The md5 of `path` (about 0.1 s for MNIST's 47 MB), or None when there is no such file."""
    if not path.is_file():
        return None
    with path.open("rb") as file:
        return md5_of_stream(file)


def md5_of_stream(stream: IO[bytes]) -> str:
    """The md5 of what is left to read in `stream`, read a megabyte at a time."""
    digest = hashlib.md5()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def all_or_nothing(targets: Iterable[Path]) -> Iterator[Callable[[Path], Path]]:
    """Write a set of files so that they change together or not at all.

        with all_or_nothing([a, b]) as staged:
            write_json(staged(a), ...)
            write_text(staged(b), ...)

    Inside the block every write goes to a staging folder; only when the whole block has
    succeeded are the files moved into place. If the block or a move fails, the files that
    were already moved are put back as they were, so a reader sees every old file or every
    new one. A target that cannot be replaced (a folder in its place, a read-only folder) is
    found before anything is moved.
    """
    targets = [Path(t) for t in targets]
    root = Path(os.path.commonpath([t.parent.resolve() for t in targets]))
    root.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    staged = {t: stage_dir / t.resolve().relative_to(root) for t in targets}
    try:
        yield lambda target: staged[Path(target)]
        for target, new in staged.items():
            if not new.exists():
                raise FileNotFoundError(f"{target} was not written")
            if target.is_dir() or not os.access(target.parent if target.parent.exists()
                                                else root, os.W_OK):
                raise PermissionError(f"{target} cannot be replaced (a folder, or a read-only "
                                      f"folder, is in the way)")
        _move_all(staged, stage_dir)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)


def _move_all(staged: dict[Path, Path], stage_dir: Path) -> None:
    """Move the staged files into place; on a failure, undo the moves already made."""
    backups: list[tuple[Path, Path | None]] = []  # (target, its old version or None)
    try:
        for index, (target, new) in enumerate(staged.items()):
            old = None
            if target.exists():
                old = stage_dir / f".old-{index}"
                os.replace(target, old)
            backups.append((target, old))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(new, target)
    except BaseException:
        for target, old in reversed(backups):
            if old is not None:
                os.replace(old, target)
            else:
                target.unlink(missing_ok=True)
        raise
