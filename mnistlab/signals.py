"""Stopping cleanly: Ctrl-C and SIGTERM take one path, and a few writes cannot be cut apart.

The train stage and the search keep an epoch's checkpoint, MLflow metrics and curves in
step; `signals_deferred` holds a stop until they are all written, then stops as asked.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


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
