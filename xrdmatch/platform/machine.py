"""The machine a figure was made on, as results and the README name it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name: trained weights, hence metrics, differ in their last bits between
    CPU models (the math library picks other kernels), and timings differ by much more."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU model unknown"
