"""What the machine has, read without importing torch (the validate stage checks a CPU run
with this alone, and importing torch would cost it seconds)."""

from __future__ import annotations

import os


def host_memory_bytes() -> int | None:
    """The machine's RAM (POSIX), None where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
