"""Generated blocks of README.md: every figure there is written by the command that
measured it, between `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from stages.files import write_text

README = Path("README.md")


def fill(text: str, block: str, lines: list[str]) -> str:
    """`text` with the contents of block `block` replaced by `lines`."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"README.md has no {begin} ... {end} block to fill")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: "\n".join([begin, *lines, end]), text)


def update(blocks: dict[str, list[str]]) -> None:
    """Rewrite each named block of README.md (atomically: all blocks or none)."""
    text = README.read_text()
    for block, lines in blocks.items():
        text = fill(text, block, lines)
    write_text(README, text)
    print(f"README.md updated ({', '.join(blocks)})")
