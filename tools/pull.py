"""`dvc pull` for a new clone: what the remote holds, then what `dvc repro` will rebuild.

    python -m tools.pull        (`make pull`)

A plain `dvc pull` fails ("Checkout failed for ... models/model.pt") when dvc.lock names
outputs that no remote holds, which is the usual case in a new clone: every commit records
its model, few push it. This pulls what there is (`dvc pull --allow-missing`), then says in a
few lines what came from the remote and which stages `dvc repro` will run to make the rest.
A remote folder that does not exist is one line, not an empty remote.
"""

from __future__ import annotations

import logging
import os
import sys

PROG = "tools.pull"
LISTED = 6  # outputs named per line; more are counted


class PullError(RuntimeError):
    """Nothing can be pulled."""


def names(paths: list[str]) -> str:
    shown = ", ".join(paths[:LISTED])
    return shown + (f" and {len(paths) - LISTED} more" if len(paths) > LISTED else "")


def default_remote(repo) -> str:
    """The default remote's name, once it is known to exist (a folder that is there)."""
    name = repo.config["core"].get("remote")
    if not name:
        raise PullError("no default DVC remote; set one with make remote URL=... (a folder, "
                        "ssh://... with dvc-ssh, s3://... with dvc-s3)")
    remote = repo.cloud.get_remote(name)
    if remote.fs.protocol == "local" and not os.path.isdir(remote.path):
        raise PullError(f"the DVC remote {name!r} is the folder {os.path.normpath(remote.path)}, "
                        f"which does not exist; mount it, or point this clone elsewhere with "
                        f"make remote URL=... LOCAL=1")
    return name


def to_rebuild(repo) -> list[tuple[str, list[str]]]:
    """The stages `dvc repro` will run, each with its outputs, in pipeline order."""
    changed = repo.status()
    return [(stage.addressing, [str(out) for out in stage.outs])
            for stage in repo.index.stages if stage.addressing in changed]


def main() -> None:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    # DVC warns of each missing file by its hash; the summary below names them by path.
    for name in ("dvc", "dvc_data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        repo = Repo()
    except DvcException as err:
        sys.exit(f"{PROG}: error: {str(err).splitlines()[0]}")
    with repo:
        try:
            name = default_remote(repo)
            result = repo.pull(allow_missing=True)
            stages = to_rebuild(repo)
        except PullError as err:
            sys.exit(f"{PROG}: error: {err}")
        except DvcException as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            sys.exit(f"{PROG}: error: dvc pull failed: {first}")
    pulled = sorted({*result.get("added", []), *result.get("modified", [])})
    if pulled:
        print(f"{PROG}: from the remote {name!r}: {names(pulled)}")
    else:
        print(f"{PROG}: nothing new from the remote {name!r}")
    if stages:
        rebuilt = "; ".join(f"{stage} ({names(outs)})" for stage, outs in stages)
        print(f"{PROG}: dvc repro will rebuild {rebuilt}")
    else:
        print(f"{PROG}: every output is here; dvc repro has nothing to run")


if __name__ == "__main__":
    main()
