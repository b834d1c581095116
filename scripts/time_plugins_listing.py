"""Time `nvila plugins` (and `--describe siglip`, `--help`) of two installs side by side (issue 15).

    python scripts/time_plugins_listing.py BASE_NVILA NEW_NVILA [--runs 5]

BASE_NVILA and NEW_NVILA are `nvila` executables of two virtual environments (e.g. main's and a branch's).
The runs alternate base, new, base, new, ... so that both see the same load; each run's wall time and CPU time
(user + system, of the process and its children) are taken with `resource.getrusage`. Prints a Markdown table
of the medians and the machine (CPU model, cores, load average before and after), ready for docs/benchmarks.md.
Not an `nvila bench` suite: it compares two installations, which one process of nvila cannot import.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import time
from datetime import datetime, timezone

COMMANDS = (["plugins"], ["plugins", "--describe", "siglip"], ["--help"])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command``, whose output is discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the `nvila` executable measured as the baseline")
    parser.add_argument("new", help="the `nvila` executable compared against it")
    parser.add_argument("--runs", type=int, default=5, help="runs of each command by each executable")
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows = []
    for command in COMMANDS:
        times: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
        for _ in range(args.runs):
            for which in ("base", "new"):
                times[which].append(timed([getattr(args, which), *command]))
        medians = {w: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
                   for w, ts in times.items()}
        rows.append((" ".join(["nvila", *command]), medians, times))
    load_after = os.getloadavg()

    print("| command | base wall | base CPU | new wall | new CPU | new / base (wall, CPU) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m, _ in rows:
        (bw, bc), (nw, nc) = m["base"], m["new"]
        print(f"| `{name}` | {bw:.2f} s | {bc:.2f} s | {nw:.2f} s | {nc:.2f} s | {nw / bw:.2f}, {nc / bc:.2f} |")
    print()
    print(f"Medians of {args.runs} alternating runs each. Base: `{args.base}`; new: `{args.new}`.")
    print(f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_model()}, {os.cpu_count()} cores; "
          f"load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{', '.join(f'{x:.2f}' for x in load_after)} after.")
    print()
    print("Every run, wall / CPU seconds:")
    for name, _, times in rows:
        for which, ts in times.items():
            print(f"- `{name}` {which}: " + ", ".join(f"{w:.2f}/{c:.2f}" for w, c in ts))


if __name__ == "__main__":
    main()
