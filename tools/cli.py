"""What the commands of tools/ and benchmarks/ share on their command lines: a refused
argument is one line, without argparse's usage text above it, and a count is a whole number
in a range, checked before anything runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mnistlab.config import echo


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refused argument is one line: `PROG: error: MESSAGE`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def is_whole_number(text: str, least: int, most: int) -> bool:
    # isascii: '²' is a digit to str.isdigit, not to int(); the length keeps int() quick.
    return text.isascii() and text.isdigit() and len(text) < 10 and least <= int(text) <= most


def whole_number(least: int, most: int, what: str = "") -> Callable[[str], int]:
    """An argparse `type=` for a whole number from `least` to `most` (`what` names its unit)."""
    def parse(text: str) -> int:
        if not is_whole_number(text, least, most):
            raise argparse.ArgumentTypeError(
                f"{echo(text)}: should be a whole number{f' of {what}' if what else ''} "
                f"from {least} to {most}")
        return int(text)
    return parse
