"""The machine a benchmark runs on, for its report: CPU model and the cores this process may use."""

from __future__ import annotations

import os
import pathlib
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPU cores this process may run on (XLA:CPU sizes its thread pool by them)."""
    return len(os.sched_getaffinity(0))
