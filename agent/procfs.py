"""The device's CPU, memory and temperature, and a process's RSS, read from /proc and /sys.

What the daemon's system points need of psutil, without psutil: importing it
costs the always-running daemon ~2.7 MB (measured; bench/agent.py). The
inventory, probed once in a child process (agent/inventory.py), still uses
psutil. Linux only, as the agent is.
"""

from __future__ import annotations

import glob
import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def memory() -> tuple[int, int]:
    """(total, available) bytes, as the kernel estimates what can be had without swapping."""
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return fields["MemTotal"], fields["MemAvailable"]


def rss(pid: int) -> int | None:
    """PID's resident memory in bytes; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; iowait counts as idle, guest time is
    already in user time."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    total = sum(values)  # user nice system idle iowait irq softirq steal
    return total - values[3] - values[4], total


class CpuPercent:
    """System-wide CPU use in percent between one call and the previous (or the creation)."""

    def __init__(self) -> None:
        self._last = _cpu_times()

    def __call__(self) -> float:
        busy, total = _cpu_times()
        busy_delta, total_delta = busy - self._last[0], total - self._last[1]
        self._last = (busy, total)
        if total_delta <= 0:
            return 0.0
        return round(min(max(busy_delta / total_delta * 100, 0.0), 100.0), 1)


def temperature() -> float | None:
    """The hottest sensor in degrees Celsius (hwmon and thermal zones); None if none reads."""
    readings = []
    for path in (glob.glob("/sys/class/hwmon/hwmon*/temp*_input")
                 + glob.glob("/sys/class/hwmon/hwmon*/device/temp*_input")
                 + glob.glob("/sys/class/thermal/thermal_zone*/temp")):
        try:
            with open(path) as sensor:
                millidegrees = int(sensor.read())
        except (OSError, ValueError):
            continue
        if millidegrees:
            readings.append(millidegrees / 1000)
    return round(max(readings), 1) if readings else None
