"""The experiments of the current commit, one short row each, to fit a terminal.

    python -m tools.exps            (`make exps`; `make exps FULL=1` is the whole `dvc exp show`)

`dvc exp show` lists every param, metric and dependency hash: 30 columns and lines of
nearly 2,000 characters. This keeps what tells experiments apart: the preset, the random
seed, the params set on top of the preset (`-S model.head=gap`), the final test accuracy,
the parameter count and the training time. Queued and running experiments are listed too.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from collections.abc import Sequence

import yaml

WIDTH = 120
# The columns besides the params that differ: (title, the metric or param of `dvc exp show`,
# format). Preset and seed are params of their own, so they are never listed as differing.
COLUMNS = (
    ("preset", "base.preset", "{}"),
    ("seed", "base.seed", "{}"),
    ("test acc", "test_accuracy", "{:.2%}"),
    ("params", "params", "{:,}"),
    ("train s", "train_seconds", "{:.0f}"),
)
OWN_COLUMNS = {"base.preset", "base.seed"}


@functools.cache
def preset_params(preset: str) -> dict[str, object]:
    """The params a preset composes to (`-S preset=NAME`), flattened like `dvc exp show`'s
    columns; {} for a name conf/preset/ does not have (a deleted preset)."""
    from mnistlab.config import ParamsError, compose

    try:
        return flatten(compose(preset))
    except ParamsError:
        return {}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing(row: dict, param_names: Sequence[str]) -> str:
    """`key=value` for each param the experiment set on top of its preset."""
    reference = preset_params(str(row.get("base.preset")))
    changed = []
    for name in param_names:
        value = row.get(name)
        if name in OWN_COLUMNS or value is None or name not in reference:
            continue
        if _same(value, reference[name]):
            continue
        changed.append(f"{name}={_short(value)}")
    return " ".join(changed)


def _same(shown: object, composed: object) -> bool:
    # `dvc exp show` gives numbers as floats and lists as their text: compare as YAML reads them.
    if isinstance(shown, str):
        try:
            shown = yaml.safe_load(shown)
        except yaml.YAMLError:
            pass
    if isinstance(shown, (int, float)) and isinstance(composed, (int, float)):
        return float(shown) == float(composed)
    return shown == composed


def _short(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace(" ", "")


def _cell(value: object, fmt: str) -> str:
    # `dvc exp show` gives "!" (or None) where a commit or a queued run has no value yet.
    if value is None or value == "!":
        return "-"
    if isinstance(value, float) and (value.is_integer() and fmt in ("{}", "{:,}")):
        value = int(value)
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def table(rows: list[dict], width: int = WIDTH) -> list[str]:
    """Rows of experiment, state, COLUMNS and what differs, in at most `width` characters."""
    param_names = sorted({key for row in rows for key in row if "." in key
                          and not key.startswith(("mnistlab/", "stages/", "conf/", "data/", "models/",
                                                  "reports/"))})
    header = ["experiment", "state", *(title for title, _, _ in COLUMNS), "set on top of the preset"]
    body = []
    for row in rows:
        cells = [str(row.get("Experiment") or row.get("rev") or ""), str(row.get("State") or "")]
        for _, key, fmt in COLUMNS:
            cells.append(_cell(row.get(key), fmt))
        cells.append(differing(row, param_names))
        body.append(cells)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for cells in [header, *body]:
        fixed = "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(cells, widths)))
        room = width - len(fixed) - 2
        last = cells[-1] if len(cells[-1]) <= room else cells[-1][:max(room - 1, 0)] + "…"
        lines.append(f"{fixed}  {last}".rstrip()[:width])
    return lines


def experiments() -> list[dict]:
    """The current commit's row and its experiments' (queued and running ones included)."""
    from dvc.api import exp_show

    rows = exp_show()
    # The workspace row repeats the commit's or the last applied experiment's values.
    return [row for row in rows if row.get("Experiment") != "workspace"
            and row.get("rev") != "workspace"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tools.exps", description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=None,
                        help=f"line width (default: the terminal's, at most {WIDTH})")
    args = parser.parse_args(argv)
    width = args.width or min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)
    if width < 60:
        sys.exit(f"exps: error: --width {width} is too narrow: give 60 or more")
    try:
        rows = experiments()
    except Exception as err:  # noqa: BLE001 - DVC's own errors: one line, not its traceback
        sys.exit(f"exps: error: {type(err).__name__}: {err}")
    print("\n".join(table(rows, width)))


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    main()
