"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM (pre-emption, ``kill``, job schedulers).

The first signal only sets a flag; the loop checks it after each optimizer step, writes a
checkpoint and returns. A second signal aborts at once (``KeyboardInterrupt``). The process's
previous handlers are restored on exit.

Exit status of a run stopped this way (``difftune train``): 128 + the signal number, the shell's
convention, so schedulers see that the run did not finish: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager holding the first stop signal received (``signum``), or ``None``."""

    def __init__(self, log=print) -> None:
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name} received: finishing the current step and writing a checkpoint "
                 "(press Ctrl-C again to abort at once)")

    def __enter__(self) -> StopRequest:
        # Handlers can only be installed from the main thread (e.g. not inside a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
