"""What every benchmark prints about the machine it ran on (imported by ``bench_*.py``)."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch

import dissect

NOISE_NOTE = ("NOTE: other processes may share this machine; timings are noisy, hence alternating "
              "repeats, medians and minima, and the load average next to each run.")


def load_text() -> str:
    """The 1-minute load average: above the CPU count, other processes compete for the CPUs."""
    if not hasattr(os, "getloadavg"):
        return "load average n/a"
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


def version_of(module: str) -> str:
    """``module``'s ``__version__``, or ``"not installed"``."""
    try:
        return str(getattr(__import__(module), "__version__", "?"))
    except ImportError:
        return "not installed"


def machine_text(device: torch.device, versions: str) -> str:
    """Three lines: the machine, the software (``versions``: the peers'), the device and load."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (
        f"machine: {platform.platform()}, {platform.machine()}, os.cpu_count()={os.cpu_count()}"
        f", usable CPUs={cpus}\n"
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}), "
        f"{versions}, dissect {dissect.__version__}\n"
        f"device: {device}{gpu}; {load_text()}"
    )


def status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_mib() -> float:
    """This process's peak RSS (``ru_maxrss``) in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB
