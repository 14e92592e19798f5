"""Stopping cleanly: Ctrl-C and SIGTERM take one path, a few writes cannot be cut apart, and
a stage that has finished ends at once.

The train stage and the search keep an epoch's checkpoint, MLflow metrics and curves in
step; `signals_deferred` holds a stop until they are all written, then stops as asked.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn


def raise_keyboard_interrupt(signum: int, _frame: object) -> None:
    """A signal handler: SIGTERM stops like Ctrl-C, so the same `finally` blocks run."""
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has run, then stop as they asked.

    For the few writes that make an epoch "saved" (checkpoint, MLflow metrics, curves): a
    stop between them would leave them disagreeing, e.g. MLflow holding an epoch the
    checkpoint does not, which a resumed run would then log twice.
    """
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in received:
        raise KeyboardInterrupt("stopped by signal SIGTERM")
    if received:  # Ctrl-C, held until the block ended: reported as Ctrl-C
        raise KeyboardInterrupt


def exit_finished() -> NoReturn:
    """End a process whose work is done and written, without the interpreter's teardown.

    After the exit handlers, Python frees every module's objects one by one: for a process
    that imported torch's compiler and opened MLflow's SQL store, a quarter of a second that
    keeps nothing (measured as a lever in docs/performance.md). The exit handlers still run
    (logging's, MLflow's), and the output is flushed; what the stage wrote is already closed,
    each file by an atomic rename and each MLflow call by its own commit. Only for success:
    an error keeps Python's own exit, its message and its status.
    """
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers `sys.exit` would run, run now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
