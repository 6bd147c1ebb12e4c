"""Issue 16's targets beside what this run measured: one line per target and row, met or not. Plain text for a
person to read; nothing here is asserted (timings on a shared 2-core machine would make a flaky test)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Target:
    text: str
    field: str
    limit: float
    at_most: bool  # met when the measured value is <= limit (else >= limit)
    unit: str
    applies: Callable[[Row], bool]

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


def _xray(row: Row) -> bool:
    return bool(row.get("xray", row["configuration"] in ("keras", "onnx")))


def _one_worker(configuration: str) -> Callable[[Row], bool]:
    return lambda row: row["configuration"] == configuration and row["workers"] == 1


TARGETS = (
    Target("CPU outside the model <= 12 ms per X-ray", "outside_cpu_ms_per_image", 12, True, " ms", _xray),
    Target("CPU efficiency >= 0.70, Keras", "cpu_efficiency", 0.70, False, "",
           lambda row: row["configuration"] == "keras"),
    Target("Keras ready <= 6 s, 1 worker", "cold_start_ready_s", 6, True, " s", _one_worker("keras")),
    Target("Keras peak RSS <= 1 GiB, 1 worker", "rss_mib", 1024, True, " MiB", _one_worker("keras")),
    Target("ONNX ready <= 1.5 s, 1 worker", "cold_start_ready_s", 1.5, True, " s", _one_worker("onnx")),
    Target("ONNX peak RSS <= 512 MiB, 1 worker", "rss_mib", 512, True, " MiB", _one_worker("onnx")),
    Target("p99 at 25 % load <= 3 x model batch-1 latency", "p99_at25_over_model_b1", 3, True, " x",
           lambda row: True),
)


def evaluate(rows: list[Row]) -> list[dict[str, Any]]:
    """Every target against every row it applies to: the measured value and whether it meets the target (None
    when the row lacks the figure)."""
    found = []
    for target in TARGETS:
        for row in rows:
            if not target.applies(row):
                continue
            value = row.get(target.field)
            found.append({"target": target.text, "configuration": row["configuration"], "workers": row["workers"],
                          "field": target.field, "measured": value, "limit": target.limit,
                          "met": None if value is None else target.met(value), "unit": target.unit})
    return found


def _shown(value: float, unit: str) -> str:
    digits = 2 if unit in ("", " x") or abs(value) < 10 else 0
    return f"{value:.{digits}f}{unit}"


def print_targets(evaluated: list[dict[str, Any]], rows: list[Row]) -> None:
    width = max((len(line["target"]) for line in evaluated), default=0)
    print("Targets (issue 16) against this run, measured on this shared 2-core machine (nothing asserted):")
    previous = None
    for line in evaluated:
        text = line["target"] if line["target"] != previous else ""
        previous = line["target"]
        measured = "-" if line["measured"] is None else _shown(line["measured"], line["unit"])
        verdict = {True: "met", False: "NOT met", None: "not measured"}[line["met"]]
        extra = ""
        row = next(row for row in rows
                   if (row["configuration"], row["workers"]) == (line["configuration"], line["workers"]))
        if line["field"] == "p99_at25_over_model_b1" and row.get("model_b1_ms") and row.get("p99_ms_at25"):
            extra = f"  ({row['p99_ms_at25']:.0f} ms / {row['model_b1_ms']:.0f} ms)"
        if line["field"] == "cold_start_ready_s" and row.get("cold_starts"):
            extra = (f"  (median of {row['cold_starts']} starts, {row['cold_start_ready_min_s']:.2f}-"
                     f"{row['cold_start_ready_max_s']:.2f} s)")
        print(f"  {text:<{width}}  {line['configuration']:>8} x{line['workers']}  {measured:>9}  {verdict}{extra}")
