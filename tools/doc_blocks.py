"""Generated blocks of the documentation: every figure in README.md and the docs/ pages is
written by the command that measured it, between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` markers. `--readme` on a benchmark or a report command (tools.results_table,
tools.search_report) rewrites its block wherever it is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mnistlab.files import write_text

DOCUMENTS = (Path("README.md"), Path("docs/performance.md"), Path("docs/search.md"),
             Path("docs/results.md"))


def _markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def fill(text: str, block: str, lines: list[str]) -> str:
    """`text` with the contents of block `block` replaced by `lines`."""
    begin, end = _markers(block)
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: "\n".join([begin, *lines, end]), text)


def update(blocks: dict[str, list[str]]) -> None:
    """Rewrite each named block in the document that holds it (each document atomically)."""
    texts = {path: path.read_text() for path in DOCUMENTS if path.exists()}
    changed = set()
    for block, lines in blocks.items():
        holder = next((path for path, text in texts.items()
                       if all(marker in text for marker in _markers(block))), None)
        if holder is None:
            sys.exit(f"no document has a {_markers(block)[0]} ... block to fill "
                     f"({', '.join(map(str, DOCUMENTS))})")
        texts[holder] = fill(texts[holder], block, lines)
        changed.add(holder)
    for path in changed:
        write_text(path, texts[path])
    print(f"updated {', '.join(blocks)} in {', '.join(sorted(map(str, changed)))}")
