"""How long a training run took to start: seconds from the process's start to its first iteration.

:class:`StartupTimer` (a trainer handler in ``train.json``) logs ``start-up: N s from the command to
the first training iteration`` when the first iteration starts (``benchmarks/startup.py`` breaks
the time down into its parts). The process's start is read
from ``/proc/self/stat`` (Linux); elsewhere the time this module was imported stands in for it.
"""

from __future__ import annotations

import logging
import os
import time

from ignite.engine import Engine, Events

__all__ = ["StartupTimer", "process_start_time"]

logger = logging.getLogger(__name__)
_IMPORTED = time.time()


def process_start_time() -> float:
    """Wall-clock time (``time.time()`` scale) at which this process started."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


class StartupTimer:
    """Logs the seconds from the process's start to the first iteration of the engine it is attached to."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._first)

    def _first(self, engine: Engine) -> None:
        engine.remove_event_handler(self._first, Events.ITERATION_STARTED)  # a resumed run starts past iteration 1
        seconds = time.time() - process_start_time()
        engine.state.startup_seconds = seconds
        logger.info("start-up: %.1f s from the command to the first training iteration", seconds)
