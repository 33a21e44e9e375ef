"""What every benchmark prints about the machine it ran on (imported by ``bench_*.py``)."""

from __future__ import annotations

import os
import platform

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
