"""Run every ``benchmarks/bench_*.py`` in turn, each in its own subprocess; fail if any fails.

Each benchmark runs with the project's virtual environment (``.venv/bin/python`` when it
exists, else the interpreter running this script) from the repository root, its output
streamed as it comes. Arguments after the options are passed on to every benchmark.

Usage::

    python benchmarks/run_all.py             # what `make bench` runs
    python benchmarks/run_all.py --quick     # smoke check: pass --quick to every benchmark
    python benchmarks/run_all.py -k capture  # only benchmarks whose name contains "capture"

Every ``bench_*.py`` is found by name, so a new benchmark is registered by its file name
alone. The full runs can be long: ``bench_netdissect_scale.py`` (``dissect()`` at 8k to 63k
rows) writes a 3.2 GB store into ``TMPDIR`` and takes about 10-15 minutes on two cores; with
``--quick`` (N up to 8k) it takes about a minute, like the others.

Exit status: 0 when every benchmark exited 0, else 1. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def default_python() -> str:
    venv = ROOT / ".venv" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--python",
        default=default_python(),
        help="interpreter to run the benchmarks with (default: %(default)s)",
    )
    p.add_argument("-k", dest="select", default="", help="only names containing this text")
    args, passthrough = p.parse_known_args(argv)
    scripts = sorted(s for s in HERE.glob("bench_*.py") if args.select in s.stem)
    if not scripts:
        print(f"no benchmarks/bench_*.py matching {args.select!r}")
        return 1
    failed = []
    summary = []
    for script in scripts:
        cmd = [args.python, str(script), *passthrough]
        print(f"=== {script.relative_to(ROOT)}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        elapsed = time.perf_counter() - t0
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        summary.append(f"  {script.name:<32} {status:<18} {elapsed:7.1f} s")
        if rc != 0:
            failed.append(script.name)
        print(flush=True)
    print("=== summary")
    print("\n".join(summary))
    if failed:
        print(f"{len(failed)} of {len(scripts)} benchmarks failed: {', '.join(failed)}")
        return 1
    print(f"all {len(scripts)} benchmarks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
