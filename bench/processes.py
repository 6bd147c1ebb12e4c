"""CPU time and peak memory of the service under test, read from /proc: its web process and every process below it.

The service runs in its own session (`python -m service.cli serve`); its workers and multiprocessing's resource
tracker are its descendants. Only live processes are counted, which is every process a running service has.
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """pid and every live process below it (web process, workers, multiprocessing's resource tracker)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _stat_cpu_seconds(stat_path: Path) -> float:
    # Fields after the command name, which may contain spaces: utime and stime are the 12th and 13th.
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of the web process (`web`) and of the processes below it (`workers`, with multiprocessing's
    helpers)."""
    totals = {"web": 0.0, "workers": 0.0}
    for member in descendants(pid):
        try:
            totals["web" if member == pid else "workers"] += _stat_cpu_seconds(Path(f"/proc/{member}/stat"))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return totals


def thread_cpu_seconds(pid: int) -> dict[tuple[int, int], float]:
    """utime + stime of every thread of the service, by (process id, thread id): a thread's CPU is exact where a
    profiler's samples only say how it divides."""
    found: dict[tuple[int, int], float] = {}
    for member in descendants(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for task in tasks:
            try:
                found[(member, int(task.name))] = _stat_cpu_seconds(task / "stat")
            except (FileNotFoundError, ProcessLookupError):
                continue  # the thread ended meanwhile
    return found


def peak_rss_mib(pid: int) -> float:
    """Sum of each process's own peak resident set (VmHWM): an upper bound of the tree's peak."""
    total_kib = 0
    for member in descendants(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total_kib += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total_kib / 1024
