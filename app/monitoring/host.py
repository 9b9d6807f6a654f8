"""How much CPU the host has to spare: the drift monitor's schedule backs off while the web workers need it."""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
SMOOTHING_SECONDS = 10.0
"""The idle share is an exponentially weighted mean over about this long: one busy second does not throttle
the monitor, a saturated minute does."""


class HostIdle:
    """The share of the host's CPU time left idle, smoothed, from ``/proc/stat``'s ``cpu`` line.

    The monitor's own CPU time counts as idle (without the monitor those cycles would be). Where ``/proc/stat``
    cannot be read (not Linux) the host counts as idle, which leaves the schedule as it would be without
    this rule. In a container ``/proc/stat`` describes the node, not the pod: the monitor then backs off while
    the node is busy, whoever keeps it busy.
    """

    def __init__(self, stat: Path = PROC_STAT, smoothing_seconds: float = SMOOTHING_SECONDS) -> None:
        self.stat = stat
        self.smoothing_seconds = smoothing_seconds
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.idle = 1.0
        self._last: tuple[float, float, float, float] | None = None  # (monotonic, total, idle ticks, own CPU s)

    def _read(self) -> tuple[float, float] | None:
        try:
            fields = self.stat.read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu" or len(fields) < 5:
            return None
        # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
        ticks = [float(v) for v in fields[1:9]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
        return sum(ticks), idle

    def sample(self) -> float:
        """Update with the time since the last sample and return the smoothed idle share (0 to 1)."""
        read = self._read()
        if read is None:
            return self.idle
        now, own = time.monotonic(), time.process_time()
        total, idle = read
        if self._last is not None:
            then, last_total, last_idle, last_own = self._last
            elapsed_ticks = total - last_total
            if elapsed_ticks > 0:
                spare = (idle - last_idle) + (own - last_own) * self.ticks_per_second
                share = min(max(spare / elapsed_ticks, 0.0), 1.0)
                weight = min((now - then) / self.smoothing_seconds, 1.0)
                self.idle += weight * (share - self.idle)
        self._last = (now, total, idle, own)
        return self.idle
