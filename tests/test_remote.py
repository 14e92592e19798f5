"""A DVC remote whose objects went bad: one byte of the model changed, the packed MNIST cut
short. With the remote set up as `make remote` does (`verify true`), `dvc pull` refuses both;
with a plain `dvc remote add` DVC places them, and the download stage then refetches the
damaged packed copy instead of crashing on it."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, run, tiny_project

pytestmark = [pytest.mark.slow, pytest.mark.fault]

MODEL, ARCHIVE, RAW = "models/model.pt", "data/MNIST/raw.tar.gz", "data/MNIST/raw"


def attempt(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `cmd` as helpers.run does, but let it fail."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def make_remote(repo: Path, url: Path) -> None:
    """`make remote URL=...` in `repo`, on this checkout's virtual environment."""
    venv = repo / ".venv"
    if not venv.exists():
        venv.symlink_to(REPO / ".venv")
        # .gitignore's `.venv/` matches a folder, not a link to one
        with (repo / ".git" / "info" / "exclude").open("a") as exclude:
            exclude.write("/.venv\n")
    # -o: the environment is there; never reinstall it from here.
    run(["make", "-o", ".venv/.installed", "remote", f"URL={url}"], repo)


def remote_object(storage: Path, repo: Path, path: str) -> Path:
    """Where `path` of repo's dvc.lock lies in the remote."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [md5] = [out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
             if out["path"] == path]
    return storage / "files" / "md5" / md5[:2] / md5[2:]


def damage(obj: Path, change) -> None:
    """Rewrite an object of the remote in place, keeping DVC's read-only mode: a directory
    remote re-hashes (and deletes) only objects whose mode is not DVC's own, so bit rot or a
    bad copy that keeps the mode is what a pull would otherwise check out unnoticed."""
    mode = obj.stat().st_mode
    obj.chmod(mode | 0o200)
    obj.write_bytes(change(obj.read_bytes()))
    obj.chmod(mode)


def flip_one_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0x01
    return bytes(changed)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[Path, Path]:
    """A trained tiny project pushed to a directory remote set up by `make remote`; then the
    remote's model object has one byte changed and its packed MNIST is cut in half."""
    project = tiny_project(tmp_path_factory.mktemp("project"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(epochs=1, limit_train=128)  # the model only has to exist
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([str(BIN / "dvc"), "repro", "train"], project)
    storage = tmp_path_factory.mktemp("storage")
    make_remote(project, storage)
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "trained"], project)
    run([str(BIN / "dvc"), "push"], project)
    damage(remote_object(storage, project, MODEL), flip_one_byte)
    damage(remote_object(storage, project, ARCHIVE), lambda data: data[: len(data) // 2])
    return project, storage


def clone(project: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(project), str(dest)], dest.parent)
    return dest


def test_pull_through_make_remote_refuses_damaged_objects(pushed, tmp_path):
    project, storage = pushed
    repo = clone(project, tmp_path / "clone")
    make_remote(repo, storage)  # the same command as in the project: the same config
    assert run(["git", "status", "--porcelain", ".dvc/config"], repo).stdout == ""

    pulled = attempt([str(BIN / "dvc"), "pull"], repo)

    out = pulled.stdout + pulled.stderr
    assert pulled.returncode != 0, out
    assert MODEL in out and ARCHIVE in out, out
    assert "Traceback" not in out, out
    assert not (repo / MODEL).exists() and not (repo / ARCHIVE).exists()
    # What was intact came through.
    curves = "reports/training_curves.csv"
    assert (repo / curves).read_bytes() == (project / curves).read_bytes()


def test_without_verify_damaged_objects_are_placed_and_repro_refetches_mnist(pushed, tmp_path):
    """Why `make remote` sets verify: a plain remote places both damaged files. The download
    stage then takes the packed copy for missing (one line) and fetches MNIST again, where it
    used to end in an EOFError traceback."""
    project, storage = pushed
    repo = clone(project, tmp_path / "clone")
    run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "plain", str(storage)], repo)

    pulled = attempt([str(BIN / "dvc"), "pull"], repo)

    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (repo / MODEL).read_bytes() != (project / MODEL).read_bytes()
    assert (repo / ARCHIVE).stat().st_size < (project / ARCHIVE).stat().st_size

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for raw in (project / RAW).iterdir():
        (mirror / f"{raw.name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["mirrors"] = [mirror.as_uri()]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repro = attempt([str(BIN / "dvc"), "repro", "download"], repo)

    out = repro.stdout + repro.stderr
    assert repro.returncode == 0 and "Traceback" not in out, out
    [line] = [line for line in out.splitlines() if "packed copy is damaged" in line]
    assert line.startswith(f"{ARCHIVE}: "), line
    for raw in (project / RAW).iterdir():
        assert (repo / RAW / raw.name).read_bytes() == raw.read_bytes(), raw.name
    assert sorted(p.name for p in (repo / "data/MNIST").iterdir()) == [
        ".gitignore", "raw", "raw.tar.gz"]
    # The archive itself is not compared: the stage packs it again (tests/test_download.py),
    # but its hash is the one the damaged object was cached under, so DVC then checks that
    # cached copy out over it. Only a verified pull keeps such an object out of the cache.
